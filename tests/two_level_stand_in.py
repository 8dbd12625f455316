"""A tiny stand-in for the two-level VQ-VAE's interface (``index_quantize``, ``decode_samples``, ``encode``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyTwoLevelVQVAE(nn.Module):
    """Codes are argmaxes of strided convolutions: top at 1/8, bottom at 1/4 of the image.

    Args:
        num_embeddings: ``(top, bottom)`` codebook sizes.
    """

    def __init__(self, num_embeddings: tuple[int, int] = (6, 10)) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.top_proj = nn.Conv2d(1, num_embeddings[0], 8, stride=8)
        self.bottom_proj = nn.Conv2d(1, num_embeddings[1], 4, stride=4)
        self.top_values = nn.Embedding(num_embeddings[0], 1)
        self.bottom_values = nn.Embedding(num_embeddings[1], 1)

    def latent_shapes(self, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        return (image_size[0] // 8, image_size[1] // 8), (image_size[0] // 4, image_size[1] // 4)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.bottom_proj(images)

    def index_quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.top_proj(images).argmax(1), self.bottom_proj(images).argmax(1)

    def decode_samples(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        top_map = self.top_values(top).permute(0, 3, 1, 2)
        bottom_map = self.bottom_values(bottom).permute(0, 3, 1, 2)
        size = (bottom.shape[1] * 4, bottom.shape[2] * 4)
        return torch.sigmoid(F.interpolate(top_map, size=size) + F.interpolate(bottom_map, size=size))
