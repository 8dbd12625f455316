"""Early stopping per level of the two-level prior: each prior is kept at its own best validation NLL.

The top and bottom priors have separate losses (the bottom prior is conditioned on the true top codes, never on
the top prior's output), so the best two-level prior is the best top prior with the best bottom prior, even when
they peak at different epochs. On the demo phantoms the top prior (128 positions a slice, 320 slices) overfits
after about 5 epochs while the bottom prior (2,048 positions a slice) still improves at 12: selected by the image
NLL alone, the saved top prior was its worst. Once both levels have stopped, no later epoch changes a weight, so
the trainer ends there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["LEVEL_METRICS", "EndWhenLevelsStopped", "LevelEarlyStopping", "level_param_groups"]

logger = logging.getLogger(__name__)

LEVEL_METRICS = {"top": "val_nll_bits_top", "bottom": "val_nll_bits_bottom"}


def level_param_groups(network: nn.Module) -> list[dict]:
    """The prior's parameters as one optimizer group per level, named ``"top"`` and ``"bottom"``.

    Args:
        network: the :class:`~bundle.stage2_prior.two_level.TwoLevelPrior`, possibly wrapped in DDP.

    Returns:
        ``[{"params": [...], "name": "top"}, {"params": [...], "name": "bottom"}]``.
    """
    prior = getattr(network, "module", network)
    return [{"params": list(getattr(prior, level).parameters()), "name": level} for level in LEVEL_METRICS]


class LevelEarlyStopping:
    """Stops training a level of the prior when its validation NLL has not improved for ``patience`` validations:
    the level gets back its best weights and its optimizer group's learning rate becomes 0, so every later
    checkpoint holds it at its best while the other level trains on.

    A learning rate of 0 rather than ``requires_grad_(False)`` keeps DistributedDataParallel's gradient reduction
    unchanged. Without DDP the stopped level is also added to the prior's ``frozen_levels``, so its forward runs
    without gradients and the backward pass skips it (the other level's gradients and steps are unchanged).

    Its state (each level's best NLL and weights, the validations waited) goes into the training checkpoint
    (``state_dict``), so a resumed run keeps the best of the whole run: it starts with the configured learning rates
    (``EngineCheckpointLoader`` puts them back, with a warning naming the change), a level that had stopped trains
    again, and at the first validation that does not improve on its best it stops again with the best weights of
    the whole run.

    Args:
        network: the two-level prior, possibly wrapped in DDP.
        optimizer: its optimizer, built on :func:`level_param_groups`.
        patience: validations without improvement before a level stops; 0 never stops a level.
        metrics: the evaluator's metric name for each level's NLL.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        patience: int = 2,
        metrics: Mapping[str, str] = LEVEL_METRICS,
    ) -> None:
        if patience < 0:
            raise ValueError(f"patience must be at least 0 (0: never stop), got {patience}.")
        groups = {group.get("name"): group for group in optimizer.param_groups}
        missing = [level for level in metrics if level not in groups]
        if missing:
            raise ValueError(f"the optimizer has no parameter group named {missing}: build it on level_param_groups.")
        self.network, self.optimizer, self.patience, self.metrics = network, optimizer, patience, dict(metrics)
        self.best = {level: float("inf") for level in metrics}
        self.best_state: dict[str, dict[str, torch.Tensor]] = {}
        self.waited = {level: 0 for level in metrics}

    def state_dict(self) -> dict:
        """Each level's best NLL, its weights at that point and the validations waited since, for checkpoints."""
        return {"best": dict(self.best), "waited": dict(self.waited), "best_state": dict(self.best_state)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restores :meth:`state_dict` (from a checkpoint); the weights stay where the checkpoint loader put them."""
        self.best.update(state["best"])
        self.waited.update(state["waited"])
        self.best_state = {level: dict(weights) for level, weights in state["best_state"].items()}

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def stopped(self, level: str) -> bool:
        """Whether ``level`` has stopped training."""
        return self._group(level)["lr"] == 0

    def _group(self, level: str) -> dict:
        # looked up each time: the optimizer's load_state_dict (a resume) replaces its group dicts
        return next(group for group in self.optimizer.param_groups if group.get("name") == level)

    def __call__(self, evaluator: Engine) -> None:
        prior = getattr(self.network, "module", self.network)
        for level, name in self.metrics.items():
            value = float(evaluator.state.metrics[name])
            module = getattr(prior, level)
            if value < self.best[level]:
                self.best[level], self.waited[level] = value, 0
                self.best_state[level] = {k: v.detach().clone() for k, v in module.state_dict().items()}
                continue
            self.waited[level] += 1
            if 0 < self.patience <= self.waited[level] and not self.stopped(level):
                module.load_state_dict(self.best_state[level])
                self._group(level)["lr"] = 0.0
                if not isinstance(self.network, DistributedDataParallel):  # DDP waits for every parameter's gradient
                    prior.frozen_levels.add(level)
                logger.info(
                    f"The {level} prior stopped training: {name} {value:.4f} has not improved on {self.best[level]:.4f} "
                    f"for {self.waited[level]} validations; its best weights are restored."
                )


class EndWhenLevelsStopped:
    """Ends a trainer after the epoch in which every level of the prior has stopped (:class:`LevelEarlyStopping`):
    from then on its epochs would change no weight. The run ends through ``COMPLETED`` as usual (final weights,
    sample grid), and a resumed run trains the levels again as :class:`LevelEarlyStopping` describes.

    Attach it after the validation handler (in a MONAI ``train_handlers`` list: after ``ValidationHandler``). The
    levels stop on the evaluator's metrics, which every process of a distributed run shares, so all of them end
    after the same epoch.

    Args:
        level_stopping: the handler that stops the levels.
    """

    def __init__(self, level_stopping: LevelEarlyStopping) -> None:
        self.level_stopping = level_stopping

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch >= engine.state.max_epochs:
            return
        if all(self.level_stopping.stopped(level) for level in self.level_stopping.metrics):
            logger.info(
                f"Training ends after epoch {engine.state.epoch} of {engine.state.max_epochs}: every level of the "
                "prior has stopped, so later epochs would change no weight."
            )
            engine.terminate()
