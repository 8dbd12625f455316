"""Synthetic lesions with known masks, for benchmarking anomaly maps on any data set of normal slices.

A lesion is a rotated ellipse with a soft edge, blended into the body (never the background) towards a brighter
or darker intensity than the tissue it covers. Its size runs log-uniformly from a few pixels to a large part of an organ, its
centre lies in the body where the chosen polarity leaves visible contrast, and everything is drawn from
``numpy.random.default_rng([seed, index])``, so the same seed and slice index give the same lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes

__all__ = ["Lesion", "draw_lesion", "body_mask", "lesion_weight", "insert_lesion"]

BODY_LEVEL = 0.1  # pixels above this (after the [0, 1] percentile scaling) are in the body
MIN_CONTRAST, MAX_CONTRAST = 0.35, 0.6


@dataclass(frozen=True)
class Lesion:
    """One synthetic lesion in pixel coordinates of the (stored) slice.

    Attributes:
        centre: ``(row, column)``.
        radii: semi-axes ``(a, b)`` in pixels.
        angle: rotation of the first semi-axis, radians.
        edge: width of the soft edge in pixels (a logistic fall-off).
        bright: brighter (True) or darker (False) than the tissue.
        contrast: intensity change at the centre, in ``[0, 1]`` units.
    """

    centre: tuple[float, float]
    radii: tuple[float, float]
    angle: float
    edge: float
    bright: bool
    contrast: float


def draw_lesion(image: np.ndarray, seed: int, index: int, min_radius: float = 1.5, max_radius: float = 24.0) -> Lesion:
    """Draw the lesion of slice ``index`` for ``seed``: bright for even indices, dark for odd ones.

    Args:
        image: the slice ``[H, W]`` in ``[0, 1]``.
        seed: the benchmark's seed.
        index: the slice's index.
        min_radius: smallest semi-axis in pixels.
        max_radius: largest semi-axis in pixels.

    Returns:
        The :class:`Lesion`.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    bright = index % 2 == 0
    contrast = float(rng.uniform(MIN_CONTRAST, MAX_CONTRAST))
    body = body_mask(image)
    room = image < 1.0 - MIN_CONTRAST if bright else image > MIN_CONTRAST
    candidates = np.argwhere(body & room)
    if len(candidates) == 0:
        candidates = np.argwhere(body) if body.any() else np.array([[image.shape[0] // 2, image.shape[1] // 2]])
    centre = candidates[rng.integers(len(candidates))].astype(float)
    major = float(np.exp(rng.uniform(np.log(min_radius), np.log(max_radius))))
    minor = max(min_radius, major * float(rng.uniform(0.5, 1.0)))
    return Lesion(
        centre=(float(centre[0]), float(centre[1])),
        radii=(major, minor),
        angle=float(rng.uniform(0.0, np.pi)),
        edge=float(rng.uniform(0.3, 1.5)),
        bright=bright,
        contrast=contrast,
    )


def body_mask(image: np.ndarray) -> np.ndarray:
    """The body of a slice ``[H, W]`` in ``[0, 1]``: pixels above :data:`BODY_LEVEL`, holes (gas, dark organs)
    filled."""
    return binary_fill_holes(image > BODY_LEVEL)


def lesion_weight(shape: tuple[int, int], lesion: Lesion) -> np.ndarray:
    """The lesion's soft profile ``[H, W]`` in ``[0, 1]``: 0.5 on the ellipse, a logistic fall-off of width
    ``edge`` across it.

    Args:
        shape: ``(H, W)``.
        lesion: the lesion.

    Returns:
        Float32 ``[H, W]``.
    """
    rows, columns = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    dy, dx = rows - lesion.centre[0], columns - lesion.centre[1]
    cos, sin = np.cos(lesion.angle), np.sin(lesion.angle)
    u, v = (cos * dy + sin * dx) / lesion.radii[0], (-sin * dy + cos * dx) / lesion.radii[1]
    radius = np.sqrt(u**2 + v**2)
    # signed distance to the ellipse, approximately, in pixels of the mean semi-axis
    distance = (radius - 1.0) * float(np.mean(lesion.radii))
    return (1.0 / (1.0 + np.exp(np.clip(distance / lesion.edge, -50.0, 50.0)))).astype(np.float32)


def insert_lesion(
    image: torch.Tensor, seed: int, index: int, min_radius: float = 1.5, max_radius: float = 24.0
) -> tuple[torch.Tensor, torch.Tensor, Lesion]:
    """A copy of a slice with the lesion of ``(seed, index)`` blended in, and its ground-truth mask.

    The slice moves towards ``clip(mean under the lesion +- contrast, 0, 1)`` by the lesion's soft weight, cut
    to the body (:func:`body_mask`); the mask holds the pixels where that weight is at least one half.

    Args:
        image: ``[1, H, W]`` in ``[0, 1]``.
        seed: the benchmark's seed.
        index: the slice's index (its polarity: bright when even).
        min_radius: smallest semi-axis in pixels.
        max_radius: largest semi-axis in pixels.

    Returns:
        ``(lesioned [1, H, W] in [0, 1], mask bool [1, H, W], lesion)``.
    """
    array = image[0].detach().float().cpu().numpy()
    lesion = draw_lesion(array, seed, index, min_radius, max_radius)
    weight = lesion_weight(array.shape, lesion) * body_mask(array)
    inside = weight >= 0.5
    sign = 1.0 if lesion.bright else -1.0
    target = float(np.clip(array[inside].mean() + sign * lesion.contrast if inside.any() else 0.5, 0.0, 1.0))
    lesioned = array * (1.0 - weight) + target * weight
    return (torch.from_numpy(np.clip(lesioned, 0.0, 1.0))[None].to(image.dtype), torch.from_numpy(inside)[None], lesion)
