"""A training guard that stops (or skips the batch) on a non-finite loss or gradient."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)

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
