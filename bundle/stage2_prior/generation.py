"""New slices from the two-level prior: sample codes top then bottom, decode them, save them."""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.engine.io import atomic_write_bytes, nifti_gz_bytes, save_image_grid
from bundle.stage2_prior.sampling import level_generators, sample_codes

LatentShapes = tuple[tuple[int, int], tuple[int, int]]

logger = logging.getLogger(__name__)

# Below this, logits / temperature can overflow float64 (1e-320 is a denormal); 0 already means argmax.
MIN_TEMPERATURE = 1e-6
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def _is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling_arguments(num_samples: Any, temperature: Any, seed: Any, batch_size: Any = 1) -> None:
    """Raises one error naming every bad sampling argument.

    Args:
        num_samples: a whole number >= 1.
        temperature: 0 (argmax) or a finite number >= ``MIN_TEMPERATURE``.
        seed: a whole number in ``[0, 2**64 - 1]``.
        batch_size: a whole number >= 1.

    Raises:
        ValueError: lists each bad argument and its value.
    """
    problems = []
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if not _is_whole(value) or value < 1:
            problems.append(f"{name} must be a whole number >= 1, got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        problems.append(f"temperature must be a number, got {temperature!r}")
    elif not math.isfinite(temperature):
        problems.append(f"temperature must be finite, got {temperature!r}")
    elif temperature < 0:
        problems.append(f"temperature must be >= 0 (0 means argmax), got {temperature!r}")
    elif 0 < temperature < MIN_TEMPERATURE:
        problems.append(
            f"temperature {temperature!r} is too small to divide the logits by; use 0 for argmax or at least "
            f"{MIN_TEMPERATURE}"
        )
    if not _is_whole(seed) or not 0 <= seed <= MAX_SEED:
        problems.append(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}")
    if problems:
        raise ValueError("bad sampling arguments: " + "; ".join(problems) + ".")


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
def generate_batches(
    vqvae: torch.nn.Module,
    prior: torch.nn.Module,
    num_samples: int,
    temperature: float = 1.0,
    seed: int = 0,
    label: int | None = None,
    batch_size: int = 16,
    sampler: str = "fast",
    latent_shapes: Sequence[Sequence[int]] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Samples and decodes ``num_samples`` slices one batch at a time (arguments: :func:`generate`).

    Yields:
        ``(images [n, 1, H, W] clipped to [0, 1], top codes [n, h_t, w_t], bottom codes [n, h_b, w_b])`` per batch,
        on the CPU.

    Raises:
        ValueError: a bad argument (see :func:`check_sampling_arguments`).
        FloatingPointError: a batch decodes to NaN or Inf; names the seed and the samples.
    """
    check_sampling_arguments(num_samples, temperature, seed, batch_size)
    prior = getattr(prior, "module", prior)
    top_shape, bottom_shape = resolve_latent_shapes(prior, latent_shapes)
    generators = level_generators(seed)
    labels = _labels_for(num_samples, getattr(prior, "num_classes", 0), label)
    device = next(vqvae.parameters()).device
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
        images = vqvae.decode_samples(top.to(device), bottom.to(device)).float()
        if not torch.isfinite(images).all():
            raise FloatingPointError(
                f"samples {start} to {start + count - 1} of seed {seed} decode to NaN or Inf values: the VQ-VAE "
                "weights are damaged or do not match the prior; nothing was written for them."
            )
        yield images.clamp(0.0, 1.0).cpu(), top.cpu(), bottom.cpu()


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
    """Samples top and bottom code maps from the prior and decodes them with the VQ-VAE, all in memory (for many
    slices, :func:`sample_to_files` writes them as they come).

    Sample ``n`` of a seed does not depend on ``batch_size``: each level draws from its own seeded stream.

    Args:
        vqvae: the frozen two-level VQ-VAE (eval mode), with ``decode_samples(top, bottom)``.
        prior: the :class:`~bundle.stage2_prior.two_level.TwoLevelPrior` (DDP-wrapped or not).
        num_samples: number of slices.
        temperature: softmax temperature of the prior; 0 means argmax.
        seed: the same seed gives the same slices.
        label: class for a class-conditioned prior; None cycles through all classes.
        batch_size: slices sampled together.
        sampler: ``"fast"`` (cached; CUDA graphs on a GPU), ``"fast_eager"`` (cached, no CUDA graphs) or ``"naive"``.
        latent_shapes: ``((h_t, w_t), (h_b, w_b))``; None takes the prior's ``latent_shapes``.

    Returns:
        ``(images [N, 1, H, W] clipped to [0, 1], top codes [N, h_t, w_t], bottom codes [N, h_b, w_b])``, all on
        the CPU.

    Raises:
        ValueError: a bad argument (see :func:`check_sampling_arguments`).
        FloatingPointError: a batch decodes to NaN or Inf.
    """
    batches = list(
        generate_batches(vqvae, prior, num_samples, temperature, seed, label, batch_size, sampler, latent_shapes)
    )
    return tuple(torch.cat(parts) for parts in zip(*batches))  # type: ignore[return-value]


def sample_to_files(
    vqvae: torch.nn.Module,
    prior: torch.nn.Module,
    output_dir: str | os.PathLike,
    num_samples: int,
    temperature: float = 1.0,
    seed: int = 0,
    label: int | None = None,
    batch_size: int = 16,
    sampler: str = "fast",
    latent_shapes: Sequence[Sequence[int]] | None = None,
    prefix: str = "sample",
    grid_count: int = 16,
    columns: int = 4,
    progress: bool = True,
) -> list[str]:
    """Samples slices batch by batch and writes each batch before sampling the next, with a progress bar.

    Memory stays flat however many slices are asked for: only the first ``grid_count`` slices are kept, for the
    PNG grid written at the end. Each slice is a float32 NIfTI (1 mm identity geometry, byte-reproducible)
    ``<prefix>_<index>.nii.gz``, the index zero-padded to at least three digits. The files are the same as
    :func:`save_samples` writes for :func:`generate`'s images; each is renamed into place complete (a kill never
    leaves a partial file), without a disk sync per file.

    Args:
        vqvae, prior, num_samples, temperature, seed, label, batch_size, sampler, latent_shapes: see
            :func:`generate`.
        output_dir: folder for the slices and ``<prefix>s.png``.
        prefix: file name prefix.
        grid_count: slices shown in the grid.
        columns: grid columns.
        progress: show a progress bar (``tqdm``) over the slices.

    Returns:
        The paths written, the grid last.
    """
    from tqdm import tqdm

    output_dir = Path(output_dir)
    width = max(3, len(str(num_samples - 1))) if _is_whole(num_samples) and num_samples > 0 else 3
    batches = generate_batches(vqvae, prior, num_samples, temperature, seed, label, batch_size, sampler, latent_shapes)
    paths, shown = [], []
    with tqdm(total=num_samples, desc="Sampling", unit="slice", disable=not progress, mininterval=1.0) as bar:
        for images, _, _ in batches:
            for image in images:
                path = output_dir / f"{prefix}_{len(paths):0{width}d}.nii.gz"
                atomic_write_bytes(path, nifti_gz_bytes(image[0].numpy().astype(np.float32)), durable=False)
                paths.append(str(path))
            shown += [image.clone() for image in images[: max(0, grid_count - len(shown))]]
            bar.update(len(images))
    if shown:
        save_image_grid(output_dir / f"{prefix}s.png", torch.stack(shown), columns)
        paths.append(str(output_dir / f"{prefix}s.png"))
    logger.info(f"Wrote {num_samples} samples and a grid to {output_dir.resolve()}")
    return paths


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
