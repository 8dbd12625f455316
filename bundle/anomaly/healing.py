"""Per-code likelihoods under the two-level prior and "healing": resampling the unlikely codes from the prior.

Healing follows Pinaya et al. (MedIA 2022): the codes of an image whose negative log-likelihood under the prior is
above a threshold are drawn again from the prior in raster order, every other code held fixed, so the decoded
image keeps the normal anatomy and loses what the prior found unlikely.

:func:`heal_level` reuses the cached incremental machinery of
:func:`bundle.stage2_prior.sampling.sample_fast` (per-layer caches, one position at a time): at each position it
either keeps the given code or draws one. The horizontal stack of a row reads nothing of other rows, so a row
without a code to resample runs only the vertical stack (which the rows below need), a row stops after its last
code to resample, and rows after the last one are skipped: the work is at most about one forward pass. With every code marked it
returns exactly what ``sample_fast`` draws from the same uniforms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bundle.stage2_prior.pixelcnn import GatedPixelCNN
from bundle.stage2_prior.sampling import (
    cache_buffers,
    cached_weights,
    condition_features,
    eval_on,
    level_generators,
    pick_codes,
    position_logits,
    row_links,
)
from bundle.stage2_prior.two_level import TwoLevelPrior

__all__ = ["HEAL_LEVELS", "HealedCodes", "level_nll", "code_nll", "heal_level", "heal_codes", "uniforms"]

HEAL_LEVELS = ("bottom", "both")


@torch.no_grad()
def level_nll(
    model: GatedPixelCNN,
    codes: torch.Tensor,
    labels: torch.Tensor | None = None,
    cond_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of every code of one level, in bits, in one parallel pass.

    Args:
        model: the prior of that level (eval mode is set for the call).
        codes: integer ``[B, h, w]``.
        labels: int64 ``[B]`` for a class-conditioned prior, else None.
        cond_codes: integer ``[B, h', w']`` conditioning codes for the bottom level, else None.

    Returns:
        Float32 ``[B, h, w]``: ``-log2 p(code[i, j] | codes before it, labels, cond_codes)``.
    """
    device = next(model.parameters()).device
    with eval_on(model, device):
        logits = model(codes.to(device), labels, None if cond_codes is None else cond_codes.to(device))
    return F.cross_entropy(logits.float(), codes.to(device).long(), reduction="none") / math.log(2)


def code_nll(
    prior: TwoLevelPrior, top: torch.Tensor, bottom: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code NLL of both levels in bits: the top map, and the bottom map conditioned on the top codes.

    Args:
        prior: the two-level prior.
        top: integer ``[B, h_t, w_t]``.
        bottom: integer ``[B, h_b, w_b]``.
        labels: int64 ``[B]`` for a class-conditioned prior, else None.

    Returns:
        ``(top_nll [B, h_t, w_t], bottom_nll [B, h_b, w_b])``.
    """
    prior = getattr(prior, "module", prior)
    return level_nll(prior.top, top, labels), level_nll(prior.bottom, bottom, labels, top)


def uniforms(generator: torch.Generator, shape: Sequence[int], num_maps: int) -> torch.Tensor:
    """The same float64 uniform draws ``[H, W]`` for each of ``num_maps`` maps, so a map is healed alike in any
    batch.

    Args:
        generator: the random stream.
        shape: ``(H, W)``.
        num_maps: number of maps ``N``.

    Returns:
        Float64 ``[N, H, W]`` in ``[0, 1)``.
    """
    draws = torch.rand(int(shape[0]), int(shape[1]), generator=generator, dtype=torch.float64)
    return draws.expand(num_maps, -1, -1)


def _last_columns(resample: torch.Tensor) -> list[int]:
    """Per row, the last column any map resamples (-1 for none)."""
    any_row = resample.any(dim=0)  # [H, W]
    columns = torch.arange(any_row.shape[1], device=any_row.device)
    return torch.where(any_row, columns, -1).amax(dim=1).tolist()


@torch.no_grad()
def heal_level(
    model: GatedPixelCNN,
    codes: torch.Tensor,
    resample: torch.Tensor,
    draws: torch.Tensor,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    cond_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Redraw the marked codes of one level from the prior in raster order, keeping the others.

    Each marked code is drawn from ``p(code | the codes before it, labels, cond_codes)``, where the codes before it
    are the kept ones and those already redrawn.

    Args:
        model: the prior of that level.
        codes: integer ``[N, H, W]``, the codes to heal.
        resample: bool ``[N, H, W]``, True where a code is drawn again.
        draws: float64 ``[N, H, W]`` uniforms in ``[0, 1)``; a code is picked by inverse CDF as in
            :func:`bundle.stage2_prior.sampling.sample_fast`.
        temperature: softmax temperature; 0 picks the most likely code.
        labels: int64 ``[N]`` for a class-conditioned prior, else None.
        cond_codes: integer ``[N, h, w]`` for the spatially conditioned (bottom) level, else None.

    Returns:
        int64 ``[N, H, W]``: ``codes`` where ``resample`` is False, new draws where it is True.

    Raises:
        ValueError: when the shapes disagree or the temperature is negative.
    """
    if codes.dim() != 3 or resample.shape != codes.shape or draws.shape != codes.shape:
        raise ValueError(
            f"codes, resample and draws must share one [N, H, W] shape, got {list(codes.shape)}, "
            f"{list(resample.shape)} and {list(draws.shape)}."
        )
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means argmax), got {temperature}.")
    n, height, width = codes.shape
    device = next(model.parameters()).device
    model.check_labels(labels, n)
    labels = None if labels is None else labels.to(device=device, dtype=torch.long)
    codes = codes.to(device=device, dtype=torch.long).clone()
    resample = resample.to(device=device, dtype=torch.bool)
    last_columns = _last_columns(resample)
    if max(last_columns) < 0:
        return codes
    last_row = max(i for i, last in enumerate(last_columns) if last >= 0)
    draws = draws.permute(1, 2, 0).contiguous().to(device)  # [H, W, N]: one position's draws contiguous
    with eval_on(model, device):
        cond = condition_features(model, cond_codes, n, (height, width), device)
        weights = cached_weights(model, labels, n)
        buffers = cache_buffers(model, n, height, width, device)
        h_in, pad = buffers.h_in, model.kernel_size // 2 + 1
        for i in range(last_row + 1):
            links = row_links(model, weights, buffers.v_in, codes, cond, i)
            for j in range(last_columns[i] + 1):
                logits = position_logits(model, weights, h_in, buffers.gates, links, j)
                marked = resample[:, i, j]
                if marked.any():
                    drawn = pick_codes(logits, draws[i, j], temperature)
                    codes[:, i, j] = torch.where(marked, drawn, codes[:, i, j])
                h_in[0][:, j + pad] = model.embedding.weight[codes[:, i, j]]
    return codes


@dataclass
class HealedCodes:
    """Codes of a batch before and after healing, with what was resampled and why.

    ``top_nll``/``bottom_nll`` are the per-code NLLs (bits) of the input codes, the bottom level conditioned on
    the input top codes; ``bottom_nll_healed_top`` is the bottom level's NLL conditioned on the healed top codes
    (the one its resampling was decided on; equal to ``bottom_nll`` when the top level was not healed).
    """

    top: torch.Tensor
    bottom: torch.Tensor
    healed_top: torch.Tensor
    healed_bottom: torch.Tensor
    top_resampled: torch.Tensor
    bottom_resampled: torch.Tensor
    top_nll: torch.Tensor
    bottom_nll: torch.Tensor
    bottom_nll_healed_top: torch.Tensor


def heal_codes(
    prior: TwoLevelPrior,
    top: torch.Tensor,
    bottom: torch.Tensor,
    thresholds: Sequence[float],
    levels: str = "bottom",
    temperature: float = 1.0,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> HealedCodes:
    """Heal the codes of a two-level VQ-VAE: resample those whose NLL is above the level's threshold.

    With ``levels="both"`` the top level is healed first; the bottom codes are then scored again conditioned on
    the healed top codes, and those above the bottom threshold are resampled. With ``levels="bottom"`` the top
    codes are kept and only the bottom level is healed. Each image gets the same random draws whatever the
    batch, from :func:`~bundle.stage2_prior.sampling.level_generators` of ``seed``.

    Args:
        prior: the two-level prior.
        top: integer ``[B, h_t, w_t]``.
        bottom: integer ``[B, h_b, w_b]``.
        thresholds: ``(top, bottom)`` NLL thresholds in bits.
        levels: ``"bottom"`` or ``"both"``.
        temperature: softmax temperature of the draws; 0 picks the most likely code.
        seed: seed of the draws.
        labels: int64 ``[B]`` for a class-conditioned prior, else None.

    Returns:
        The :class:`HealedCodes`.
    """
    if levels not in HEAL_LEVELS:
        raise ValueError(f"levels must be one of {HEAL_LEVELS}, got {levels!r}.")
    if len(thresholds) != 2:
        raise ValueError(f"thresholds must be (top, bottom), got {thresholds!r}.")
    prior = getattr(prior, "module", prior)
    top_nll, bottom_nll = code_nll(prior, top, bottom, labels)
    top, bottom = top.to(top_nll.device).long(), bottom.to(top_nll.device).long()
    top_generator, bottom_generator = level_generators(seed)
    n = top.shape[0]
    top_resampled = torch.zeros_like(top, dtype=torch.bool)
    healed_top, bottom_nll_healed_top = top, bottom_nll
    if levels == "both":
        top_resampled = top_nll > float(thresholds[0])
        top_draws = uniforms(top_generator, top.shape[1:], n)
        healed_top = heal_level(prior.top, top, top_resampled, top_draws, temperature, labels)
        if top_resampled.any():
            bottom_nll_healed_top = level_nll(prior.bottom, bottom, labels, healed_top)
    bottom_resampled = bottom_nll_healed_top > float(thresholds[1])
    bottom_draws = uniforms(bottom_generator, bottom.shape[1:], n)
    healed_bottom = heal_level(
        prior.bottom, bottom, bottom_resampled, bottom_draws, temperature, labels, cond_codes=healed_top
    )
    return HealedCodes(
        top=top,
        bottom=bottom,
        healed_top=healed_top,
        healed_bottom=healed_bottom,
        top_resampled=top_resampled,
        bottom_resampled=bottom_resampled,
        top_nll=top_nll,
        bottom_nll=bottom_nll,
        bottom_nll_healed_top=bottom_nll_healed_top,
    )
