"""New slices from the prior: sample codes, decode them, save them, and measure how good they are."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bundle.evaluation import metrics
from bundle.stage2_prior.sampling import sample_codes
from bundle.engine.io import atomic_write_bytes, atomic_write_json, nifti_gz_bytes, save_grid, save_image_grid, to_uint8

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


@torch.no_grad()
def generate(
    vqvae: torch.nn.Module,
    prior: torch.nn.Module,
    num_samples: int,
    latent_shape: tuple[int, int],
    temperature: float = 1.0,
    seed: int = 0,
    label: int | None = None,
    batch_size: int = 16,
    method: str = "fast",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples code maps from the prior and decodes them with the VQ-VAE.

    Args:
        vqvae: the frozen VQ-VAE (eval mode).
        prior: the Gated PixelCNN.
        num_samples: number of slices.
        latent_shape: ``(h, w)`` of the code map, e.g. ``(64, 32)``.
        temperature: softmax temperature of the prior.
        seed: the same seed gives the same slices.
        label: class for a conditioned prior; None cycles through all classes.
        batch_size: slices sampled together.
        method: ``"fast"`` (cached) or ``"naive"`` sampler.

    Returns:
        ``(images [N, 1, H, W] clipped to [0, 1], codes [N, h, w])``, both on the CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = _labels_for(num_samples, getattr(prior, "num_classes", 0), label)
    device = next(vqvae.parameters()).device
    images, codes = [], []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        batch_labels = None if labels is None else labels[start : start + count]
        batch_codes = sample_codes(prior, tuple(latent_shape), count, temperature, batch_labels, generator, method)
        codes.append(batch_codes.cpu())
        images.append(vqvae.decode_samples(batch_codes.to(device)).float().clamp(0.0, 1.0).cpu())
    return torch.cat(images), torch.cat(codes)


def save_samples(images: torch.Tensor, output_dir: str | os.PathLike, prefix: str = "sample", columns: int = 4) -> list[str]:
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


def _subset_indices(size: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded random ``limit`` of them."""
    if limit is not None and limit < size:
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    return list(range(size))


def _load_images(dataset: Dataset, *index_lists: list[int]) -> list[torch.Tensor]:
    """Stacks the images at each list of indices, reading every needed item once."""
    needed = sorted(set().union(*index_lists))
    subset = torch.utils.data.Subset(dataset, needed)
    loaded = torch.cat([batch["image"].float() for batch in DataLoader(subset, batch_size=32, num_workers=0)])
    position = {index: k for k, index in enumerate(needed)}
    return [loaded[[position[i] for i in indices]] for indices in index_lists]


@torch.no_grad()
def nll_bits_per_code(prior: torch.nn.Module, codes: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 16) -> float:
    """Mean negative log-likelihood of code maps under the prior, in bits per code."""
    prior.eval()
    device = next(prior.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(codes), batch_size):
        batch = codes[start : start + batch_size].long().to(device)
        batch_labels = None if labels is None or not len(labels) else labels[start : start + batch_size].to(device)
        logits = prior(batch, batch_labels).float()
        total += torch.nn.functional.cross_entropy(logits, batch, reduction="sum").item()
        count += batch.numel()
    return total / count / math.log(2)


@torch.no_grad()
def generation_report(
    vqvae: torch.nn.Module,
    prior: torch.nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    test_codes: dict[str, Any],
    latent_shape: tuple[int, int],
    output_dir: str | os.PathLike,
    num_samples: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    num_memorisation_references: int | None = None,
) -> dict[str, Any]:
    """Generation metrics, written to ``<output_dir>/generation_metrics.json`` with a samples-vs-real picture.

    Features for FID/KID come from the bundle's own frozen encoder (no downloadable network exists here), so
    the figures compare runs of this bundle, not papers. Every statistic is computed at the same sample
    count, and the real-train vs real-test value is reported beside it as the floor to compare against.

    Args:
        vqvae: the frozen VQ-VAE.
        prior: the trained prior.
        train_dataset: training slices (``{"image": ...}``, no augmentation), the memorisation references.
        test_dataset: test slices.
        test_codes: the test split encoded by :func:`bundle.stage2_prior.codes.encode_dataset`.
        latent_shape: code map shape.
        output_dir: where the JSON, samples and picture go.
        num_samples: generated slices, and real slices per side of each comparison.
        temperature: prior temperature.
        seed: sampling seed.
        num_memorisation_references: training slices to compare each sample with (None: all).

    Returns:
        The metrics dict that was written.
    """
    output_dir = Path(output_dir)
    samples, sample_codes_ = generate(vqvae, prior, num_samples, latent_shape, temperature, seed)
    (test_images,) = _load_images(test_dataset, _subset_indices(len(test_dataset), num_samples, seed))
    # The FID subset and the memorisation references often overlap (all of the training set by default): one read.
    train_images, references = _load_images(
        train_dataset,
        _subset_indices(len(train_dataset), num_samples, seed + 1),
        _subset_indices(len(train_dataset), num_memorisation_references, seed + 2),
    )
    n = min(len(samples), len(test_images), len(train_images))
    device = next(vqvae.parameters()).device

    def features(images: torch.Tensor) -> torch.Tensor:
        return metrics.encoder_features(vqvae.encode, images[:n].to(device))

    f_gen, f_test, f_train = features(samples), features(test_images), features(train_images)
    kid_gen, kid_gen_std = metrics.kid(f_gen, f_test, seed=seed)
    kid_real, _ = metrics.kid(f_train, f_test, seed=seed)
    labels = test_codes["labels"] if len(test_codes["labels"]) else None
    if labels is not None and not getattr(prior, "num_classes", 0):
        labels = None
    nearest = metrics.nearest_ssim(samples, references)
    nearest_real = metrics.nearest_ssim(test_images[:n], references)
    report = {
        "num_samples": n,
        "temperature": temperature,
        "seed": seed,
        "nll_bits_per_code": nll_bits_per_code(prior, test_codes["codes"], labels),
        "fid": metrics.fid(f_gen, f_test),
        "fid_real_baseline": metrics.fid(f_train, f_test),
        "kid": kid_gen,
        "kid_std": kid_gen_std,
        "kid_real_baseline": kid_real,
        "diversity_ms_ssim": metrics.mean_pairwise_ms_ssim(samples[:n], seed=seed),
        "diversity_ms_ssim_real": metrics.mean_pairwise_ms_ssim(test_images[:n], seed=seed),
        "memorisation_ssim_mean": float(nearest.mean()),
        "memorisation_ssim_max": float(nearest.max()),
        "memorisation_ssim_real_test_mean": float(nearest_real.mean()),
        "code_histogram": metrics.code_histogram_distance(sample_codes_, test_codes["codes"].long(), prior.num_embeddings),
        "feature_extractor": "VQ-VAE encoder, per-channel mean and std",
    }
    atomic_write_json(output_dir / "generation_metrics.json", report)
    rows = [[to_uint8(s[0]) for s in samples[i : i + 4]] + [to_uint8(r[0]) for r in test_images[i : i + 4]] for i in range(0, min(8, n), 4)]
    save_grid(output_dir / "samples_vs_real.png", rows)
    logger.info(f"Generation metrics written to {(output_dir / 'generation_metrics.json').resolve()}: {report}")
    return report
