"""What a run records and checks about itself: its merged config and versions, override types, and outputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bundle.engine.io import atomic_write_json

def report_outputs(paths: dict[str, str]) -> None:
    """Prints where a workflow left its outputs, marking the ones that are missing."""
    print("\nOutputs:")
    for name, path in paths.items():
        status = "" if os.path.exists(path) else "  (not written)"
        print(f"  {name:<16} {os.path.abspath(path)}{status}")


def _command_line_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Config files and ``--key value`` overrides of a ``python -m monai.bundle run`` command line."""
    import ast

    files: list[str] = []
    overrides: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        if args[i].startswith("--") and i + 1 < len(args):
            key, value = args[i][2:], args[i + 1]
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            if key == "config_file":
                files = list(value) if isinstance(value, (list, tuple)) else [value]
            else:
                overrides[key] = value
            i += 2
        else:
            i += 1
    return files, overrides


def record_run(directory: str | os.PathLike, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes ``run_config.json`` (the merged config with overrides and macros expanded) and ``versions.json``
    into ``directory``, next to the checkpoints, so that any checkpoint can be traced to what made it.

    Args:
        directory: the checkpoint folder.
        argv: the command line; ``sys.argv`` by default.

    Returns:
        ``{"config": ..., "versions": ...}`` as written.
    """
    import platform
    import sys

    import monai
    from monai.bundle import ConfigParser

    files, overrides = _command_line_overrides(sys.argv[1:] if argv is None else argv)
    parser = ConfigParser()
    if files:
        parser.read_config(files)
        parser.update(overrides)
        parser.resolve_macro_and_relative_ids()
    versions = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__}
    for name in ("monai", "ignite", "numpy", "nibabel", "itk", "skimage", "tensorboard"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        versions[name] = getattr(module, "__version__", "unknown")
    versions["monai_config"] = {k: str(v) for k, v in monai.config.deviceconfig.get_config_values().items()}
    versions["cuda"] = torch.version.cuda
    record = {"command": list(sys.argv if argv is None else argv), "config_files": files, "overrides": overrides,
              "config": parser.get()}
    atomic_write_json(Path(directory) / "run_config.json", record)
    atomic_write_json(Path(directory) / "versions.json", versions)
    return {"config": record, "versions": versions}


def check_types(**values: Any) -> None:
    """Raises one clear error for overrides of the wrong type, e.g. ``--max_epochs abc``.

    Each keyword is ``name=(value, type)``; ``float`` accepts ints, ``int`` refuses bools.
    """
    problems = []
    for name, (value, expected) in values.items():
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            problems.append(f"{name} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    if problems:
        raise TypeError("bad override: " + "; ".join(problems))
