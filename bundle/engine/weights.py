"""Loading trained weights: safe (``weights_only``) reads whose errors name the file and say what is wrong with it,
and strict, frozen loading into a network for inference."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# What a file that is not PyTorch weights usually is, by its first bytes.
_SIGNATURES = {
    b"\x1f\x8b": "a gzip file (a .nii.gz image?)",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"{": "JSON or text",
    b"[": "JSON or text",
}
_NIFTI_HEADER = (348).to_bytes(4, "little")
_ZIP_MAGIC = b"PK\x03\x04"


class WeightsFileError(ValueError):
    """A weights file that cannot be read: the message names the file and says what is wrong with it."""


def _diagnose(path: Path, error: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, in words, from the file's size and first bytes."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): the save was interrupted or the disk was full"
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return f"is truncated ({size} bytes, the end of the archive is missing): the save was interrupted"
        if isinstance(error, pickle.UnpicklingError):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
            what = f"it holds a {found.group(1)}" if found else "it holds Python objects"
            return (
                f"cannot be read safely: {what}, which a weights-only load refuses (was a whole model saved with "
                "torch.save(model)? Save model.state_dict() instead; never load untrusted files unsafely)"
            )
        return f"is a damaged PyTorch archive ({type(error).__name__}: {error})"
    if head.startswith(_NIFTI_HEADER):
        return "is a NIfTI image, not PyTorch weights"
    for magic, kind in _SIGNATURES.items():
        if head.startswith(magic):
            return f"is {kind}, not PyTorch weights"
    return f"is not a PyTorch weights file (it starts with bytes {head!r}; {size} bytes)"


def read_weights_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` whose errors name the file and say what is wrong with it.

    Args:
        path: the weights or checkpoint file.
        map_location: as for ``torch.load``.

    Returns:
        What ``torch.load`` returns.

    Raises:
        FileNotFoundError: no such file.
        WeightsFileError: the file is empty, truncated, not PyTorch weights, or holds objects a safe load refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights '{path}' not found: run training first or set the checkpoint path.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise WeightsFileError(f"weights file '{path}' {_diagnose(path, error)}.") from error


def _state_dict(content: Any, path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The state dict in a loaded file: the file itself or its ``"model"`` entry."""
    state = content.get("model", content) if isinstance(content, Mapping) else content
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"weights file '{path}' holds a {type(state).__name__}, not a state dict.")
    return state


def _mismatch_hint(network: torch.nn.Module, state: Mapping[str, Any]) -> str:
    expected = set(network.state_dict())
    if expected and not expected & set(state):
        return (
            f"none of its {len(state)} entries is a {type(network).__name__} parameter: is it another network's file "
            "(the prior's, or a VQ-VAE's for the prior)?"
        )
    if ("top.position" in expected) != ("top.position" in state):
        channels = state["top.position"].shape[1] if "top.position" in state else 0
        return f"its prior has {channels or 'no'} top position channels: pass --prior_top_position_channels {channels}"
    return "was it trained with other sizes, e.g. num_embeddings or channels?"


def load_weights(network: torch.nn.Module, ckpt_path: str | os.PathLike, device: torch.device | str) -> torch.nn.Module:
    """Loads ``ckpt_path`` (a state dict or ``{"model": state_dict}``) strictly, safely, and freezes the network.

    Args:
        network: the network to fill (not DDP-wrapped).
        ckpt_path: the weights file.
        device: where the network goes.

    Returns:
        The network in eval mode with gradients off.

    Raises:
        FileNotFoundError: no weights file; train first.
        WeightsFileError: the file is damaged or not weights (see :func:`read_weights_file`).
        RuntimeError: the weights do not fit this network (another codebook size or width), with both named.
    """
    state = _state_dict(read_weights_file(ckpt_path, map_location=device), ckpt_path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"weights '{ckpt_path}' do not fit {type(network).__name__} as configured "
            f"({_mismatch_hint(network, state)}): {error}"
        ) from error
    network.to(device).eval().requires_grad_(False)
    return network
