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


# NIfTI datatype codes the bundle cannot take as an intensity image.
NIFTI_REFUSED = {1: "1-bit (binary, a mask?)", 32: "complex", 1792: "complex", 2048: "complex"}
# PIL modes the bundle cannot take as an intensity image.
PIL_REFUSED = {
    "1": "1-bit (binary, a mask?)",
    "P": "palette (colour indices, not intensities)",
    "PA": "palette (colour indices, not intensities)",
}
GREY_ALPHA_MODES = ("LA", "La")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _meta(img: torch.Tensor) -> dict:
    return getattr(img, "meta", {}) or {}


def _source(img: torch.Tensor) -> str:
    return str(_meta(img).get("filename_or_obj", "<in-memory image>"))


def _file_shape(meta: dict) -> tuple[int, ...] | None:
    """The array shape stored in a NIfTI header, or None for other sources."""
    dim = meta.get("dim")
    if dim is None or "sizeof_hdr" not in meta:
        return None
    dim = [int(d) for d in np.asarray(dim).ravel()]
    return tuple(dim[1 : 1 + dim[0]])


def _refused_kind(img: torch.Tensor) -> str | None:
    """Why the pixel type cannot be an intensity image (from the tensor or the file's header), or None."""
    if img.is_complex():
        return "complex"
    if img.dtype == torch.bool:
        return "boolean (a mask?)"
    meta = _meta(img)
    if "sizeof_hdr" in meta and "datatype" in meta:
        return NIFTI_REFUSED.get(int(np.asarray(meta["datatype"])))
    return PIL_REFUSED.get(str(meta.get("mode")))


class EnsureSlice2D(Transform):
    """Turns a channel-first loaded image into a finite float ``[1, H, W]`` slice.

    - drops singleton spatial axes (HipMRI files sometimes carry a trailing one);
    - refuses true volumes (more than two non-singleton spatial axes) with an error naming the file, since a
      2D model must not silently train on one arbitrary slice of a volume; a NIfTI file of four or more axes
      (which MONAI reads with its last axis as channels) is refused unless it is a slice with singleton axes;
    - turns RGB/RGBA images of 2D formats (for example PNGs saved with an alpha channel) into grey by luma, and
      grey+alpha PNGs into their grey channel, ignoring alpha; several NIfTI channels are refused;
    - refuses pixel types that are not intensities: complex, boolean or 1-bit, palette PNGs;
    - refuses intensities spanning more than float32 can subtract (the intensity scaling would give NaN), and
      images without a single finite voxel (e.g. float64 beyond float32's range);
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
        refused = _refused_kind(img)
        if refused:
            raise ValueError(f"'{source}' holds {refused} pixels; the bundle takes grey-level intensity slices.")
        spatial = self._spatial_shape(img, source)
        img = self._to_grey(img.float().reshape(img.shape[0], *spatial), source)
        img = self._finite(img, source)
        if isinstance(img, MetaTensor):
            # Keep the 2D view of the geometry consistent with the new shape for the writers.
            img.meta["spatial_shape"] = np.asarray(spatial)
        return img

    @staticmethod
    def _spatial_shape(img: torch.Tensor, source: str) -> list[int]:
        spatial = [s for s in img.shape[1:] if s != 1]
        file_shape = _file_shape(_meta(img))
        if len(spatial) == 2 and not (file_shape and len(file_shape) > 3 and img.shape[0] > 1):
            return spatial
        if file_shape and len(file_shape) > 3:
            raise ValueError(
                f"'{source}' holds a {len(file_shape)}D array of shape {file_shape}; MONAI reads the last axis of such "
                "a NIfTI file as channels. The bundle takes one 2D slice per file, stored as (H, W) or (H, W, 1)."
            )
        raise ValueError(
            f"'{source}' has spatial shape {tuple(img.shape[1:])}: the bundle takes 2D slices; "
            "split volumes into slices first."
        )

    @staticmethod
    def _to_grey(img: torch.Tensor, source: str) -> torch.Tensor:
        channels, mode = img.shape[0], str(_meta(img).get("mode"))
        if channels == 1:
            return img
        if channels == 2 and mode in GREY_ALPHA_MODES:
            return img[:1]
        if channels in (3, 4) and "sizeof_hdr" not in _meta(img):
            weights = torch.tensor(LUMA, dtype=img.dtype, device=img.device).view(3, 1, 1)
            return (img[:3] * weights).sum(0, keepdim=True)
        raise ValueError(f"'{source}' has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA).")

    def _finite(self, img: torch.Tensor, source: str) -> torch.Tensor:
        bad = ~torch.isfinite(img)
        if bad.all():
            raise ValueError(f"'{source}' has no finite voxel (values beyond float32's range?).")
        if bad.any():
            count = int(bad.sum())
            if self.nonfinite == "error":
                raise ValueError(f"'{source}' has {count} NaN/Inf voxels.")
            logger.warning(f"'{source}': replaced {count} NaN/Inf voxels by 0.")
            img = torch.where(bad, torch.zeros_like(img), img)
        low, high = float(img.min()), float(img.max())
        if high - low > FLOAT32_MAX:
            raise ValueError(
                f"'{source}' has intensities from {low:.3g} to {high:.3g}, a span beyond float32's range: the "
                "intensity scaling would overflow. Rescale the file."
            )
        return img


class RequireFinite(Transform):
    """Passes a result through when every value is finite; raises naming the input otherwise.

    Place it before any clipping (clipping turns Inf into a valid-looking value) and before the writer, so no
    file is written from a non-finite result.

    Args:
        what: the result's name for the message.
    """

    def __init__(self, what: str = "result") -> None:
        self.what = what

    def __call__(self, img: torch.Tensor, source: str | None = None) -> torch.Tensor:
        bad = ~torch.isfinite(torch.as_tensor(img))
        if bad.any():
            raise FloatingPointError(
                f"the {self.what} of '{source or _source(img)}' has {int(bad.sum())} of {bad.numel()} values NaN or "
                "Inf; nothing was written for it. Check the input's intensities and the weights."
            )
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


class RequireFinited(MapTransform):
    """Dictionary version of :class:`RequireFinite`; the message names the file of ``source_key``.

    Args:
        keys: keys of the results to check.
        source_key: key of the input whose file is named.
        allow_missing_keys: don't raise when a key is missing.
    """

    def __init__(self, keys: KeysCollection, source_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        source = _source(d[self.source_key]) if self.source_key in d else None
        for key in self.key_iterator(d):
            d[key] = RequireFinite(str(key))(d[key], source)
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
