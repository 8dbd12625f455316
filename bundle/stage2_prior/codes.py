"""Stage-2 data: a data set encoded once into two-level VQ-VAE code maps, cached on disk, served to the prior's
trainer (batches go through :func:`bundle.stage2_prior.two_level.prepare_code_batch`)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from bundle.engine.io import atomic_torch_save

logger = logging.getLogger(__name__)

# part of the cache key: a cache written in another layout is re-encoded, not misread
CACHE_FORMAT = "two-level codes v1"


def _file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def encode_dataset(
    vqvae: torch.nn.Module,
    dataset: Dataset,
    cache_path: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    device: torch.device | str,
    batch_size: int = 32,
    mirror_axis: int | None = None,
) -> dict[str, Any]:
    """Encodes every image of ``dataset`` to top and bottom codes once, or reuses the cache made from the same
    weights and files.

    The cache is keyed by the VQ-VAE weights' digest and the list of files, so retraining the VQ-VAE or changing
    the data re-encodes; anything else reuses it. In a distributed run rank 0 encodes and the others load its
    file, so every rank holds the same codes (each then trains on its shard: :class:`CodeDataset`'s ``indices``).

    Args:
        vqvae: the frozen two-level VQ-VAE, in eval mode (in train mode ``index_quantize`` would update the
            codebooks); ``index_quantize(images)`` returns ``(top [B, h_t, w_t], bottom [B, h_b, w_b])``.
        dataset: items ``{"image": [1, H, W] tensor, optional "label": int}`` without random augmentation.
        cache_path: the ``.pt`` file for the codes.
        ckpt_path: the VQ-VAE weights file the codes come from (for the cache key).
        device: where to encode.
        batch_size: encoding batch size.
        mirror_axis: None, or a spatial axis (0 or 1) along which every image is also encoded mirrored: the
            mirrored copies follow the originals, so ``N`` is twice the data set (a prior's training data; left
            and right are axis 0 in the HipMRI layout).

    Returns:
        ``{"top": int16 [N, h_t, w_t], "bottom": int16 [N, h_b, w_b], "labels": int64 [N] (or empty),
        "files": [...], "key": str}``.

    Raises:
        ValueError: ``mirror_axis`` is not None, 0 or 1.
    """
    if vqvae.training:
        raise RuntimeError("encode_dataset needs the VQ-VAE in eval mode: in train mode encoding moves the codebook.")
    if mirror_axis is not None and (isinstance(mirror_axis, bool) or mirror_axis not in (0, 1)):
        raise ValueError(f"mirror_axis must be null, 0 or 1 (a spatial axis of the 2D slices), got {mirror_axis!r}.")
    files = [str(item["image"]) for item in getattr(dataset, "data", [])]
    if mirror_axis is not None:  # part of the cache key too
        files += [f"{name} (mirrored along spatial axis {mirror_axis})" for name in files]
    key = hashlib.sha1("\n".join([CACHE_FORMAT, _file_digest(ckpt_path), *files]).encode()).hexdigest()
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        cached = _load_cache(cache_path)
        if not isinstance(cached, dict) or cached.get("key") != key:
            cached = _encode(vqvae, dataset, device, batch_size, files, key, mirror_axis)
            atomic_torch_save(cached, cache_path)
            shapes = tuple(cached["top"].shape[1:]), tuple(cached["bottom"].shape[1:])
            logger.info(f"Encoded {len(cached['top'])} images to codes {shapes[0]} and {shapes[1]} in {cache_path}")
        else:
            logger.info(f"Reusing {len(cached['top'])} cached code map pairs from {cache_path}")
    if distributed:
        dist.barrier()
        cached = _load_cache(cache_path)
    return cached


def _load_cache(cache_path: str | os.PathLike) -> dict[str, Any] | None:
    if not Path(cache_path).is_file():
        return None
    try:
        return torch.load(cache_path, weights_only=True)
    except Exception as error:  # a cache is disposable: a damaged one is rebuilt, not fatal
        logger.warning(f"Ignoring unreadable code cache {cache_path}: {error}")
        return None


def _compact(codes: torch.Tensor) -> torch.Tensor:
    """Codes as int16 on the CPU (a quarter of int64 on disk and in memory)."""
    if codes.numel() and int(codes.max()) > torch.iinfo(torch.int16).max:
        raise ValueError(f"codes up to {int(codes.max())} do not fit the int16 cache.")
    return codes.to(torch.int16).cpu()


def _encode(
    vqvae: torch.nn.Module,
    dataset: Dataset,
    device: torch.device | str,
    batch_size: int,
    files: list[str],
    key: str,
    mirror_axis: int | None = None,
) -> dict[str, Any]:
    views = [None] if mirror_axis is None else [None, (2 + mirror_axis,)]  # flip dims of [B, C, H, W] images
    tops, bottoms = {view: [] for view in views}, {view: [] for view in views}
    labels = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):  # each file read once
        images = batch["image"].to(device)
        for view in views:
            top, bottom = vqvae.index_quantize(images if view is None else images.flip(view))
            tops[view].append(_compact(top))
            bottoms[view].append(_compact(bottom))
        if "label" in batch:
            labels.append(torch.as_tensor(batch["label"]).long().cpu())
    return {  # the mirrored copies follow all the originals
        "top": torch.cat([codes for view in views for codes in tops[view]]),
        "bottom": torch.cat([codes for view in views for codes in bottoms[view]]),
        "labels": torch.cat(labels * len(views)) if labels else torch.zeros(0, dtype=torch.long),
        "files": files,
        "key": key,
    }


class CodeDataset(Dataset):
    """Code map pairs from :func:`encode_dataset` as items
    ``{"top": int64 [h_t, w_t], "bottom": int64 [h_b, w_b], optional "label": int64}``.

    Args:
        encoded: the dict returned by :func:`encode_dataset`.
        indices: keep only these items, in this order (a copy of them), e.g. this process's shard of the
            training set in a distributed run; None keeps all.

    Attributes:
        files: the image file each item was encoded from (empty when ``encoded`` names none).
    """

    def __init__(self, encoded: dict[str, Any], indices: Sequence[int] | None = None) -> None:
        self.top, self.bottom, self.labels = encoded["top"], encoded["bottom"], encoded["labels"]
        if len(self.top) != len(self.bottom) or (len(self.labels) and len(self.labels) != len(self.top)):
            raise ValueError("top, bottom and (non-empty) labels must hold the same number of items.")
        files = list(encoded.get("files", []))
        self.files = files if len(files) == len(self.top) else []
        if indices is not None:
            index = torch.as_tensor(list(indices), dtype=torch.long)
            self.top, self.bottom = self.top[index], self.bottom[index]
            self.labels = self.labels[index] if len(self.labels) else self.labels
            self.files = [self.files[i] for i in index.tolist()] if self.files else []

    def __len__(self) -> int:
        return len(self.top)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"top": self.top[index].long(), "bottom": self.bottom[index].long()}
        if len(self.labels):
            item["label"] = self.labels[index]
        return item
