"""New slices from the two-level prior: sample codes top then bottom, decode them, save them."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bundle.engine.io import atomic_write_bytes, nifti_gz_bytes, save_image_grid
from bundle.stage2_prior.sampling import level_generators, sample_codes

LatentShapes = tuple[tuple[int, int], tuple[int, int]]

logger = logging.getLogger(__name__)


def _labels_for(num_samples: int, num_classes: int, label: int | None) -> torch.Tensor | None:
    if num_classes == 0:
        if label is not None:
            raise ValueError("a label was given but the prior is not conditioned (num_classes is 0).")
        return None
    if label is None:  # cycle through the classes so a grid shows every position
        return torch.arange(num_samples) % num_classes
    if not 0 <= int(label) < num_classes:
        raise ValueError(f"label {label} is outside [0, {num_classes}).")
    return torch.full((num_samples,), int(label), dtype=torch.long)


def resolve_latent_shapes(prior: torch.nn.Module, latent_shapes: Sequence[Sequence[int]] | None = None) -> LatentShapes:
    """``((h_t, w_t), (h_b, w_b))`` as given, or the prior's own ``latent_shapes``.

    Args:
        prior: a :class:`~bundle.stage2_prior.two_level.TwoLevelPrior` (DDP-wrapped or not).
        latent_shapes: the shapes, or None to use the prior's.

    Returns:
        The two shapes as int tuples.

    Raises:
        ValueError: if neither gives them.
    """
    shapes = (
        latent_shapes if latent_shapes is not None else getattr(getattr(prior, "module", prior), "latent_shapes", None)
    )
    if shapes is None:
        raise ValueError("the latent shapes are unknown: pass latent_shapes or build the prior with latent_shapes.")
    top, bottom = (tuple(int(size) for size in shape) for shape in shapes)
    return (top[0], top[1]), (bottom[0], bottom[1])


@torch.no_grad()
def generate(
    vqvae: torch.nn.Module,
    prior: torch.nn.Module,
    num_samples: int,
    temperature: float = 1.0,
    seed: int = 0,
    label: int | None = None,
    batch_size: int = 16,
    sampler: str = "fast",
    latent_shapes: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples top and bottom code maps from the prior and decodes them with the VQ-VAE.

    Sample ``n`` of a seed does not depend on ``batch_size``: each level draws from its own seeded stream.

    Args:
        vqvae: the frozen two-level VQ-VAE (eval mode), with ``decode_samples(top, bottom)``.
        prior: the :class:`~bundle.stage2_prior.two_level.TwoLevelPrior` (DDP-wrapped or not).
        num_samples: number of slices.
        temperature: softmax temperature of the prior.
        seed: the same seed gives the same slices.
        label: class for a class-conditioned prior; None cycles through all classes.
        batch_size: slices sampled together.
        sampler: ``"fast"`` (cached) or ``"naive"``.
        latent_shapes: ``((h_t, w_t), (h_b, w_b))``; None takes the prior's ``latent_shapes``.

    Returns:
        ``(images [N, 1, H, W] clipped to [0, 1], top codes [N, h_t, w_t], bottom codes [N, h_b, w_b])``, all on
        the CPU.
    """
    prior = getattr(prior, "module", prior)
    top_shape, bottom_shape = resolve_latent_shapes(prior, latent_shapes)
    generators = level_generators(seed)
    labels = _labels_for(num_samples, getattr(prior, "num_classes", 0), label)
    device = next(vqvae.parameters()).device
    images, tops, bottoms = [], [], []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        batch_labels = None if labels is None else labels[start : start + count]
        top, bottom = sample_codes(
            prior,
            top_shape,
            bottom_shape,
            count,
            temperature,
            labels=batch_labels,
            sampler=sampler,
            generators=generators,
        )
        tops.append(top.cpu())
        bottoms.append(bottom.cpu())
        images.append(vqvae.decode_samples(top.to(device), bottom.to(device)).float().clamp(0.0, 1.0).cpu())
    return torch.cat(images), torch.cat(tops), torch.cat(bottoms)


def save_samples(
    images: torch.Tensor, output_dir: str | os.PathLike, prefix: str = "sample", columns: int = 4
) -> list[str]:
    """Writes each slice as a float32 NIfTI (1 mm identity geometry, byte-reproducible) and a PNG grid.

    Args:
        images: ``[N, 1, H, W]`` in ``[0, 1]``.
        output_dir: folder for ``sample_000.nii.gz``… and ``samples.png``.
        prefix: file name prefix.
        columns: grid columns.

    Returns:
        The paths written.
    """
    output_dir = Path(output_dir)
    paths = []
    for index, image in enumerate(images):
        path = output_dir / f"{prefix}_{index:03d}.nii.gz"
        atomic_write_bytes(path, nifti_gz_bytes(image[0].numpy().astype(np.float32)))
        paths.append(str(path))
    save_image_grid(output_dir / f"{prefix}s.png", images, columns)
    paths.append(str(output_dir / f"{prefix}s.png"))
    logger.info(f"Wrote {len(images)} samples and a grid to {output_dir.resolve()}")
    return paths
