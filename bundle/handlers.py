"""Ignite handlers that MONAI lacks: codebook health, a metrics JSON summary and a reconstruction grid."""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from collections.abc import Mapping

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from bundle.codebook import find_quantizer, flatten_encodings, init_codebook, restart_dead_codes
from bundle.metrics import codebook_usage
from bundle.utils import atomic_write_json, prune_checkpoints, save_grid, save_image_grid, to_uint8

logger = logging.getLogger(__name__)


class CodebookMonitor:
    """Watches the VQ-VAE's quantiser during training: usage over each whole epoch, init and dead-code restart.

    Per-batch perplexity (what MONAI's ``VectorQuantizer.perplexity`` holds) hides collapse: each batch can use
    a few codes while the epoch as a whole uses the same few. This handler counts code use over the epoch and
    writes ``codebook_usage`` (fraction of codes used), ``codebook_perplexity``, ``codebook_dead`` and
    ``codebook_restarted`` (codes restarted during the epoch) into ``engine.state.metrics``, where
    ``StatsHandler`` and ``TensorBoardStatsHandler`` find them. Attach it before those handlers so they log
    the current epoch.

    Args:
        network: the VQ-VAE being trained (DDP-wrapped or not).
        init_from_data: on a fresh start (iteration 0), set the codebook by k-means on the first batch's
            encoder outputs before it is quantised.
        restart_dead: move codes unused for ``restart_interval`` iterations onto recent encoder outputs.
        restart_interval: iterations between dead-code checks. Early in training the encoder moves fast and
            codes die within a few steps, so waiting for a whole epoch wastes most of the codebook.
        pool_size: how many recent encoder output vectors to keep for restarts.
        seed: seed of the handler's own random generator (restarts and k-means seeding).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        init_from_data: bool = True,
        restart_dead: bool = True,
        restart_interval: int = 10,
        pool_size: int = 8192,
        seed: int = 0,
    ) -> None:
        self.quantizer = find_quantizer(network)
        self.init_from_data, self.restart_dead = init_from_data, restart_dead
        self.restart_interval, self.pool_size = restart_interval, pool_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_counts = torch.zeros(self.quantizer.num_embeddings, dtype=torch.long)
        self.window_counts = torch.zeros_like(self.epoch_counts)
        self.pool: list[torch.Tensor] = []
        self.restarted = 0
        self.pending_init = False

    def attach(self, engine: Engine) -> None:
        """Registers the quantiser hooks and the engine events."""
        # The hooks keep Python state (pool, generator, flags): under torch.compile they must run eagerly, as
        # graph breaks, rather than be traced into the network's graph.
        self.quantizer.register_forward_pre_hook(torch.compiler.disable(self._before_quantize))
        self.quantizer.register_forward_hook(torch.compiler.disable(self._after_quantize))
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_restart)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _reset(self, engine: Engine) -> None:
        # Decided here rather than at STARTED so that a resumed run, whose CheckpointLoader may run after this
        # handler's STARTED, keeps its trained codebook.
        self.pending_init = self.init_from_data and engine.state.iteration == 0
        self.epoch_counts.zero_()
        self.restarted = 0

    def _before_quantize(self, module: torch.nn.Module, args: tuple) -> None:
        if module.training and self.pending_init:
            init_codebook(self.quantizer, args[0], generator=self.generator)
            self.pending_init = False
            logger.info(f"Codebook initialised by k-means on {flatten_encodings(args[0]).shape[0]} encoder outputs.")

    def _after_quantize(self, module: torch.nn.Module, args: tuple, output: tuple) -> None:
        if not module.training:
            return
        counts = torch.bincount(output[2].detach().flatten().cpu(), minlength=self.epoch_counts.numel())
        self.epoch_counts += counts
        self.window_counts += counts
        vectors = flatten_encodings(args[0])
        keep = torch.randperm(vectors.shape[0], generator=self.generator)[: max(1, self.pool_size // 16)]
        self.pool.append(vectors[keep.to(vectors.device)])
        while sum(p.shape[0] for p in self.pool) > self.pool_size and len(self.pool) > 1:
            self.pool.pop(0)

    def _maybe_restart(self, engine: Engine) -> None:
        if not self.restart_dead or engine.state.iteration % self.restart_interval != 0 or not self.pool:
            return
        counts = _sum_over_ranks(self.window_counts, self.quantizer.embedding.weight.device)
        self.restarted += restart_dead_codes(self.quantizer, counts, torch.cat(self.pool), generator=self.generator)
        self.window_counts.zero_()

    def _epoch_completed(self, engine: Engine) -> None:
        stats = codebook_usage(_sum_over_ranks(self.epoch_counts, self.quantizer.embedding.weight.device))
        metrics = {
            "codebook_usage": stats["usage"],
            "codebook_perplexity": stats["perplexity"],
            "codebook_dead": stats["dead"],
            "codebook_restarted": self.restarted,
        }
        engine.state.metrics.update(metrics)
        logger.info("Epoch %d codebook: %s", engine.state.epoch, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def _sum_over_ranks(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return counts.clone()
    total = counts.to(device)
    dist.all_reduce(total)
    return total.cpu()


class _AtomicDiskSaver(DiskSaver):
    """Ignite's atomic DiskSaver (temporary file, then rename) with MONAI's fixed-filename option.

    MONAI's ``CheckpointSaver`` turns atomic saving off because the temporary file is created user-only
    (0600); a kill during ``torch.save`` then leaves a truncated ``model.pt``. This keeps the rename and
    restores ordinary permissions afterwards.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        if idist.get_rank() != self.save_on_rank:  # ignite saved nothing on this rank
            return
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(self.dirname, filename), 0o666 & ~umask)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose every file is written atomically, and whose best key-metric score
    survives a restart.

    Ignite's ``Checkpoint`` only remembers the scores of the process that saved them, so after a resume the first
    validation, however poor, would replace the best model. The best score is kept beside the file
    (``.<key_metric_filename>.best.json``) and reloaded when ``resume_best`` is true (a resumed run).

    Args:
        resume_best: reload the best score saved beside the key-metric file.
        args, kwargs: those of ``monai.handlers.CheckpointSaver``.
    """

    def __init__(self, *args, resume_best: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, checkpoint.save_handler.filename)
        self._best_path = None
        if self._key_metric_checkpoint is not None:
            name = self._key_metric_checkpoint.save_handler.filename or "key_metric"
            self._best_path = os.path.join(self.save_dir, f".{name}.best.json")
            if resume_best and os.path.isfile(self._best_path) and os.path.isfile(os.path.join(self.save_dir, name)):
                with open(self._best_path) as f:
                    best = json.load(f)
                self._key_metric_checkpoint._saved = [Checkpoint.Item(best["priority"], best["filename"])]

    def metrics_completed(self, engine: Engine) -> None:
        super().metrics_completed(engine)
        saved = self._key_metric_checkpoint._saved if self._key_metric_checkpoint is not None else []
        if saved and idist.get_rank() == 0:  # ignite saves on rank 0 only
            atomic_write_json(self._best_path, {"priority": float(saved[-1].priority), "filename": saved[-1].filename})


class EngineCheckpointSaver(AtomicCheckpointSaver):
    """Atomic ``CheckpointSaver`` that also saves the engine it is attached to (epoch, iteration) under ``engine_key``.

    A config cannot list ``"trainer": "@train::trainer"`` in a handler of that same trainer (a circular
    reference); the engine is known at ``attach``, so it is added there. Older numbered checkpoints beyond
    ``n_saved`` are deleted even when an earlier (killed or finished) run wrote them.
    Other arguments: ``CheckpointSaver``.
    """

    def __init__(self, *args, engine_key: str = "trainer", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        # Ignite's Checkpoint keeps a reference to this dict, so the engine is saved from now on.
        self.save_dict[self.engine_key] = engine
        super().attach(engine)

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        checkpoint = self._interval_checkpoint
        if checkpoint.n_saved and idist.get_rank() == 0:  # ignite saves on rank 0 only
            prefix = f"{checkpoint.filename_prefix}_checkpoint" if checkpoint.filename_prefix else "checkpoint"
            prune_checkpoints(self.save_dir, keep=checkpoint.n_saved, prefix=prefix)


class EngineCheckpointLoader(CheckpointLoader):
    """``CheckpointLoader`` that also restores the engine it is attached to from ``engine_key``, to resume.

    Other arguments: ``CheckpointLoader``; a missing ``load_path`` is an error, so disable it for a fresh start.
    """

    def __init__(self, *args, engine_key: str = "trainer", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        self.load_dict[self.engine_key] = engine
        super().attach(engine)


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


class SampleGridWriter:
    """Every ``interval`` epochs (and at the end), samples slices from the prior and logs them as a grid.

    Args:
        vqvae: the frozen VQ-VAE that decodes the codes.
        prior: the prior being trained (DDP-wrapped or not).
        latent_shape: code map shape.
        path: PNG path, overwritten each time (the newest grid).
        log_dir: TensorBoard folder for an image ``prior_samples`` per epoch; None disables.
        num_samples: slices per grid.
        interval: epochs between grids; 0 only at the end.
        temperature: prior temperature.
        seed: fixed, so that successive grids show the same random draws as the prior learns.
    """

    def __init__(
        self,
        vqvae: torch.nn.Module,
        prior: torch.nn.Module,
        latent_shape: tuple[int, int],
        path: str,
        log_dir: str | None = None,
        num_samples: int = 8,
        interval: int = 5,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.vqvae, self.prior = vqvae, getattr(prior, "module", prior)
        self.latent_shape, self.path, self.log_dir = tuple(latent_shape), path, log_dir
        self.num_samples, self.interval, self.temperature, self.seed = num_samples, interval, temperature, seed

    def attach(self, engine: Engine) -> None:
        """Registers the sampling events."""
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from bundle.generation import generate

        images, _ = generate(self.vqvae, self.prior, self.num_samples, self.latent_shape, self.temperature, self.seed)
        save_image_grid(self.path, images)
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(self.log_dir) as writer:
                # Transposed like the PNG grid: anterior up.
                writer.add_images("prior_samples", images.transpose(-1, -2), engine.state.epoch)
        logger.info(f"Epoch {engine.state.epoch}: prior samples written to {os.path.abspath(self.path)}")


class NonFiniteGuard:
    """Stops (or skips the batch) when the loss or a gradient is NaN/Inf, before the optimizer step.

    It acts at ``BACKWARD_COMPLETED``, between ``backward()`` and ``optimizer.step()``, so a bad batch never
    reaches the weights. The network's non-trainable state (the VQ-VAE's EMA codebook, which moves inside the
    forward pass) is snapshotted at each iteration start and restored, so the checkpoint MONAI's savers write on
    the way out holds the last good values.

    Args:
        network: the trained network.
        mode: ``"stop"`` raises ``FloatingPointError`` naming the epoch and iteration; ``"skip"`` drops the
            batch's update, counts it in ``engine.state.metrics["nonfinite_skipped"]`` and goes on.
        max_skips: in ``"skip"`` mode, stop once more than this many batches were skipped in the run.
    """

    def __init__(self, network: torch.nn.Module, mode: str = "stop", max_skips: int = 10) -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"mode must be 'stop' or 'skip', got '{mode}'.")
        self.network, self.mode, self.max_skips = network, mode, max_skips
        self.state_tensors = [b for b in network.buffers()] + [p for p in network.parameters() if not p.requires_grad]
        self.snapshot: list[torch.Tensor] = []
        self.skipped = 0

    def attach(self, engine: Engine) -> None:
        """Registers the snapshot and check events."""
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(Events.ITERATION_STARTED, self._snapshot)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._check)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _snapshot(self, engine: Engine) -> None:
        self.snapshot = [t.detach().clone() for t in self.state_tensors]

    def _finite(self, engine: Engine) -> bool:
        loss = engine.state.output["loss"]
        if not torch.isfinite(loss).all():
            return False
        return all(torch.isfinite(p.grad).all() for p in self.network.parameters() if p.grad is not None)

    def _check(self, engine: Engine) -> None:
        if self._finite(engine):
            return
        with torch.no_grad():
            for tensor, saved in zip(self.state_tensors, self.snapshot):
                tensor.copy_(saved)
        engine.optimizer.zero_grad(set_to_none=True)
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        if self.mode == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            logger.warning(f"Non-finite loss or gradient at {where}: batch skipped ({self.skipped} so far).")
            return
        raise FloatingPointError(
            f"Non-finite loss or gradient at {where} (loss={engine.state.output['loss'].item()}); stopped before "
            "the optimizer step, so the weights and saved checkpoints hold the last finite values. Check the data "
            "and the learning rate; set nonfinite_mode to 'skip' to drop such batches instead."
        )

    def _report(self, engine: Engine) -> None:
        engine.state.metrics["nonfinite_skipped"] = self.skipped
