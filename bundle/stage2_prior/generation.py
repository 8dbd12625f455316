"""New slices from the two-level prior: sample codes, decode them, save them, and measure how good they are."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bundle.engine.io import atomic_write_bytes, atomic_write_json, nifti_gz_bytes, save_grid, save_image_grid, to_uint8
from bundle.evaluation import metrics
from bundle.stage2_prior.sampling import level_generators, sample_codes
from bundle.stage2_prior.two_level import LEVELS

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
def nll_bits_per_code(
    prior: torch.nn.Module,
    top_codes: torch.Tensor,
    bottom_codes: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 16,
) -> tuple[float, float]:
    """Mean negative log-likelihood of code map pairs under the two-level prior, in bits per code of each level.

    Args:
        prior: the :class:`~bundle.stage2_prior.two_level.TwoLevelPrior` (its mode is restored afterwards).
        top_codes: integer ``[N, h_t, w_t]``.
        bottom_codes: integer ``[N, h_b, w_b]``.
        labels: int64 ``[N]`` for a class-conditioned prior, else None (or empty).
        batch_size: maps per forward pass.

    Returns:
        ``(top, bottom)`` bits per code.
    """
    prior = getattr(prior, "module", prior)
    was_training = prior.training
    prior.eval()
    device = next(prior.parameters()).device
    totals = [0.0, 0.0]
    try:
        for start in range(0, len(top_codes), batch_size):
            codes = [c[start : start + batch_size].long().to(device) for c in (top_codes, bottom_codes)]
            batch_labels = None if labels is None or not len(labels) else labels[start : start + batch_size].to(device)
            for level, logits in enumerate(prior(*codes, batch_labels)):
                totals[level] += F.cross_entropy(logits.float(), codes[level], reduction="sum").item()
    finally:
        prior.train(was_training)
    return totals[0] / top_codes.numel() / math.log(2), totals[1] / bottom_codes.numel() / math.log(2)


def _likelihood_report(prior: torch.nn.Module, codes: dict[str, Any]) -> dict[str, float]:
    """NLL of encoded real maps per level (bits per code) and per image (bits)."""
    labels = codes["labels"] if len(codes["labels"]) and getattr(prior, "num_classes", 0) else None
    top, bottom = nll_bits_per_code(prior, codes["top"], codes["bottom"], labels)
    per_image = top * codes["top"][0].numel() + bottom * codes["bottom"][0].numel()
    return {"nll_bits_top": top, "nll_bits_bottom": bottom, "nll_bits_image": per_image}


def _fidelity_report(
    features: Callable[[torch.Tensor], torch.Tensor],
    samples: torch.Tensor,
    test_images: torch.Tensor,
    train_images: torch.Tensor,
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    """FID and KID of samples against test slices, beside the train-vs-test floor."""
    f_gen, f_test, f_train = (
        metrics.encoder_features(features, x.to(device)) for x in (samples, test_images, train_images)
    )
    kid_gen, kid_gen_std = metrics.kid(f_gen, f_test, seed=seed)
    kid_real, _ = metrics.kid(f_train, f_test, seed=seed)
    return {
        "fid": metrics.fid(f_gen, f_test),
        "fid_real_baseline": metrics.fid(f_train, f_test),
        "kid": kid_gen,
        "kid_std": kid_gen_std,
        "kid_real_baseline": kid_real,
    }


def _diversity_memorisation_report(
    samples: torch.Tensor, test_images: torch.Tensor, references: torch.Tensor, seed: int
) -> dict[str, float]:
    """Pairwise MS-SSIM among samples and among test slices; nearest-training-slice SSIM of samples and test."""
    nearest = metrics.nearest_ssim(samples, references)
    nearest_real = metrics.nearest_ssim(test_images, references)
    return {
        "diversity_ms_ssim": metrics.mean_pairwise_ms_ssim(samples, seed=seed),
        "diversity_ms_ssim_real": metrics.mean_pairwise_ms_ssim(test_images, seed=seed),
        "memorisation_ssim_mean": float(nearest.mean()),
        "memorisation_ssim_max": float(nearest.max()),
        "memorisation_ssim_real_test_mean": float(nearest_real.mean()),
    }


def _code_histogram_report(
    num_embeddings: Sequence[int], sampled: Sequence[torch.Tensor], codes: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Code-usage distance between sampled and encoded real maps, per level."""
    return {
        f"code_histogram_{level}": metrics.code_histogram_distance(sampled[k], codes[level].long(), num_embeddings[k])
        for k, level in enumerate(LEVELS)
    }


def _realism_report(
    samples: torch.Tensor, test_images: torch.Tensor, train_images: torch.Tensor, seed: int
) -> dict[str, Any]:
    """Realism of samples against real slices: the classifier two-sample test and precision/recall of
    ``bundle.evaluation.realism`` go here (their calls and keys); empty until then.

    Args:
        samples: generated slices ``[n, 1, H, W]`` in ``[0, 1]``.
        test_images: as many real test slices.
        train_images: as many real training slices (the real-vs-real floor).
        seed: the report's seed.

    Returns:
        Report entries.
    """
    return {}


@torch.no_grad()
def generation_report(
    vqvae: torch.nn.Module,
    prior: torch.nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    test_codes: dict[str, Any],
    output_dir: str | os.PathLike,
    num_samples: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    num_memorisation_references: int | None = None,
    latent_shapes: Sequence[Sequence[int]] | None = None,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Generation metrics, written to ``<output_dir>/generation_metrics.json`` with a samples-vs-real picture.

    Features for FID/KID come from the bundle's own frozen encoder (no downloadable network exists here), so
    the figures compare runs of this bundle, not papers. Every statistic is computed at the same sample
    count, and the real-train vs real-test value is reported beside it as the floor to compare against.

    Args:
        vqvae: the frozen two-level VQ-VAE.
        prior: the trained :class:`~bundle.stage2_prior.two_level.TwoLevelPrior`.
        train_dataset: training slices (``{"image": ...}``, no augmentation), the memorisation references.
        test_dataset: test slices.
        test_codes: the test split encoded by :func:`bundle.stage2_prior.codes.encode_dataset`.
        output_dir: where the JSON, samples and picture go.
        num_samples: generated slices, and real slices per side of each comparison.
        temperature: prior temperature.
        seed: sampling seed.
        num_memorisation_references: training slices to compare each sample with (None: all).
        latent_shapes: ``((h_t, w_t), (h_b, w_b))``; None takes the prior's.
        features: image batch ``[B, 1, H, W]`` -> feature map ``[B, C, ...]`` for FID/KID; None uses
            ``vqvae.encode``.

    Returns:
        The metrics dict that was written: ``nll_bits_top``, ``nll_bits_bottom``, ``nll_bits_image``, FID/KID
        with their real baselines, diversity, memorisation and ``code_histogram_top`` / ``code_histogram_bottom``.
    """
    output_dir = Path(output_dir)
    prior = getattr(prior, "module", prior)
    samples, top, bottom = generate(vqvae, prior, num_samples, temperature, seed, latent_shapes=latent_shapes)
    (test_images,) = _load_images(test_dataset, _subset_indices(len(test_dataset), num_samples, seed))
    # The FID subset and the memorisation references often overlap (all of the training set by default): one read.
    train_images, references = _load_images(
        train_dataset,
        _subset_indices(len(train_dataset), num_samples, seed + 1),
        _subset_indices(len(train_dataset), num_memorisation_references, seed + 2),
    )
    n = min(len(samples), len(test_images), len(train_images))
    samples, test_images, train_images = samples[:n], test_images[:n], train_images[:n]
    feature_fn = features if features is not None else vqvae.encode
    device = next(vqvae.parameters()).device
    report: dict[str, Any] = {"num_samples": n, "temperature": temperature, "seed": seed}
    report.update(_likelihood_report(prior, test_codes))
    report.update(_fidelity_report(feature_fn, samples, test_images, train_images, device, seed))
    report.update(_diversity_memorisation_report(samples, test_images, references, seed))
    report.update(_code_histogram_report(prior.num_embeddings, (top, bottom), test_codes))
    report.update(_realism_report(samples, test_images, train_images, seed))
    extractor = "VQ-VAE encoder" if features is None else getattr(features, "__qualname__", type(features).__name__)
    report["feature_extractor"] = f"{extractor}, per-channel mean and std"
    atomic_write_json(output_dir / "generation_metrics.json", report)
    rows = [
        [to_uint8(s[0]) for s in samples[i : i + 4]] + [to_uint8(r[0]) for r in test_images[i : i + 4]]
        for i in range(0, min(8, n), 4)
    ]
    save_grid(output_dir / "samples_vs_real.png", rows)
    logger.info(f"Generation metrics written to {(output_dir / 'generation_metrics.json').resolve()}: {report}")
    return report
