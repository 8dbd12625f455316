"""Early stopping per level of the two-level prior: each prior is kept at its own best validation NLL.

The top and bottom priors have separate losses (the bottom prior is conditioned on the true top codes, never on
the top prior's output), so the best two-level prior is the best top prior with the best bottom prior, even when
they peak at different epochs. On the demo phantoms the top prior (128 positions a slice, 320 slices) overfits
after about 5 epochs while the bottom prior (2,048 positions a slice) still improves at 12: selected by the image
NLL alone, the saved top prior was its worst.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from torch import nn

__all__ = ["LEVEL_METRICS", "LevelEarlyStopping", "level_param_groups"]

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
    unchanged. A resumed run starts with the configured learning rates (``EngineCheckpointLoader`` puts them back,
    with a warning naming the change), so a stopped level trains again from its best weights until it stops again.

    Args:
        network: the two-level prior, possibly wrapped in DDP.
        optimizer: its optimizer, built on :func:`level_param_groups`.
        patience: validations without improvement before a level stops.
        metrics: the evaluator's metric name for each level's NLL.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        patience: int = 2,
        metrics: Mapping[str, str] = LEVEL_METRICS,
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}.")
        groups = {group.get("name"): group for group in optimizer.param_groups}
        missing = [level for level in metrics if level not in groups]
        if missing:
            raise ValueError(f"the optimizer has no parameter group named {missing}: build it on level_param_groups.")
        self.network, self.groups, self.patience, self.metrics = network, groups, patience, dict(metrics)
        self.best = {level: float("inf") for level in metrics}
        self.best_state: dict[str, dict[str, torch.Tensor]] = {}
        self.waited = {level: 0 for level in metrics}

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def stopped(self, level: str) -> bool:
        """Whether ``level`` has stopped training."""
        return self.groups[level]["lr"] == 0

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
            if self.waited[level] >= self.patience and not self.stopped(level):
                module.load_state_dict(self.best_state[level])
                self.groups[level]["lr"] = 0.0
                logger.info(
                    f"The {level} prior stopped training: {name} {value:.4f} has not improved on {self.best[level]:.4f} "
                    f"for {self.waited[level]} validations; its best weights are restored."
                )
