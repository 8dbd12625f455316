"""An Ignite handler that keeps every VQ-VAE codebook healthy and logs its use over each epoch."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.networks.layers.vector_quantizer import EMAQuantizer

from bundle.evaluation.metrics import codebook_usage
from bundle.stage1_vqvae.codebook import find_quantizers, flatten_encodings, init_codebook, restart_dead_codes

logger = logging.getLogger(__name__)


class QuantizerWatch:
    """One quantiser's share of :class:`CodebookMonitor`: code counts, recent encoder outputs, pending init.

    The forward hooks run on every training step, so they never read device values on the host: counts and
    pool stay on the quantiser's device and are read only at restart checks and at the end of an epoch.

    Args:
        quantizer: the EMA quantiser to watch.
        name: its level name (empty for a single-level VQ-VAE).
        pool_size: how many recent encoder output vectors to keep for restarts.
        seed: seed of the generator that picks the vectors kept in the pool (one per device).
        generator: CPU generator for k-means seeding and restarts (may be shared between watches).
    """

    def __init__(
        self, quantizer: EMAQuantizer, name: str, pool_size: int, seed: int, generator: torch.Generator
    ) -> None:
        self.quantizer, self.name, self.pool_size, self.seed = quantizer, name, pool_size, seed
        self.generator = generator
        device = quantizer.embedding.weight.device
        self.epoch_counts = torch.zeros(quantizer.num_embeddings, dtype=torch.long, device=device)
        self.window_counts = torch.zeros_like(self.epoch_counts)
        self.pool: list[torch.Tensor] = []
        self.restarted = 0
        self.pending_init = False
        self.pool_generators: dict[torch.device, torch.Generator] = {}

    def reset_epoch(self, init_from_data: bool) -> None:
        """Zeroes the epoch's counts; ``init_from_data`` schedules a k-means init at the next training forward."""
        self.pending_init = init_from_data
        self.epoch_counts.zero_()
        self.restarted = 0

    def before_quantize(self, module: torch.nn.Module, args: tuple) -> None:
        """Forward pre-hook: k-means initialisation of the codebook from its first training inputs."""
        if module.training and self.pending_init:
            init_codebook(self.quantizer, args[0], generator=self.generator)
            self.pending_init = False
            vectors = flatten_encodings(args[0]).shape[0]
            codebook = f"{self.name} codebook" if self.name else "Codebook"
            logger.info(f"{codebook} initialised by k-means on {vectors} encoder outputs.")

    def after_quantize(self, module: torch.nn.Module, args: tuple, output: tuple) -> None:
        """Forward hook: counts the codes chosen (``output[2]``) and keeps a sample of the inputs."""
        if not module.training:
            return
        indices = output[2].detach().flatten()
        if self.epoch_counts.device != indices.device:
            self.epoch_counts = self.epoch_counts.to(indices.device)
            self.window_counts = self.window_counts.to(indices.device)
        ones = torch.ones_like(indices)
        self.epoch_counts.index_add_(0, indices, ones)
        self.window_counts.index_add_(0, indices, ones)
        self._remember(flatten_encodings(args[0]))

    def _remember(self, vectors: torch.Tensor) -> None:
        generator = self.pool_generators.get(vectors.device)
        if generator is None:
            generator = torch.Generator(vectors.device).manual_seed(self.seed)
            self.pool_generators[vectors.device] = generator
        keep = torch.randperm(vectors.shape[0], device=vectors.device, generator=generator)
        self.pool.append(vectors[keep[: max(1, self.pool_size // 16)]])
        while sum(p.shape[0] for p in self.pool) > self.pool_size and len(self.pool) > 1:
            self.pool.pop(0)

    def restart(self) -> None:
        """Restarts the codes unused since the last check (over all ranks) and starts a new window."""
        if not self.pool:
            return
        counts = sum_over_ranks(self.window_counts)
        self.restarted += restart_dead_codes(self.quantizer, counts, torch.cat(self.pool), generator=self.generator)
        self.window_counts.zero_()

    def epoch_metrics(self) -> dict[str, float]:
        """Usage, perplexity, dead and restarted codes over the epoch, summed over ranks."""
        stats = codebook_usage(sum_over_ranks(self.epoch_counts))
        return {
            "usage": stats["usage"],
            "perplexity": stats["perplexity"],
            "dead": stats["dead"],
            "restarted": self.restarted,
        }


class CodebookMonitor:
    """Watches every quantiser of a VQ-VAE during training: usage over each whole epoch, init and dead-code restart.

    Per-batch perplexity (what MONAI's ``VectorQuantizer.perplexity`` holds) hides collapse: each batch can use
    a few codes while the epoch as a whole uses the same few. This handler counts code use over the epoch and
    writes, for a single quantiser, ``codebook_usage`` (fraction of codes used), ``codebook_perplexity``,
    ``codebook_dead`` and ``codebook_restarted`` (codes restarted during the epoch) into ``engine.state.metrics``,
    where ``StatsHandler`` and ``TensorBoardStatsHandler`` find them. With several quantisers each level's name
    goes after ``codebook_``: ``codebook_top_usage``, ``codebook_bottom_usage``, ... (names from
    :func:`~bundle.stage1_vqvae.codebook.find_quantizers`). Attach it before those handlers so they log the
    current epoch.

    Args:
        network: the VQ-VAE being trained (DDP-wrapped or not).
        init_from_data: on a fresh start (iteration 0), set each codebook by k-means on its first training inputs
            before they are quantised (the top codebook first, so the bottom one sees initialised top codes).
        restart_dead: move codes unused for ``restart_interval`` iterations onto recent encoder outputs.
        restart_interval: iterations between dead-code checks. Early in training the encoder moves fast and
            codes die within a few steps, so waiting for a whole epoch wastes most of the codebook.
        pool_size: how many recent encoder output vectors to keep per quantiser for restarts.
        seed: seed of the handler's own random generators (restarts, k-means seeding, pool sampling).
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
        quantizers = find_quantizers(network)
        single = len(quantizers) == 1
        self.generator = torch.Generator().manual_seed(seed)
        self.watches = [
            QuantizerWatch(quantizer, "" if single else name, pool_size, seed + index, self.generator)
            for index, (name, quantizer) in enumerate(quantizers.items())
        ]
        self.init_from_data, self.restart_dead, self.restart_interval = init_from_data, restart_dead, restart_interval

    @property
    def epoch_counts(self) -> torch.Tensor:
        """Per-code use over the current epoch on this rank, the quantisers' counts concatenated in order."""
        return torch.cat([watch.epoch_counts for watch in self.watches])

    def attach(self, engine: Engine) -> None:
        """Registers the quantiser hooks and the engine events."""
        for watch in self.watches:
            # The hooks keep Python state (pool, generators, flags): under torch.compile they must run eagerly,
            # as graph breaks, rather than be traced into the network's graph.
            watch.quantizer.register_forward_pre_hook(torch.compiler.disable(watch.before_quantize))
            watch.quantizer.register_forward_hook(torch.compiler.disable(watch.after_quantize))
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_restart)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _reset(self, engine: Engine) -> None:
        # Decided here rather than at STARTED so that a resumed run, whose CheckpointLoader may run after this
        # handler's STARTED, keeps its trained codebook.
        for watch in self.watches:
            watch.reset_epoch(self.init_from_data and engine.state.iteration == 0)

    def _maybe_restart(self, engine: Engine) -> None:
        if self.restart_dead and engine.state.iteration % self.restart_interval == 0:
            for watch in self.watches:
                watch.restart()

    def _epoch_completed(self, engine: Engine) -> None:
        metrics = {
            "_".join(filter(None, ("codebook", watch.name, key))): value
            for watch in self.watches
            for key, value in watch.epoch_metrics().items()
        }
        engine.state.metrics.update(metrics)
        logger.info("Epoch %d codebook: %s", engine.state.epoch, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` summed over all distributed ranks (a copy, on the same device)."""
    total = counts.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total
