"""A training guard against NaN/Inf losses and gradients that keeps the finiteness checks on the device."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

logger = logging.getLogger(__name__)

# Slots of the on-device counter vector.
BAD_STEPS, FIRST_BAD, STREAK, WORST_STREAK = range(4)


class NonFiniteGuard:
    """Keeps NaN/Inf losses and gradients out of the weights, with no host synchronisation per step where possible.

    Each step it computes on the device whether the loss and the gradients are finite (``torch.isfinite`` and the
    max-norm of the gradients from ``torch.nn.utils.get_total_norm``, which cannot overflow) and accumulates the
    outcome in a small counter tensor. The host reads that tensor (one synchronisation) every ``check_interval``
    iterations and at each epoch end, and acts then. What happens to a bad step depends on the engine:

    - **GradScaler active** (MONAI's ``amp=True`` on CUDA): the scaler already skips steps with inf/NaN gradients
      and lowers its scale; the guard counts those skips (``engine.state.metrics["grad_scaler_skipped"]``, with
      ``"grad_scale"``) and stops only on divergence: a non-finite loss for ``max_nonfinite_streak`` consecutive
      steps, or the scale falling below ``min_grad_scale``. No synchronisation per step.
    - **No scaler, fused optimizer** (``torch.optim.Adam(..., fused=True)`` and others whose
      ``_step_supports_amp_scaling`` is set): the guard hands the optimizer its ``found_inf`` flag, the protocol
      ``GradScaler`` uses, so the fused kernel skips the update (weights, moments and step count) on the device.
      No synchronisation per step; a ``"stop"`` is raised at the next read, naming the first bad iteration.
    - **No scaler, other optimizers**: zeroing gradients on the device would not make a momentum optimizer's step a
      no-op, so the host reads the finiteness flag before the step: exactly one synchronisation per step. A bad
      batch's gradients are dropped (``zero_grad(set_to_none=True)``, so the optimizer leaves those parameters and
      its state untouched) and the guard stops or skips at once.

    The network's non-trainable state (the VQ-VAE's EMA codebook, which moves inside the forward pass) is copied at
    each iteration start and put back, on the device, after a bad step. Gradient accumulation is not supported.

    Args:
        network: the trained network.
        mode: without a scaler: ``"stop"`` raises ``FloatingPointError`` naming the epoch and iteration; ``"skip"``
            drops the batch's update, counts it in ``engine.state.metrics["nonfinite_skipped"]`` and goes on.
        max_skips: in ``"skip"`` mode, stop once more than this many batches were skipped in the run.
        check_interval: iterations between reads of the on-device counters (besides each epoch end); 0 reads only
            at epoch ends.
        max_nonfinite_streak: with a GradScaler, stop when the loss was non-finite for this many consecutive steps.
        min_grad_scale: with a GradScaler, stop when its scale falls below this (gradients overflow at any scale).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        mode: str = "stop",
        max_skips: int = 10,
        check_interval: int = 100,
        max_nonfinite_streak: int = 5,
        min_grad_scale: float = 2.0**-10,
    ) -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"mode must be 'stop' or 'skip', got '{mode}'.")
        self.network, self.mode, self.max_skips, self.check_interval = network, mode, max_skips, check_interval
        self.max_nonfinite_streak, self.min_grad_scale = max_nonfinite_streak, min_grad_scale
        self.state_tensors = [b for b in network.buffers()] + [p for p in network.parameters() if not p.requires_grad]
        self.snapshot: list[torch.Tensor] = []
        self.skipped = 0
        self.scaler_skipped = 0
        self.last_scale: float | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.counters: torch.Tensor | None = None
        self.scale_before_step: torch.Tensor | None = None
        self.found_inf_given = False

    def attach(self, engine: Engine) -> None:
        """Registers the per-step handlers and the counter reads."""
        engine.add_event_handler(Events.ITERATION_STARTED, self.save_state)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.check_step)
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self.after_step)
        if self.check_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.check_interval), self.read_counters)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.read_counters)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.report)

    def save_state(self, engine: Engine) -> None:
        """Copies the non-trainable state before the forward pass may change it."""
        if not self.snapshot:
            self.snapshot = [t.detach().clone() for t in self.state_tensors]
        else:
            torch._foreach_copy_(self.snapshot, [t.detach() for t in self.state_tensors])

    def check_step(self, engine: Engine) -> None:
        """Between ``backward()`` and the optimizer step: judges this step on the device."""
        loss = engine.state.output[CommonKeys.LOSS].detach()
        scaler = getattr(engine, "scaler", None)
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if self.scaler is not None:
            self._watch_scaler(engine, loss)
        elif getattr(engine.optimizer, "_step_supports_amp_scaling", False):
            self._mask_step(engine, loss)
        else:
            self._drop_on_host(engine, loss)

    def after_step(self, engine: Engine) -> None:
        """After the optimizer step: counts a step the GradScaler skipped; takes back the ``found_inf`` flag."""
        if self.found_inf_given:
            del engine.optimizer.found_inf
            self.found_inf_given = False
        if self.scaler is not None and self.scale_before_step is not None:
            self._count_bad(self.scaler._get_scale_async() < self.scale_before_step, engine.state.iteration)
            self.scale_before_step = None

    def read_counters(self, engine: Engine) -> None:
        """Reads the on-device counters (one host synchronisation) and stops or reports as they say."""
        if self.counters is None:
            return
        parts = [self.counters.double()]
        if self.scaler is not None:
            parts.append(self.scaler._get_scale_async().double().view(1))
        values = torch.cat(parts).tolist()
        self.counters[FIRST_BAD].fill_(-1)
        self.counters[WORST_STREAK].copy_(self.counters[STREAK])
        if self.scaler is not None:
            self._judge_scaled(engine, values)
        else:
            self._judge_masked(engine, int(values[BAD_STEPS]), int(values[FIRST_BAD]))

    def report(self, engine: Engine) -> None:
        """Puts the counts into ``engine.state.metrics`` (read at this epoch end)."""
        engine.state.metrics["nonfinite_skipped"] = self.skipped
        if self.scaler is not None:
            engine.state.metrics["grad_scaler_skipped"] = self.scaler_skipped
            engine.state.metrics["grad_scale"] = self.last_scale

    def _finite(self, loss: torch.Tensor) -> torch.Tensor:
        grads = [p.grad for p in self.network.parameters() if p.grad is not None]
        finite = torch.isfinite(loss).all()
        if grads:
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf")))
        return finite

    def _watch_scaler(self, engine: Engine, loss: torch.Tensor) -> None:
        loss_finite = torch.isfinite(loss).all()
        self._restore_state_where_not(loss_finite)
        counters = self._counters_on(loss.device)
        streak = (counters[STREAK] + 1) * (~loss_finite)
        counters[STREAK].copy_(streak)
        counters[WORST_STREAK].copy_(torch.maximum(counters[WORST_STREAK], streak))
        self.scale_before_step = self.scaler._get_scale_async().clone()

    def _mask_step(self, engine: Engine, loss: torch.Tensor) -> None:
        finite = self._finite(loss)
        engine.optimizer.found_inf = (~finite).float()  # the fused kernel skips the whole update when it is 1
        self.found_inf_given = True
        self._restore_state_where_not(finite)
        self._counters_on(loss.device)
        self._count_bad(~finite, engine.state.iteration)

    def _drop_on_host(self, engine: Engine, loss: torch.Tensor) -> None:
        if bool(self._finite(loss)):  # the one host synchronisation per step on this path
            return
        with torch.no_grad():
            torch._foreach_copy_([t.detach() for t in self.state_tensors], self.snapshot)
        engine.optimizer.zero_grad(set_to_none=True)
        where = self._where(engine, engine.state.iteration)
        if self.mode == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            logger.warning(f"Non-finite loss or gradient at {where}: batch skipped ({self.skipped} so far).")
            return
        raise FloatingPointError(
            f"Non-finite loss or gradient at {where} (loss={loss.item()}); stopped before the optimizer step, so the "
            "weights and saved checkpoints hold the last finite values. Check the data and the learning rate; set "
            "nonfinite_mode to 'skip' to drop such batches instead."
        )

    def _counters_on(self, device: torch.device) -> torch.Tensor:
        if self.counters is None:  # filled on the device: a copy from the host would synchronise
            self.counters = torch.zeros(4, dtype=torch.int64, device=device)
            self.counters[FIRST_BAD].fill_(-1)
        return self.counters

    def _count_bad(self, bad: torch.Tensor, iteration: int) -> None:
        counters = self.counters
        counters[BAD_STEPS].add_(bad.long())
        first = counters[FIRST_BAD]
        first.copy_(torch.where(bad & (first < 0), iteration, first))

    def _restore_state_where_not(self, finite: torch.Tensor) -> None:
        with torch.no_grad():
            for tensor, saved in zip(self.state_tensors, self.snapshot):
                tensor.copy_(torch.where(finite, tensor, saved))

    def _judge_masked(self, engine: Engine, bad_steps: int, first_bad: int) -> None:
        new = bad_steps - self.skipped
        if new <= 0:
            return
        where = self._where(engine, first_bad) + (f" (and {new - 1} more since the last check)" if new > 1 else "")
        if self.mode == "skip" and bad_steps <= self.max_skips:
            self.skipped = bad_steps
            logger.warning(f"Non-finite loss or gradient at {where}: batch skipped ({self.skipped} so far).")
            return
        raise FloatingPointError(
            f"Non-finite loss or gradient at {where}; the optimizer skipped that step, so the weights and saved "
            "checkpoints hold finite values. Check the data and the learning rate; set nonfinite_mode to 'skip' to "
            "drop such batches instead."
        )

    def _judge_scaled(self, engine: Engine, values: list[float]) -> None:
        self.scaler_skipped, self.last_scale = int(values[BAD_STEPS]), values[-1]
        where = self._where(engine, engine.state.iteration)
        if values[WORST_STREAK] >= self.max_nonfinite_streak:
            raise FloatingPointError(
                f"The loss was non-finite for {int(values[WORST_STREAK])} consecutive steps (checked at {where}): the "
                "GradScaler skipped their updates, but training has diverged. Check the data and the learning rate."
            )
        if self.last_scale < self.min_grad_scale:
            raise FloatingPointError(
                f"The GradScaler's scale fell to {self.last_scale:g} (below {self.min_grad_scale:g}) at {where}: the "
                "gradients overflow even unscaled, so training has diverged. Check the learning rate, or use bf16."
            )

    @staticmethod
    def _where(engine: Engine, iteration: int) -> str:
        epoch_length = engine.state.epoch_length or iteration
        return f"epoch {(iteration - 1) // epoch_length + 1}, iteration {iteration}"
