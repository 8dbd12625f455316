"""Anomaly maps of a batch of slices: encode, score every code under the prior, heal the unlikely ones, decode, and
compare with the input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth
from monai.utils import convert_to_tensor

from bundle.anomaly.healing import HEAL_LEVELS, HealedCodes, heal_codes
from bundle.stage2_prior.two_level import TwoLevelPrior

__all__ = ["AnomalyOutput", "AnomalyDetector", "upsample", "smooth", "image_score"]


def upsample(code_map: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A per-code map ``[B, h, w]`` repeated over the pixels each code covers: ``[B, 1, H, W]`` float.

    Args:
        code_map: ``[B, h, w]`` (bool or float).
        size: ``(H, W)``, a multiple of ``(h, w)``.

    Returns:
        Float ``[B, 1, H, W]`` (nearest neighbour).
    """
    return F.interpolate(code_map[:, None].float(), size=(int(size[0]), int(size[1])), mode="nearest")


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each map of ``[B, 1, H, W]`` smoothed by MONAI's ``GaussianSmooth`` (unchanged for ``sigma`` 0)."""
    if sigma <= 0:
        return maps
    return convert_to_tensor(GaussianSmooth(sigma=sigma)(maps[:, 0]), track_meta=False)[:, None]


def image_score(top_nll: torch.Tensor, bottom_nll: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Per-image anomaly score: the mean NLL (bits) of the ``num_codes`` least likely codes of both levels.

    Args:
        top_nll: ``[B, h_t, w_t]``.
        bottom_nll: ``[B, h_b, w_b]``.
        num_codes: how many of the least likely codes to average (at most all of them).

    Returns:
        ``[B]``.
    """
    every = torch.cat([top_nll.flatten(1), bottom_nll.flatten(1)], dim=1)
    return every.topk(min(int(num_codes), every.shape[1]), dim=1).values.mean(dim=1)


@dataclass
class AnomalyOutput:
    """What :class:`AnomalyDetector` finds for a batch ``[B, 1, H, W]``; maps are ``[B, 1, H, W]`` on the CPU.

    ``anomaly_map`` is ``residual`` gated by ``resampled`` (or ``residual`` itself, ungated);
    ``reconstruction_error`` is the baseline: the smoothed ``|input - reconstruction|``. ``nll_map`` gives each
    pixel the NLL (bits) of the top code plus that of the bottom code covering it. ``score`` is
    :func:`image_score` ``[B]``.
    """

    reconstruction: torch.Tensor
    healed: torch.Tensor
    residual: torch.Tensor
    anomaly_map: torch.Tensor
    reconstruction_error: torch.Tensor
    resampled: torch.Tensor
    nll_map: torch.Tensor
    score: torch.Tensor
    codes: HealedCodes


class AnomalyDetector:
    """Unsupervised anomaly maps from a two-level VQ-VAE and its prior.

    For images ``x`` in ``[0, 1]``: codes ``(top, bottom)``, their NLL under the prior, healing of the codes above
    the thresholds (:func:`~bundle.anomaly.healing.heal_codes`), ``healed = decode(healed codes)`` and the map
    ``smooth(|x - healed|)``, gated (multiplied) by the pixels whose codes were resampled. The gate makes the map
    exactly zero where the prior found nothing unlikely; without it, reconstruction errors everywhere stay in.

    Args:
        vqvae: the two-level VQ-VAE (eval mode), with ``index_quantize`` and ``decode_samples``.
        prior: the :class:`~bundle.stage2_prior.two_level.TwoLevelPrior` (eval mode).
        thresholds: ``(top, bottom)`` NLL thresholds in bits (one float: both levels).
        levels: ``"bottom"`` heals the bottom codes only; ``"both"`` heals the top codes first, then the bottom
            codes scored again under the healed top codes. On the synthetic-lesion benchmark ``"bottom"`` gave
            the better maps (a top code covers 8 x 8 pixels, so healing it redraws normal detail around a lesion
            too) and costs no pass of the top prior's sampler.
        gated: multiply the map by the upsampled mask of resampled codes.
        sigma: Gaussian smoothing of the residuals in pixels (0: none).
        temperature: softmax temperature of the resampling; 0 picks the most likely code.
        seed: seed of the resampling; an image is healed alike in any batch.
        score_codes: codes averaged by :func:`image_score`.
    """

    def __init__(
        self,
        vqvae: torch.nn.Module,
        prior: TwoLevelPrior,
        thresholds: float | Sequence[float],
        levels: str = "bottom",
        gated: bool = True,
        sigma: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
        score_codes: int = 16,
    ) -> None:
        if levels not in HEAL_LEVELS:
            raise ValueError(f"levels must be one of {HEAL_LEVELS}, got {levels!r}.")
        if sigma < 0 or score_codes < 1:
            raise ValueError(f"sigma must be >= 0 and score_codes >= 1, got {sigma} and {score_codes}.")
        self.vqvae, self.prior = vqvae, getattr(prior, "module", prior)
        pair = (thresholds, thresholds) if isinstance(thresholds, (int, float)) else tuple(thresholds)
        if len(pair) != 2:
            raise ValueError(f"thresholds must be one number or (top, bottom), got {thresholds!r}.")
        self.thresholds = (float(pair[0]), float(pair[1]))
        self.levels, self.gated, self.sigma = levels, gated, float(sigma)
        self.temperature, self.seed, self.score_codes = float(temperature), int(seed), int(score_codes)

    @property
    def device(self) -> torch.device:
        """Where the VQ-VAE runs."""
        return next(self.vqvae.parameters()).device

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(top codes, bottom codes, reconstruction clipped to [0, 1])`` of ``images [B, 1, H, W]``."""
        top, bottom = self.vqvae.index_quantize(images.to(self.device).float())
        return top, bottom, self.vqvae.decode_samples(top, bottom).float().clamp(0.0, 1.0)

    @torch.no_grad()
    def reconstruction_error(self, images: torch.Tensor) -> torch.Tensor:
        """The baseline map alone: smoothed ``|input - reconstruction|`` ``[B, 1, H, W]`` on the CPU."""
        _, _, reconstruction = self.reconstruct(images)
        return smooth((images.float().cpu() - reconstruction.cpu()).abs(), self.sigma)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> AnomalyOutput:
        """Anomaly maps of ``images``.

        Args:
            images: ``[B, 1, H, W]`` in ``[0, 1]`` (the bundle's preprocessing).
            labels: int64 ``[B]`` for a class-conditioned prior, else None.

        Returns:
            The :class:`AnomalyOutput`.
        """
        size = images.shape[-2:]
        images = images.float().cpu()
        top, bottom, reconstruction = self.reconstruct(images)
        codes = heal_codes(self.prior, top, bottom, self.thresholds, self.levels, self.temperature, self.seed, labels)
        healed = self.vqvae.decode_samples(codes.healed_top, codes.healed_bottom).float().clamp(0.0, 1.0).cpu()
        resampled = torch.maximum(upsample(codes.top_resampled, size), upsample(codes.bottom_resampled, size)).cpu()
        residual = smooth((images - healed).abs(), self.sigma)
        return AnomalyOutput(
            reconstruction=reconstruction.cpu(),
            healed=healed,
            residual=residual,
            anomaly_map=residual * resampled if self.gated else residual,
            reconstruction_error=smooth((images - reconstruction.cpu()).abs(), self.sigma),
            resampled=resampled,
            nll_map=(upsample(codes.top_nll, size) + upsample(codes.bottom_nll, size)).cpu(),
            score=image_score(codes.top_nll, codes.bottom_nll, self.score_codes).cpu(),
            codes=codes,
        )
