"""Pictures of anomaly maps: grey tiles, maps and colour overlays in one PNG grid."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from bundle.engine.io import tile_canvas, to_uint8, write_png

__all__ = ["overlay", "save_rgb_grid"]

RED = np.array([255.0, 40.0, 40.0])


def overlay(image: torch.Tensor, anomaly_map: torch.Tensor, scale: float, opacity: float = 0.7) -> np.ndarray:
    """An RGB uint8 ``[H, W, 3]`` tile: the grey image with the map blended in red.

    Args:
        image: ``[H, W]`` in ``[0, 1]``.
        anomaly_map: ``[H, W]`` (>= 0).
        scale: map value shown at full ``opacity``.
        opacity: largest weight of the red.

    Returns:
        The tile.
    """
    grey = to_uint8(image).astype(np.float32)[..., None].repeat(3, axis=-1)
    alpha = opacity * np.clip(anomaly_map.detach().float().cpu().numpy() / scale, 0.0, 1.0)[..., None]
    return (grey * (1.0 - alpha) + RED * alpha + 0.5).astype(np.uint8)


def _rgb(tile: np.ndarray) -> np.ndarray:
    """A uint8 tile as stored (axis 0 left-right) turned to shown RGB (transposed: anterior up)."""
    tile = tile if tile.ndim == 3 else tile[..., None].repeat(3, axis=-1)
    return np.ascontiguousarray(tile.transpose(1, 0, 2))


def save_rgb_grid(path: str | os.PathLike, rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> None:
    """Writes uint8 tiles (grey ``[H, W]`` or RGB ``[H, W, 3]``, shown transposed like
    :func:`bundle.engine.io.save_grid`) in rows as one RGB PNG, atomically.

    Args:
        path: the PNG.
        rows: rows of tiles; the tiles of a row share a height once shown.
        gap: black pixels between tiles.
    """

    write_png(path, tile_canvas([[_rgb(tile) for tile in row] for row in rows], gap))
