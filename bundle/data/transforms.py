"""Transforms MONAI lacks for this data: loading that names a broken file, and a clean single-channel 2D slice."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, ToDeviced, Transform

logger = logging.getLogger(__name__)

# ITU-R BT.601 luma weights: what image viewers use when they show an RGB slice in grey.
LUMA = (0.299, 0.587, 0.114)


def _source(img: torch.Tensor) -> str:
    meta = getattr(img, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class EnsureSlice2D(Transform):
    """Turns a channel-first loaded image into a finite float ``[1, H, W]`` slice.

    - drops singleton spatial axes (HipMRI files sometimes carry a trailing one);
    - refuses true volumes (more than two non-singleton spatial axes) with an error naming the file, since a
      2D model must not silently train on one arbitrary slice of a volume;
    - turns RGB/RGBA (for example PNGs saved with an alpha channel) into grey by luma, ignoring alpha;
    - replaces NaN and Inf voxels by 0 and logs how many, so one bad voxel cannot poison the intensity scaling.

    Args:
        nonfinite: ``"zero"`` (replace and warn) or ``"error"`` (raise naming the file).
    """

    def __init__(self, nonfinite: str = "zero") -> None:
        if nonfinite not in ("zero", "error"):
            raise ValueError(f"nonfinite must be 'zero' or 'error', got '{nonfinite}'.")
        self.nonfinite = nonfinite

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        source = _source(img)
        if img.ndim < 3:
            raise ValueError(f"'{source}': expected a channel-first image, got shape {tuple(img.shape)}.")
        channels, spatial = img.shape[0], [s for s in img.shape[1:] if s != 1]
        if len(spatial) != 2:
            raise ValueError(
                f"'{source}' has spatial shape {tuple(img.shape[1:])}: the bundle takes 2D slices; "
                "split volumes into slices first."
            )
        img = img.float().reshape(channels, *spatial)
        if channels in (3, 4):
            weights = torch.tensor(LUMA, dtype=img.dtype, device=img.device).view(3, 1, 1)
            img = (img[:3] * weights).sum(0, keepdim=True)
        elif channels != 1:
            raise ValueError(f"'{source}' has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA).")
        bad = ~torch.isfinite(img)
        if bad.any():
            count = int(bad.sum())
            if self.nonfinite == "error":
                raise ValueError(f"'{source}' has {count} NaN/Inf voxels.")
            logger.warning(f"'{source}': replaced {count} NaN/Inf voxels by 0.")
            img = torch.where(bad, torch.zeros_like(img), img)
        if isinstance(img, MetaTensor):
            # Keep the 2D view of the geometry consistent with the new shape for the writers.
            img.meta["spatial_shape"] = np.asarray(spatial)
        return img


class EnsureSlice2Dd(MapTransform):
    """Dictionary version of :class:`EnsureSlice2D`.

    Args:
        keys: keys of the images to convert.
        nonfinite: see :class:`EnsureSlice2D`.
        allow_missing_keys: don't raise when a key is missing.
    """

    def __init__(self, keys: KeysCollection, nonfinite: str = "zero", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureSlice2D(nonfinite)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class SafeLoadImaged(LoadImaged):
    """``LoadImaged`` whose read errors name the file.

    A truncated ``.nii.gz`` otherwise fails with a bare ``EOFError`` from ``gzip`` and no hint of which of
    thousands of files is broken. Arguments are those of :class:`monai.transforms.LoadImaged`.
    """

    def __call__(self, data: Mapping[Hashable, object], reader: object | None = None) -> dict[Hashable, object]:
        """Loads like ``LoadImaged``; a read error is re-raised as a ValueError naming the file(s)."""
        try:
            return super().__call__(data, reader)
        except Exception as error:
            paths = [str(data.get(key)) for key in self.keys if key in data]
            raise ValueError(
                f"cannot read {', '.join(repr(p) for p in paths)}: {type(error).__name__}: {error}"
            ) from error


def to_device_when_cached(
    keys: KeysCollection, device: torch.device | str, enabled: bool, num_workers: int
) -> list[Transform]:
    """The transform to put between the cached (deterministic) and the random transforms of a ``CacheDataset``.

    When ``enabled``, the cached images are moved to ``device`` once, when the cache is built, and the random
    augmentation then runs there: on a GPU the CPU no longer prepares every batch (the augmentation of cached
    slices, not the reading, is what a CPU loader spends its time on). The whole HipMRI set is about 1.5 GB in
    fp32 on the device.

    Args:
        keys: the image keys.
        device: the training device.
        enabled: the config's ``data_on_device``.
        num_workers: the data loader's workers; CUDA tensors cannot be handed out by worker processes.

    Returns:
        ``[ToDeviced(keys, device)]`` or ``[]``.
    """
    if not enabled:
        return []
    if num_workers > 0 and torch.device(device).type != "cpu":
        raise ValueError(f"data_on_device keeps the data on {device}: set num_workers to 0 (it is {num_workers}).")
    return [ToDeviced(keys=keys, device=device)]
