"""Small file utilities: atomic writes, checkpoint discovery, image grids."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it into place.

    A kill at any moment leaves either the old file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, content: Any) -> None:
    """Writes ``content`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(content, indent=2, sort_keys=True) + "\n").encode())


def nifti_gz_bytes(data: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    """Gzipped NIfTI-1 bytes of ``data`` (1 mm identity geometry by default) with a fixed gzip header.

    ``mtime=0`` keeps the header, and so the file, byte-identical when the same array is written again.
    """
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    image.header.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _numbered_checkpoints(directory: str | os.PathLike, prefix: str) -> list[tuple[int, str]]:
    pattern = re.compile(rf"{re.escape(prefix)}_(?:epoch|iteration)=(\d+)\.pt$")
    found = []
    if Path(directory).is_dir():
        for name in os.listdir(directory):
            match = pattern.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """Path of the newest ``<prefix>_epoch=N.pt`` or ``<prefix>_iteration=N.pt`` in ``directory``, or ``""``.

    The empty string lets a config write ``"_disabled_": "$not @resume_path"`` for a fresh start.
    """
    found = _numbered_checkpoints(directory, prefix)
    return found[-1][1] if found else ""


def prune_checkpoints(directory: str | os.PathLike, keep: int, prefix: str = "checkpoint") -> list[str]:
    """Deletes all but the ``keep`` newest numbered checkpoints; returns the deleted paths.

    Ignite's ``n_saved`` only knows the files its own process wrote, so a resumed run would otherwise keep
    every earlier run's last checkpoint forever.
    """
    found = _numbered_checkpoints(directory, prefix)
    doomed = [path for _, path in found[: max(0, len(found) - keep)]]
    for path in doomed:
        Path(path).unlink(missing_ok=True)
    return doomed


def to_uint8(image: torch.Tensor | np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """A 2D image scaled from ``[low, high]`` to uint8, clipped."""
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    return (np.clip((array - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_image_grid(path: str | os.PathLike, images: torch.Tensor, columns: int = 4) -> None:
    """Writes images ``[N, 1, H, W]`` in ``[0, 1]`` as a PNG grid of ``columns`` tiles a row (see :func:`save_grid`)."""
    tiles = [to_uint8(image[0]) for image in images]
    save_grid(path, [tiles[i : i + columns] for i in range(0, len(tiles), columns)])


def save_grid(path: str | os.PathLike, rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> None:
    """Writes a PNG of uint8 2D tiles arranged in rows (tiles of a row share a height), atomically.

    Tiles are given as stored (axis 0 = left-right for HipMRI) and shown transposed, anterior up.
    """
    from PIL import Image

    shown = [[np.ascontiguousarray(tile.T) for tile in row] for row in rows]
    height = sum(max(t.shape[0] for t in row) for row in shown) + gap * (len(shown) - 1)
    width = max(sum(t.shape[1] for t in row) + gap * (len(row) - 1) for row in shown)
    canvas = np.zeros((height, width), np.uint8)
    y = 0
    for row in shown:
        x = 0
        for tile in row:
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
            x += tile.shape[1] + gap
        y += max(t.shape[0] for t in row) + gap
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


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
