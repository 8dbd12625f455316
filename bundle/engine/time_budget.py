"""A training-time budget in whole epochs: training stops before an epoch that would end past the budget."""

from __future__ import annotations

import logging
import statistics
import time

import torch
from ignite.engine import Engine, Events

__all__ = ["EpochTimeBudget"]

logger = logging.getLogger(__name__)


class EpochTimeBudget:
    """Stops a trainer before an epoch that would end more than ``seconds`` after the run started, judging by the
    median duration of its epochs so far (training, validation and checkpoints; the median, so that one stalled
    epoch does not end the run early).

    Ignite's ``TimeLimit`` stops *after* the limit has passed, mid-epoch, so a run overshoots by up to an epoch and
    loses the unvalidated part; this handler keeps the run within the budget (unless the last epoch takes far longer
    than the median), and every epoch it trains is whole, validated and saved. The run ends through ``COMPLETED`` as
    usual, and it resumes like a killed one: the same command trains on from its last checkpoint to ``max_epochs``.
    Attach it after the validation and checkpoint handlers (last in a MONAI ``train_handlers`` list).

    Args:
        seconds: the budget, counted from the trainer's ``STARTED`` event (so data loading and code extraction
            before the run do not count); positive.
        name: the config ID that sets it, for messages.

    Raises:
        TypeError: if ``seconds`` is not an int.
        ValueError: if ``seconds`` is not positive, or (at ``attach``) in a multi-process run, whose processes could
            stop after different epochs.
    """

    def __init__(self, seconds: int, name: str = "max_train_seconds") -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise TypeError(f"{name} must be a whole number of seconds or null, got {seconds!r}.")
        if seconds <= 0:
            raise ValueError(f"{name} must be positive (null: no limit), got {seconds}.")
        self.seconds, self.name = seconds, name
        self.started = self.epoch_started = 0.0
        self.durations: list[float] = []

    def attach(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError(
                f"{self.name} is for single-process runs: the processes of a distributed run could stop apart."
            )
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def start(self, engine: Engine) -> None:
        self.started = self.epoch_started = time.time()
        self.durations = []

    def __call__(self, engine: Engine) -> None:
        now = time.time()
        self.durations.append(now - self.epoch_started)
        self.epoch_started = now
        epoch = statistics.median(self.durations)
        if engine.state.epoch >= engine.state.max_epochs or now + epoch - self.started <= self.seconds:
            return
        logger.warning(
            f"Training stops after epoch {engine.state.epoch} of {engine.state.max_epochs}: another epoch of about "
            f"{epoch:.0f} s would end past {self.name} = {self.seconds} s ({now - self.started:.0f} s so far)."
        )
        engine.terminate()
