"""A benchmark with known answers: synthetic lesions in normal test slices, scored by healing and by plain
reconstruction error side by side."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from bundle.anomaly.detection import AnomalyDetector
from bundle.anomaly.lesions import Lesion, insert_lesion
from bundle.anomaly.metrics import average_precision, best_dice, image_auroc
from bundle.engine.io import atomic_write_json, save_grid, to_uint8

__all__ = ["METHODS", "collect_maps", "method_metrics", "latency", "anomaly_benchmark"]

logger = logging.getLogger(__name__)

# the maps compared: healing with and without the gate, and the reconstruction-error baseline
METHODS = ("healing_gated", "healing_ungated", "reconstruction_error")


def _stack(dataset: torch.utils.data.Dataset, max_slices: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dataset's images ``[N, 1, H, W]`` and labels ``[N]`` (None without)."""
    count = len(dataset) if max_slices is None else min(len(dataset), int(max_slices))
    items = [dataset[i] for i in range(count)]
    images = torch.stack([torch.as_tensor(item["image"]).float() for item in items])
    labels = torch.as_tensor([int(item["label"]) for item in items]) if items and "label" in items[0] else None
    return images, labels


@torch.no_grad()
def collect_maps(
    detector: AnomalyDetector, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int
) -> dict[str, torch.Tensor]:
    """Every method's map ``[N, 1, H, W]``, the resampled pixels, the healed images and reconstructions, and the
    likelihood scores ``[N]`` of ``images``, in batches."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        batch_labels = None if labels is None else labels[start : start + batch_size]
        result = detector(images[start : start + batch_size], batch_labels)
        found = {
            "healing_gated": result.residual * result.resampled,
            "healing_ungated": result.residual,
            "reconstruction_error": result.reconstruction_error,
            "resampled": result.resampled,
            "healed": result.healed,
            "reconstruction": result.reconstruction,
            "score": result.score,
        }
        for key, value in found.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def method_metrics(lesioned: torch.Tensor, clean: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Pixel-level AUPRC and best Dice over the lesioned slices, and image-level AUROC of the largest map value
    (lesioned slices against the same slices clean).

    Args:
        lesioned: maps of the lesioned slices ``[N, 1, H, W]``.
        clean: maps of the clean slices ``[N, 1, H, W]``.
        masks: ground truth of the lesioned slices ``[N, 1, H, W]``.

    Returns:
        ``{"pixel_auprc", "best_dice", "best_dice_threshold", "image_auroc"}``.
    """
    dice, threshold = best_dice(lesioned, masks)
    peaks = torch.cat([lesioned.flatten(1).amax(1), clean.flatten(1).amax(1)])
    truth = torch.cat([torch.ones(len(lesioned)), torch.zeros(len(clean))])
    return {
        "pixel_auprc": average_precision(lesioned, masks),
        "best_dice": dice,
        "best_dice_threshold": threshold,
        "image_auroc": image_auroc(peaks, truth),
    }


def latency(function: Callable[[torch.Tensor], object], images: torch.Tensor, threads: int) -> dict[str, float]:
    """Wall time of ``function`` on one slice at a time with ``threads`` torch threads (one warm-up call first).

    Args:
        function: called with ``[1, 1, H, W]``.
        images: the slices ``[N, 1, H, W]`` timed, one call each.
        threads: ``torch.set_num_threads`` for the timing (restored afterwards).

    Returns:
        ``{"median_ms", "mean_ms", "max_ms", "slices", "threads"}``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        function(images[:1])
        times = []
        for image in images:
            start = time.perf_counter()
            function(image[None])
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    return {
        "median_ms": float(np.median(times)),
        "mean_ms": float(np.mean(times)),
        "max_ms": float(np.max(times)),
        "slices": len(times),
        "threads": threads,
    }


def _save_examples(
    path: Path, images: torch.Tensor, masks: torch.Tensor, maps: dict[str, torch.Tensor], scale: float
) -> None:
    """input with lesion | ground truth | healed | healing map (gated) | reconstruction | reconstruction error."""
    rows = [
        [
            to_uint8(images[i, 0]),
            to_uint8(masks[i, 0].float()),
            to_uint8(maps["healed"][i, 0]),
            to_uint8(maps["healing_gated"][i, 0], 0.0, scale),
            to_uint8(maps["reconstruction"][i, 0]),
            to_uint8(maps["reconstruction_error"][i, 0], 0.0, scale),
        ]
        for i in range(len(images))
    ]
    save_grid(path, rows)


def _detection_report(
    on_lesioned: dict[str, torch.Tensor], on_clean: dict[str, torch.Tensor], masks: torch.Tensor
) -> dict[str, dict[str, float]]:
    """:func:`method_metrics` of every method, the likelihood score's image-level AUROC, and how much of the
    lesions and of the slices the gate let through."""
    report = {method: method_metrics(on_lesioned[method], on_clean[method], masks) for method in METHODS}
    scores = torch.cat([on_lesioned["score"], on_clean["score"]])
    truth = torch.cat([torch.ones(len(masks)), torch.zeros(len(masks))])
    report["likelihood_score"] = {"image_auroc": image_auroc(scores, truth)}
    report["gate"] = {
        "lesion_pixels_resampled": float(on_lesioned["resampled"][masks].mean()),
        "pixels_resampled_lesioned": float(on_lesioned["resampled"].mean()),
        "pixels_resampled_clean": float(on_clean["resampled"].mean()),
    }
    return report


def _setup(detector: AnomalyDetector, lesions: Sequence[Lesion], masks: torch.Tensor, seed: int) -> dict:
    """The lesions and the detector's settings, for the report."""
    radii = np.array([max(lesion.radii) for lesion in lesions])
    return {
        "slices": len(lesions),
        "lesion_seed": seed,
        "bright_lesions": int(sum(lesion.bright for lesion in lesions)),
        "lesion_major_radius_px": {
            "min": float(radii.min()),
            "median": float(np.median(radii)),
            "max": float(radii.max()),
        },
        "lesion_pixel_fraction": float(masks.float().mean()),
        "thresholds_bits": list(detector.thresholds),
        "heal_levels": detector.levels,
        "gated": detector.gated,
        "sigma": detector.sigma,
        "temperature": detector.temperature,
        "map_image_score": "largest map value",
    }


def anomaly_benchmark(
    detector: AnomalyDetector,
    dataset: torch.utils.data.Dataset,
    output_dir: str | os.PathLike,
    seed: int = 0,
    batch_size: int = 8,
    max_slices: int | None = None,
    num_examples: int = 6,
    latency_slices: int = 4,
    latency_threads: int = 2,
    map_scale: float = 0.5,
) -> dict:
    """Insert a synthetic lesion into every test slice and score healing against reconstruction error.

    Every slice ``i`` gets the lesion of :func:`~bundle.anomaly.lesions.insert_lesion` ``(seed, i)``. Pixel-level
    AUPRC and best Dice are computed over the pixels of all lesioned slices pooled; image-level AUROC separates
    the lesioned slices from the same slices without the lesion, by the largest value of each map and by the
    detector's likelihood score. Writes ``anomaly_metrics.json`` and ``anomaly_examples.png`` (input with lesion
    | ground truth | healed | healing map | reconstruction | reconstruction error) to ``output_dir``.

    Args:
        detector: the :class:`~bundle.anomaly.detection.AnomalyDetector`.
        dataset: normal slices ``{"image": [1, H, W] in [0, 1]}`` (optionally ``"label"``).
        output_dir: where the JSON and the picture go.
        seed: the lesions' seed.
        batch_size: slices per detector call.
        max_slices: use only the first slices (None: all).
        num_examples: rows of the picture.
        latency_slices: lesioned slices timed one by one.
        latency_threads: torch threads for the timing.
        map_scale: map value shown white in the picture.

    Returns:
        The report written to ``anomaly_metrics.json``.
    """
    images, labels = _stack(dataset, max_slices)
    lesioned, masks, lesions = zip(*(insert_lesion(image, seed, i) for i, image in enumerate(images)))
    lesioned, masks = torch.stack(lesioned), torch.stack(masks)
    start = time.perf_counter()
    on_lesioned = collect_maps(detector, lesioned, labels, batch_size)
    on_clean = collect_maps(detector, images, labels, batch_size)
    elapsed = time.perf_counter() - start
    report = _detection_report(on_lesioned, on_clean, masks)
    timed = lesioned[: max(1, latency_slices)]
    report["latency"] = {
        "healing_map": latency(lambda x: detector(x, None if labels is None else labels[:1]), timed, latency_threads),
        "reconstruction_error_map": latency(detector.reconstruction_error, timed, latency_threads),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    report["setup"] = {**_setup(detector, lesions, masks, seed), "seconds_for_all_maps": elapsed}
    output_dir = Path(output_dir)
    atomic_write_json(output_dir / "anomaly_metrics.json", report)
    count = min(num_examples, len(images))
    if count:
        examples = {key: value[:count] for key, value in on_lesioned.items()}
        _save_examples(output_dir / "anomaly_examples.png", lesioned[:count], masks[:count], examples, map_scale)
    summary = {method: {key: round(value, 4) for key, value in report[method].items()} for method in METHODS}
    logger.info(f"Anomaly benchmark on {len(images)} slices: {summary}")
    return report
