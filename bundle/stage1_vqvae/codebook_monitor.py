"""An Ignite handler that keeps the VQ-VAE codebook healthy and logs its use over each epoch."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from bundle.evaluation.metrics import codebook_usage
from bundle.stage1_vqvae.codebook import find_quantizer, flatten_encodings, init_codebook, restart_dead_codes

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
