"""Loading trained weights for inference: strict, safe (``weights_only``) and frozen."""

from __future__ import annotations

import os
from pathlib import Path

import torch

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
        RuntimeError: the weights do not fit this network (another codebook size or width), with both named.
    """
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"weights '{ckpt_path}' not found: run training first or set the checkpoint path.")
    state = torch.load(ckpt_path, map_location=device, weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"weights '{ckpt_path}' do not fit {type(network).__name__} as configured "
            f"(was it trained with other sizes, e.g. num_embeddings or channels?): {error}"
        ) from error
    network.to(device).eval().requires_grad_(False)
    return network
