"""The ``anomaly`` workflow: anomaly maps of every slice of a folder, written with each input's geometry."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from bundle.anomaly.detection import AnomalyDetector, AnomalyOutput
from bundle.anomaly.figures import overlay, save_rgb_grid
from bundle.engine.io import atomic_write_bytes, nifti_gz_bytes, to_uint8

__all__ = ["OUTPUTS", "restore_geometry", "save_like_source", "detect_folder"]

logger = logging.getLogger(__name__)

# output file suffix -> the AnomalyOutput field written there
OUTPUTS = {"anomaly": "anomaly_map", "healed": "healed", "nll": "nll_map"}
CSV_FIELDS = ("image", "score_bits", "resampled_fraction", "map_max", "map_mean")


def restore_geometry(
    maps: Mapping[str, torch.Tensor], item: Mapping[str, Any], preprocessing: Callable, image_key: str = "image"
) -> dict[str, np.ndarray]:
    """Maps ``[1, H, W]`` of the network's size brought back to the input's 2D size by inverting ``preprocessing``
    (its pad or crop) with MONAI's ``Invertd``, as ``configs/inference.json`` does for reconstructions.

    Args:
        maps: name -> map of one preprocessed item.
        item: the preprocessed item; ``item[image_key]`` is the MetaTensor that records the transforms.
        preprocessing: the invertible ``Compose`` that made ``item``.
        image_key: the image's key.

    Returns:
        name -> float32 ``[H', W']`` array at the input's size.
    """
    data = {image_key: item[image_key], **{name: MetaTensor(value) for name, value in maps.items()}}
    inverter = Invertd(keys=list(maps), transform=preprocessing, orig_keys=image_key, nearest_interp=False)
    inverted = inverter(data)
    return {name: np.asarray(inverted[name].detach().cpu().float().numpy()[0], dtype=np.float32) for name in maps}


def save_like_source(array: np.ndarray, source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Writes a 2D ``array`` as float32 NIfTI with the shape (a trailing singleton axis included) and affine of
    the NIfTI file ``source``, atomically.

    Raises:
        ValueError: when ``array`` does not hold as many pixels as ``source``.
    """
    reference = nib.load(str(source))
    shape = tuple(int(s) for s in reference.shape)
    if int(np.prod(shape)) != array.size:
        raise ValueError(f"a map of shape {array.shape} does not fit '{source}' of shape {shape}.")
    data = np.ascontiguousarray(array.reshape(shape), dtype=np.float32)
    atomic_write_bytes(path, nifti_gz_bytes(data, np.asarray(reference.affine, dtype=np.float64)))


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _csv_bytes(rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def _grid_row(image: torch.Tensor, result: AnomalyOutput, map_scale: float) -> list[np.ndarray]:
    """input | healed | map | overlay of the first image of ``result``."""
    anomaly_map = result.anomaly_map[0, 0]
    return [
        to_uint8(image[0]),
        to_uint8(result.healed[0, 0]),
        to_uint8(anomaly_map, 0.0, map_scale),
        overlay(image[0], anomaly_map, map_scale),
    ]


def detect_folder(
    detector: AnomalyDetector,
    dataset: torch.utils.data.Dataset,
    preprocessing: Callable,
    output_dir: str | os.PathLike,
    grid_rows: int = 8,
    map_scale: float = 0.5,
    image_key: str = "image",
) -> list[dict]:
    """Anomaly maps of every item of ``dataset``, written beside a score table and a picture grid.

    For an input ``x.nii.gz``: ``x_anomaly.nii.gz`` (the anomaly map), ``x_healed.nii.gz`` (the healed slice in
    [0, 1]) and ``x_nll.nii.gz`` (bits of the codes covering each pixel), each with the input's shape and
    affine; then ``anomaly_scores.csv`` (one row per input: score in bits, fraction of pixels resampled, largest
    and mean map value) and ``anomaly_grid.png`` (input | healed | map | overlay of the first ``grid_rows``).

    Args:
        detector: the :class:`~bundle.anomaly.detection.AnomalyDetector`.
        dataset: items ``{image_key: MetaTensor [1, H, W]}`` from ``preprocessing`` (optionally ``"label"``).
        preprocessing: the invertible ``Compose`` of the items.
        output_dir: where the files go.
        grid_rows: images in the grid.
        map_scale: map value shown white (and fully red in the overlay).
        image_key: the image's key.

    Returns:
        The score table's rows.
    """
    output_dir = Path(output_dir)
    rows, grid = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        image = item[image_key]
        labels = torch.as_tensor([item["label"]]) if "label" in item else None
        plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        result = detector(plain[None], labels)
        maps = {name: getattr(result, field)[0] for name, field in OUTPUTS.items()}
        source = image.meta["filename_or_obj"]
        for name, array in restore_geometry(maps, item, preprocessing, image_key).items():
            save_like_source(array, source, output_dir / f"{_stem(source)}_{name}.nii.gz")
        rows.append(
            {
                "image": str(source),
                "score_bits": float(result.score[0]),
                "resampled_fraction": float(result.resampled[0].mean()),
                "map_max": float(result.anomaly_map[0].max()),
                "map_mean": float(result.anomaly_map[0].mean()),
            }
        )
        if len(grid) < grid_rows:
            grid.append(_grid_row(plain, result, map_scale))
    atomic_write_bytes(output_dir / "anomaly_scores.csv", _csv_bytes(rows))
    if grid:
        save_rgb_grid(output_dir / "anomaly_grid.png", grid)
    logger.info(f"Anomaly maps of {len(rows)} slices written to {output_dir.resolve()}")
    return rows
