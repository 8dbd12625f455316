"""Evaluator handlers that write results: a metrics JSON summary and a reconstruction grid."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np
import torch
from ignite.engine import Engine, Events

from bundle.engine.io import atomic_write_json, save_grid, to_uint8

logger = logging.getLogger(__name__)


def _batch_names(batch: Any, key: str) -> list[str] | None:
    """The source file of each image in a batch (collated or decollated), or None when unknown."""
    items = batch if isinstance(batch, list) else [batch]
    names: list[str] = []
    for item in items:
        meta = getattr(item.get(key) if isinstance(item, dict) else None, "meta", None) or {}
        found = meta.get("filename_or_obj")
        if found is None:
            return None
        names += [str(n) for n in found] if isinstance(found, (list, tuple)) else [str(found)]
    return names


class MetricsJSONWriter:
    """Writes chosen ``engine.state.metrics`` and the number of images they average to a JSON file when the run
    completes.

    MONAI's metrics leave NaN values (an image whose reconstruction is NaN) out of their means. Where per-image
    values are kept (``save_details``), every mean here is taken over the same images, those whose values are
    finite for every metric, ``n_images`` counts exactly those, and the others are listed under ``"skipped"`` by
    file, logged, and recorded in ``file_errors`` (whose ``raise_if_any`` then fails the run). Files that
    ``file_errors`` skipped before evaluation are listed too.

    Args:
        path: output JSON path (written atomically).
        metric_names: mapping of JSON key to metric name in ``engine.state.metrics``.
        extra: further constant entries (e.g. the checkpoint evaluated).
        batch_size_fn: gives the number of images in a batch; default ``len(batch["image"])``.
        file_errors: a :class:`~bundle.engine.file_errors.FileErrors` to report skipped images to.
        image_key: the batch key whose metadata names each image's file.
    """

    def __init__(
        self,
        path: str,
        metric_names: dict[str, str],
        extra: dict | None = None,
        batch_size_fn: Callable | None = None,
        file_errors: Any = None,
        image_key: str = "image",
    ) -> None:
        self.path, self.metric_names, self.extra = path, metric_names, extra or {}
        self.batch_size_fn = batch_size_fn or (
            lambda batch: len(batch["image"]) if isinstance(batch, dict) else len(batch)
        )
        self.file_errors, self.image_key = file_errors, image_key
        self.n_images = 0
        self.names: list[str] | None = []

    def attach(self, engine: Engine) -> None:
        """Registers the counting and writing events."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.n_images, self.names = 0, []

    def _count(self, engine: Engine) -> None:
        self.n_images += self.batch_size_fn(engine.state.batch)
        names = _batch_names(engine.state.batch, self.image_key)
        self.names = None if names is None or self.names is None else self.names + names

    def _details(self, engine: Engine) -> dict[str, torch.Tensor] | None:
        """Per-image values ``[N]`` of each metric, or None when a metric kept none."""
        kept = getattr(engine.state, "metric_details", {}) or {}
        details = {}
        for key, name in self.metric_names.items():
            values = kept.get(name)
            if values is None:
                return None
            values = torch.as_tensor(values).float()
            if values.shape[0] != self.n_images:
                return None
            details[key] = values.reshape(self.n_images, -1)
        return details

    def _summary(self, engine: Engine) -> tuple[dict[str, float], int, list[str]]:
        details = self._details(engine)
        if details is None:  # no per-image values: MONAI's means over the images it kept
            return {k: float(engine.state.metrics[n]) for k, n in self.metric_names.items()}, self.n_images, []
        finite = torch.ones(self.n_images, dtype=torch.bool)
        for values in details.values():
            finite &= torch.isfinite(values).all(dim=1)
        names = self.names if self.names is not None else [f"image #{i}" for i in range(self.n_images)]
        dropped = [names[i] for i in torch.nonzero(~finite).flatten().tolist()]
        means = {k: float(v[finite].mean()) if finite.any() else float("nan") for k, v in details.items()}
        return means, int(finite.sum()), dropped

    def _write(self, engine: Engine) -> None:
        means, count, dropped = self._summary(engine)
        skipped = dict(getattr(self.file_errors, "skipped", {}))
        for name in dropped:
            reason = "non-finite metric values (its reconstruction holds NaN?); left out of every mean"
            skipped[name] = reason
            if self.file_errors is not None:
                self.file_errors.add(name, reason)
            else:
                logger.error(f"'{name}': {reason}")
        content = {**means, **self.extra, "n_images": count}
        if skipped:
            content["skipped"] = skipped
        atomic_write_json(self.path, content)
        logger.info(f"Metrics written to {os.path.abspath(self.path)}: {content}")


class ReconstructionGridWriter:
    """Saves a PNG grid of original | reconstruction | absolute error for the first images an evaluator sees.

    Args:
        path: output PNG path.
        num_images: number of rows.
        image_key: batch key of the originals.
        error_scale: the error map is shown over ``[0, error_scale]`` so small errors stay visible.
    """

    def __init__(self, path: str, num_images: int = 6, image_key: str = "image", error_scale: float = 0.25) -> None:
        self.path, self.num_images, self.image_key, self.error_scale = path, num_images, image_key, error_scale
        self.rows: list[list[np.ndarray]] = []

    def attach(self, engine: Engine) -> None:
        """Registers the collecting and writing events."""
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        if len(self.rows) >= self.num_images:
            return
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        for item in items:
            if len(self.rows) >= self.num_images:
                break
            originals, predictions = item[self.image_key], item["pred"]
            if originals.ndim == 3:  # decollated: one image per item
                originals, predictions = originals[None], predictions[None]
            for original, prediction in zip(originals, predictions):
                if len(self.rows) >= self.num_images:
                    break
                original, prediction = original[0].float().cpu(), prediction[0].float().cpu()
                error = (original - prediction).abs()
                self.rows.append([to_uint8(original), to_uint8(prediction), to_uint8(error, 0.0, self.error_scale)])

    def _write(self, engine: Engine) -> None:
        if self.rows:
            save_grid(self.path, self.rows)
            logger.info(f"Reconstruction grid written to {os.path.abspath(self.path)}")
