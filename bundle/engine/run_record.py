"""What a run records and checks about itself: its merged config and versions, override types, and outputs."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bundle.engine.io import atomic_write_json

logger = logging.getLogger(__name__)


def report_outputs(paths: dict[str, str]) -> None:
    """Prints where a workflow left its outputs, marking the ones that are missing."""
    print("\nOutputs:")
    for name, path in paths.items():
        status = "" if os.path.exists(path) else "  (not written)"
        print(f"  {name:<16} {os.path.abspath(path)}{status}")


# Arguments of ``monai.bundle.scripts.run`` and ``ConfigWorkflow`` themselves, not config IDs.
RUNNER_ARGUMENTS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_type",
        "properties_path",
    }
)


def _literal(value: str) -> Any:
    import ast

    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _command_line_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Config files and ``--key value`` (or ``--key=value``; a lone ``--flag`` is True) overrides of a
    ``python -m monai.bundle run`` command line."""
    files: list[str] = []
    overrides: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        if not args[i].startswith("--"):
            i += 1
            continue
        key, equals, value = args[i][2:].partition("=")
        if not equals and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        elif not equals:
            value = "True"
        i += 1
        value = _literal(value)
        if key == "config_file":
            files = list(value) if isinstance(value, (list, tuple)) else [value]
        else:
            overrides[key] = value
    return files, overrides


def _bundle_command_line() -> list[str] | None:
    """``sys.argv[1:]`` when this process is ``python -m monai.bundle``, else None (e.g. a test calling
    ``monai.bundle.run`` in-process, whose command line is pytest's)."""
    import sys

    return sys.argv[1:] if Path(sys.argv[0]).parts[-2:] == ("bundle", "__main__.py") else None


def _config_ids(config: Any, prefix: str = "") -> list[str]:
    from monai.bundle.utils import ID_SEP_KEY

    ids = []
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        full = f"{prefix}{ID_SEP_KEY}{key}" if prefix else str(key)
        ids += [full, *_config_ids(value, full)]
    return ids


def _is_known(parser: Any, key: str) -> bool:
    """An existing ID, or a new keyword argument of an existing component (a dict with ``_target_``)."""
    from monai.bundle.utils import ID_SEP_KEY

    if key in parser:
        return True
    parent, _, _ = key.rpartition(ID_SEP_KEY)
    return bool(parent) and parent in parser and isinstance(parser[parent], dict) and "_target_" in parser[parent]


def _ids_of_other_configs(files: Sequence[str]) -> dict[str, str]:
    """Each ID of the bundle's other configs (the JSON files beside the first config), with a file holding it."""
    from monai.bundle import ConfigParser

    folder = Path(files[0]).parent
    found: dict[str, str] = {}
    for path in sorted(folder.glob("*.json")):
        if any(path.resolve() == Path(f).resolve() for f in files):
            continue
        try:
            content = ConfigParser.load_config_file(str(path))
        except ValueError:
            continue
        for config_id in _config_ids(content):
            found.setdefault(config_id, str(path))
    return found


def _unknown_overrides(parser: Any, overrides: dict[str, Any]) -> list[tuple[str, str]]:
    """``(override, normalised ID)`` of the overrides that are no ID of the parsed config."""
    from monai.bundle.reference_resolver import ReferenceResolver

    unknown = []
    for key in overrides:
        normalized = ReferenceResolver.normalize_id(str(key).lstrip("+"))
        if key not in RUNNER_ARGUMENTS and not _is_known(parser, normalized):
            unknown.append((key, normalized))
    return unknown


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Stops a run whose command line overrides an ID that no config has, naming the closest IDs.

    MONAI's runner adds an unknown ``--max_epoch 3`` to the config as a new, unused entry and trains on with
    ``max_epochs`` unchanged. A new keyword argument of an existing component (``--train#trainer#epoch_length 2``)
    is allowed. An ID of another of the bundle's configs (``--compile`` given to inference, which has no compiled
    trainer) is only warned about, so one set of options can serve several workflows. Call it from ``initialize``.

    Args:
        argv: the command line after the program name; by default ``sys.argv[1:]`` when this process is
            ``python -m monai.bundle`` (nothing is checked otherwise).

    Raises:
        ValueError: an override matches no ID of any of the bundle's configs; lists each with up to three close
            matches among the run's IDs.
    """
    import difflib

    from monai.bundle import ConfigParser

    argv = _bundle_command_line() if argv is None else argv
    if argv is None:
        return
    files, overrides = _command_line_overrides(argv)
    if "args_file" in overrides:
        overrides = {**ConfigParser.load_config_file(str(overrides["args_file"])), **overrides}
        files = files or list(overrides.get("config_file") or [])
    if not files:
        return
    parser = ConfigParser()
    parser.read_config(files)
    unknown = _unknown_overrides(parser, overrides)
    elsewhere = _ids_of_other_configs(files) if unknown else {}
    ids = _config_ids(parser.get()) if unknown else []
    unused = [f"--{key} ({elsewhere[normalized]})" for key, normalized in unknown if normalized in elsewhere]
    if unused:
        logger.warning(f"ignored: override(s) of IDs that only other workflows of the bundle use: {', '.join(unused)}.")
    problems = []
    for key, normalized in unknown:
        if normalized not in elsewhere:
            close = difflib.get_close_matches(normalized, ids, n=3, cutoff=0.6)
            problems.append(f"--{key} (did you mean {', '.join('--' + c for c in close)}?)" if close else f"--{key}")
    if problems:
        raise ValueError(
            f"override matches no config ID, so it would change nothing: {'; '.join(problems)}. Config files: {files}."
        )


def record_run(
    directory: str | os.PathLike, argv: Sequence[str] | None = None, resumed_from: Any = None
) -> dict[str, Any]:
    """Writes ``run_config.json`` (the merged config with overrides and macros expanded) and ``versions.json``
    into ``directory``, next to the checkpoints, so that any checkpoint can be traced to what made it.

    A resumed run runs with its own config (see :class:`~bundle.engine.checkpoint.EngineCheckpointLoader`), so
    the record of a resumed run names the checkpoint it started from and keeps the earlier runs' records under
    ``"earlier_runs"``, oldest first; a fresh start begins a new history.

    Args:
        directory: the checkpoint folder.
        argv: the command line; ``sys.argv`` by default.
        resumed_from: the checkpoint(s) the run resumes from (a path, or a mapping of stage to path); empty or
            None for a fresh start.

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
    record = {
        "command": list(sys.argv if argv is None else argv),
        "config_files": files,
        "overrides": overrides,
        "resumed_from": resumed_from if _any_path(resumed_from) else None,
        "config": parser.get(),
    }
    path = Path(directory) / "run_config.json"
    if _any_path(resumed_from) and path.is_file():
        earlier = json.loads(path.read_text())
        record["earlier_runs"] = [*earlier.pop("earlier_runs", []), earlier]
    atomic_write_json(path, record)
    atomic_write_json(Path(directory) / "versions.json", versions)
    return {"config": record, "versions": versions}


def _any_path(resumed_from: Any) -> bool:
    return any(resumed_from.values()) if isinstance(resumed_from, dict) else bool(resumed_from)


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
