"""Atomic file writes and image grids shared by every workflow."""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

TEMPORARY_SUFFIX = ".tmp"


@functools.cache
def _ordinary_mode() -> int:
    """The permissions ``open()`` gives a new file under the process's umask (``mkstemp`` gives 0600).

    Read once: setting the umask to read it is not thread-safe.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it into place.

    A kill at any moment leaves either the old file or the new one, never a truncated one. A failed write (a full
    disk, a missing permission) removes the temporary file before the error propagates, so failures leave nothing
    behind. The file gets the permissions an ordinary ``open()`` would give it.

    Args:
        path: the destination; its folder is created if needed.
        data: the whole content.
        durable: sync the data to disk before the rename, so that a power cut cannot leave a renamed but empty
            file; about 3 ms a file, worth skipping only for many small files that can be made again.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _ordinary_mode())
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(directory: str | os.PathLike) -> list[str]:
    """Deletes the temporary files :func:`atomic_write_bytes` left in ``directory`` when its process was killed.

    Call it only while no other process writes there (a run holding :mod:`bundle.engine.run_lock`'s lock).

    Args:
        directory: the folder to clean; a missing one is fine.

    Returns:
        The deleted paths.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return []
    doomed = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMPORARY_SUFFIX)]
    for p in doomed:
        p.unlink(missing_ok=True)
    return [str(p) for p in doomed]


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


def to_uint8(image: torch.Tensor | np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """A 2D image scaled from ``[low, high]`` to uint8, clipped."""
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    return (np.clip((array - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_tiles(path: str | os.PathLike, tiles: Sequence[np.ndarray], columns: int = 4) -> None:
    """Writes uint8 2D tiles as a PNG grid of ``columns`` tiles a row (see :func:`save_grid`)."""
    save_grid(path, [tiles[i : i + columns] for i in range(0, len(tiles), columns)])


def save_image_grid(path: str | os.PathLike, images: torch.Tensor, columns: int = 4) -> None:
    """Writes images ``[N, 1, H, W]`` in ``[0, 1]`` as a PNG grid of ``columns`` tiles a row (see :func:`save_grid`)."""
    save_tiles(path, [to_uint8(image[0]) for image in images], columns)


def tile_canvas(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """uint8 tiles (``[H, W]`` or ``[H, W, C]``, as shown) laid out in rows on a black canvas.

    Args:
        rows: rows of tiles; the tiles of a row share a height, and every tile has the same trailing axes.
        gap: black pixels between tiles.

    Returns:
        The canvas, ``[height, width]`` or ``[height, width, C]``.
    """
    height = sum(max(t.shape[0] for t in row) for row in rows) + gap * (len(rows) - 1)
    width = max(sum(t.shape[1] for t in row) + gap * (len(row) - 1) for row in rows)
    canvas = np.zeros((height, width, *rows[0][0].shape[2:]), np.uint8)
    y = 0
    for row in rows:
        x = 0
        for tile in row:
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
            x += tile.shape[1] + gap
        y += max(t.shape[0] for t in row) + gap
    return canvas


def write_png(path: str | os.PathLike, canvas: np.ndarray) -> None:
    """Writes a uint8 grey or RGB array as a PNG, atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_grid(path: str | os.PathLike, rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> None:
    """Writes a PNG of uint8 2D tiles arranged in rows (tiles of a row share a height), atomically.

    Tiles are given as stored (axis 0 = left-right for HipMRI) and shown transposed, anterior up.
    """
    write_png(path, tile_canvas([[np.ascontiguousarray(tile.T) for tile in row] for row in rows], gap))
