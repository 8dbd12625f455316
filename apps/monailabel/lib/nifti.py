"""Writes a result as NIfTI with the request image's geometry (shape and affine), read back from that file.

MONAI Label's default ``Writer`` goes through ITK, which drops the affine of 2D images, and treats every
output as a label map; these results are float images in [0, 1].
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import to_affine_nd

logger = logging.getLogger(__name__)


def reference_geometry(data: dict[str, Any], key: str = "image") -> tuple[tuple[int, ...], np.ndarray, Any]:
    """``(shape, 4x4 affine, header or None)`` of the request image.

    NIfTI (and anything else nibabel reads) is read from the file itself, so the result has exactly the
    input's shape (a trailing singleton axis included) and affine. Other formats (PNG, NRRD...) fall back on
    the geometry MONAI's loader recorded (``spatial_shape``, ``original_affine``).
    """
    path = data.get("image_path") or (data.get(key) if isinstance(data.get(key), str) else None)
    if isinstance(path, str) and os.path.isfile(path):
        try:
            image = nib.load(path)
            return tuple(int(s) for s in image.shape), np.asarray(image.affine, dtype=np.float64), image.header
        except Exception as error:  # not a nibabel format
            logger.debug(f"nibabel cannot read {path} ({error}); using the loader's metadata")
    meta = getattr(data.get(key), "meta", None) or data.get(f"{key}_meta_dict") or {}
    shape = tuple(int(s) for s in np.asarray(meta.get("spatial_shape", ())).ravel())
    affine = meta.get("original_affine")
    affine = np.eye(4) if affine is None else np.asarray(to_affine_nd(3, np.asarray(affine, dtype=np.float64)))
    return shape, affine, None


def write_like_input(data: dict[str, Any], pred_key: str = "pred", prefix: str = "result") -> str:
    """Writes ``data[pred_key]`` (``[1, H, W]`` or ``[H, W]``) as float32 NIfTI shaped like the request image.

    Returns:
        The path of a new ``.nii.gz`` file (MONAI Label's ``/infer`` sends it and then deletes it).
    """
    pred = data[pred_key]
    array = pred.detach().cpu().float().numpy() if torch.is_tensor(pred) else np.asarray(pred, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    shape, affine, header = reference_geometry(data)
    if shape and int(np.prod(shape)) == array.size and array.shape != shape:
        array = array.reshape(shape)  # e.g. a (256, 144, 1) input: the same voxels with its trailing axis
    elif shape and array.shape != shape:
        raise ValueError(f"result of shape {array.shape} does not fit the input image's shape {shape}")
    image = nib.Nifti1Image(np.ascontiguousarray(array, dtype=np.float32), affine)
    if header is not None and hasattr(header, "get_xyzt_units"):
        image.header.set_xyzt_units(*header.get_xyzt_units())
    else:
        image.header.set_xyzt_units("mm")
    fd, path = tempfile.mkstemp(prefix=f"{prefix}_", suffix=".nii.gz")
    os.close(fd)
    nib.save(image, path)
    return path
