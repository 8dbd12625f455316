"""Evaluator handlers that write results: a metrics JSON summary and a reconstruction grid."""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
from ignite.engine import Engine, Events

from bundle.engine.io import atomic_write_json, save_grid, to_uint8

logger = logging.getLogger(__name__)

class MetricsJSONWriter:
    """Writes chosen ``engine.state.metrics`` and the number of images seen to a JSON file when the run completes.

    Args:
        path: output JSON path (written atomically).
        metric_names: mapping of JSON key to metric name in ``engine.state.metrics``.
        extra: further constant entries (e.g. the checkpoint evaluated).
        batch_size_fn: gives the number of images in a batch; default ``len(batch["image"])``.
    """

    def __init__(
        self,
        path: str,
        metric_names: dict[str, str],
        extra: dict | None = None,
        batch_size_fn: Callable | None = None,
    ) -> None:
        self.path, self.metric_names, self.extra = path, metric_names, extra or {}
        self.batch_size_fn = batch_size_fn or (lambda batch: len(batch["image"]) if isinstance(batch, dict) else len(batch))
        self.n_images = 0

    def attach(self, engine: Engine) -> None:
        """Registers the counting and writing events."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.n_images = 0

    def _count(self, engine: Engine) -> None:
        self.n_images += self.batch_size_fn(engine.state.batch)

    def _write(self, engine: Engine) -> None:
        content = {key: float(engine.state.metrics[name]) for key, name in self.metric_names.items()}
        content.update(self.extra, n_images=self.n_images)
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
