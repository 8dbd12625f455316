"""MONAI's VQ-VAE with the two changes this bundle needs; state dicts are identical to ``monai.networks.nets.VQVAE``."""

from __future__ import annotations

from typing import Any

import torch
from monai.networks import nets


class VQVAE(nets.VQVAE):
    """``monai.networks.nets.VQVAE`` with an fp32 quantiser and a choice of outputs.

    - MONAI only disables CUDA autocast around the nearest-code search; under CPU bf16 autocast the distance
      matrix would be computed in bf16, whose 8-bit mantissa makes near ties pick the wrong code.
    - Training needs ``(reconstruction, quantization_loss)`` from ``forward`` (so DDP sees the whole graph),
      while bundle checks (``verify_net_in_out``), TorchScript export and MONAI Label expect one tensor.
      ``return_loss`` chooses; the weights are the same, so ``models/model.pt`` loads either way.

    Args:
        return_loss: ``forward`` returns ``(reconstruction, quantization_loss)`` when True, else the
            reconstruction alone.
        kwargs: the arguments of :class:`monai.networks.nets.VQVAE`.
    """

    def __init__(self, return_loss: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.return_loss = return_loss

    def quantize(self, encodings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(encodings.device.type, enabled=False):
            return super().quantize(encodings.float())

    def index_quantize(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, *latent]``; call in eval mode, since in train mode the EMA codebook updates."""
        encodings = self.encode(images=images)
        with torch.autocast(encodings.device.type, enabled=False):
            return self.quantizer.quantize(encodings.float())

    def forward(self, images: torch.Tensor) -> Any:
        reconstruction, quantization_loss = super().forward(images)
        return (reconstruction, quantization_loss) if self.return_loss else reconstruction
