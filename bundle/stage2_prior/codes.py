"""Stage-2 data: a data set encoded once into VQ-VAE code maps, cached on disk, served to the prior's trainer."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from bundle.engine.io import atomic_torch_save

logger = logging.getLogger(__name__)




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
) -> dict[str, Any]:
    """Encodes every image of ``dataset`` to codes once, or reuses the cache made from the same weights and files.

    The cache is keyed by the VQ-VAE weights' digest and the list of files, so retraining the VQ-VAE or changing
    the data re-encodes; anything else reuses it. In a distributed run rank 0 encodes and the others load its
    file, so every rank trains the prior on the same codes.

    Args:
        vqvae: the frozen VQ-VAE, in eval mode (in train mode ``index_quantize`` would update the codebook).
        dataset: items ``{"image": [1, H, W] tensor, optional "label": int}`` without random augmentation.
        cache_path: the ``.pt`` file for the codes.
        ckpt_path: the VQ-VAE weights file the codes come from (for the cache key).
        device: where to encode.
        batch_size: encoding batch size.

    Returns:
        ``{"codes": int16 [N, h, w], "labels": int64 [N] (or empty), "files": [...], "key": str}``.
    """
    if vqvae.training:
        raise RuntimeError("encode_dataset needs the VQ-VAE in eval mode: in train mode encoding moves the codebook.")
    files = [str(item["image"]) for item in getattr(dataset, "data", [])]
    key = hashlib.sha1((_file_digest(ckpt_path) + "\n" + "\n".join(files)).encode()).hexdigest()
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        cached = _load_cache(cache_path)
        if cached is None or cached["key"] != key:
            cached = _encode(vqvae, dataset, device, batch_size, files, key)
            atomic_torch_save(cached, cache_path)
            logger.info(f"Encoded {len(cached['codes'])} images to codes {tuple(cached['codes'].shape[1:])} in {cache_path}")
        else:
            logger.info(f"Reusing {len(cached['codes'])} cached code maps from {cache_path}")
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


def _encode(vqvae: torch.nn.Module, dataset: Dataset, device, batch_size: int, files: list[str], key: str) -> dict:
    codes, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        codes.append(vqvae.index_quantize(batch["image"].to(device)).to(torch.int16).cpu())
        if "label" in batch:
            labels.append(torch.as_tensor(batch["label"]).long().cpu())
    return {
        "codes": torch.cat(codes),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        "files": files,
        "key": key,
    }


class CodeDataset(Dataset):
    """Code maps from :func:`encode_dataset` as items ``{"codes": int64 [h, w], optional "label": int64}``.

    Args:
        encoded: the dict returned by :func:`encode_dataset`.
    """

    def __init__(self, encoded: dict[str, Any]) -> None:
        self.codes, self.labels = encoded["codes"], encoded["labels"]

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"codes": self.codes[index].long()}
        if len(self.labels):
            item["label"] = self.labels[index]
        return item


def prepare_code_batch(
    batch: dict[str, torch.Tensor], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple:
    """``prepare_batch`` for MONAI engines: the codes are both input and target; labels go to the network.

    Returns ``(codes, codes)`` or, with labels, ``(codes, codes, (), {"labels": labels})`` so that the engine
    calls ``inferer(codes, network, labels=labels)``.
    """
    codes = batch["codes"].to(device=device, non_blocking=non_blocking)
    if "label" not in batch:
        return codes, codes
    return codes, codes, (), {"labels": batch["label"].to(device=device, non_blocking=non_blocking)}
