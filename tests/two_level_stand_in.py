"""Tiny stand-ins for the tests: the two-level VQ-VAE's interface (``index_quantize``, ``decode_samples``,
``encode``) and a two-level prior over its codebooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bundle.stage2_prior.two_level import TwoLevelPrior

SHAPES = ((4, 2), (8, 4))  # the stand-in VQ-VAE's code maps of 32 x 16 images


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


def tiny_prior(
    num_classes: int = 0, latent_shapes: tuple | None = SHAPES, head_scales: tuple[float, float] = (1.0, 10.0)
) -> TwoLevelPrior:
    """A seeded two-level prior over the stand-in's codebooks ``(6, 10)``.

    Args:
        num_classes: classes of a conditioned prior, 0 for none.
        latent_shapes: the code maps it must cover, or None.
        head_scales: factors for the weights of both levels' two head layers; larger ones peak the distributions,
            so that likelihoods differ from code to code and a wrong context shows in the samples.
    """
    torch.manual_seed(0)
    prior = TwoLevelPrior(
        (6, 10),
        channels=8,
        num_layers=(3, 2),
        kernel_size=3,
        head_channels=16,
        cond_channels=6,
        cond_blocks=1,
        num_classes=num_classes,
        latent_shapes=latent_shapes,
    )
    with torch.no_grad():
        for level in (prior.top, prior.bottom):
            level.head[1].weight.mul_(head_scales[0])
            level.head[3].weight.mul_(head_scales[1])
    return prior
