"""A trainer handler that samples slices from the two-level prior as it learns and saves them as a grid."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events

from bundle.engine.io import save_image_grid

logger = logging.getLogger(__name__)


class SampleGridWriter:
    """Every ``interval`` epochs (and at the end, unless the last epoch already drew one), samples slices from the
    prior and logs them as a grid.

    Args:
        vqvae: the frozen two-level VQ-VAE that decodes the codes.
        prior: the :class:`~bundle.stage2_prior.two_level.TwoLevelPrior` being trained (DDP-wrapped or not).
        latent_shapes: ``((h_t, w_t), (h_b, w_b))``; None takes the prior's ``latent_shapes``.
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
        latent_shapes: Sequence[Sequence[int]] | None,
        path: str,
        log_dir: str | None = None,
        num_samples: int = 8,
        interval: int = 5,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.vqvae, self.prior = vqvae, getattr(prior, "module", prior)
        self.latent_shapes = None if latent_shapes is None else tuple(tuple(shape) for shape in latent_shapes)
        self.path, self.log_dir = path, log_dir
        self.num_samples, self.interval, self.temperature, self.seed = num_samples, interval, temperature, seed
        self.drawn_at_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        """Registers the sampling events."""
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from bundle.stage2_prior.generation import generate

        if engine.state.epoch == self.drawn_at_epoch:  # the run ends on an epoch whose grid is drawn: same weights
            return
        self.drawn_at_epoch = engine.state.epoch
        images, _, _ = generate(
            self.vqvae, self.prior, self.num_samples, self.temperature, self.seed, latent_shapes=self.latent_shapes
        )
        save_image_grid(self.path, images)
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(self.log_dir) as writer:
                # Transposed like the PNG grid: anterior up.
                writer.add_images("prior_samples", images.transpose(-1, -2), engine.state.epoch)
        logger.info(f"Epoch {engine.state.epoch}: prior samples written to {os.path.abspath(self.path)}")
