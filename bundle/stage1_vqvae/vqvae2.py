"""A two-level VQ-VAE (VQ-VAE-2, Razavi et al. 2019, https://arxiv.org/abs/1906.00446) from MONAI's VQ-VAE blocks.

Layout (2D, the default sizes for a 256 x 128 slice)::

    x ──bottom_encoder──► h_b (1/4) ──top_encoder──► z_t (1/8 or 1/16) ──top_quantizer──► q_t
                           │                                                          │
                           └─ concat(h_b, top_decoder(q_t)) ──bottom_projection──► z_b ──bottom_quantizer──► q_b
    reconstruction = decoder(concat(q_b, top_upsampler(q_t)))
    training only: thumbnail = top_head(top_upsampler(q_t)), L1 against the image average-pooled to 1/4

The top codes should hold the global layout and the bottom codes the detail, but nothing in the plain model makes
them: with 256 bottom codes at 1/4 the bottom map alone can carry the whole slice, and on the phantoms the decoder
learned to ignore the top codes (a slice decoded from another slice's top codes and its own bottom codes was that
slice unchanged), so samples got a body outline and no organs. The auxiliary thumbnail loss makes the top codes
predict a 1/4-resolution copy of the slice, i.e. carry its layout; the bottom prior, conditioned on them, then places
the detail. Order is always (top, bottom).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import Act
from monai.networks.nets.vqvae import Decoder, Encoder
from monai.utils import ensure_tuple_rep
from torch import nn

from bundle.stage1_vqvae.quantizer import ScriptableEMAQuantizer, straight_through

__all__ = ["VQVAE2"]

_DOWNSAMPLE = (2, 4, 1, 1)  # stride, kernel, dilation, padding: halves any even size
_UPSAMPLE = (2, 4, 1, 1, 0)  # stride, kernel, dilation, padding, output padding: doubles any size


class VQVAE2(nn.Module):
    """Two-level VQ-VAE: top codes at ``1 / (2**len(channels) * 2**top_downsamples)``, bottom codes at
    ``1 / 2**len(channels)`` of the image size (1/8 or 1/16, and 1/4, with the default two channel levels).

    Every spatial size of the input must be divisible by ``2**len(channels) * 2**top_downsamples`` (16 or 32 for
    the defaults; 256 x 128 and 256 x 144 both fit 16, and 256 x 128 fits 32); other sizes raise a ``ValueError``,
    so pad or crop in preprocessing (``ResizeWithPadOrCropd``). The quantisers run in fp32 under any autocast, and
    ``torch.jit.script`` compiles the module (``index_quantize`` and ``decode_samples`` are exported with it).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: image channels.
        out_channels: reconstruction channels.
        channels: channels of the bottom encoder's levels (one stride-2 step each) and of the final decoder; the
            top encoder and decoder use ``channels[-1]`` at each of their levels.
        num_res_layers: residual units per level, in every encoder and decoder.
        num_res_channels: channels inside the residual units, per level of ``channels`` (an int for all); the
            top levels use the last one.
        embedding_dim: length of the code vectors of both codebooks.
        num_embeddings: codebook sizes ``(top, bottom)``; an int gives both the same size.
        commitment_cost: weight of the commitment loss of each quantiser.
        decay: EMA decay of both codebooks.
        epsilon: Laplace smoothing of the EMA cluster sizes.
        top_downsamples: stride-2 steps from the bottom map to the top map (1: top at 1/8, 2: top at 1/16).
        return_loss: ``forward`` returns ``(reconstruction, quantization_loss)`` when True (training), else the
            reconstruction alone (bundle checks, TorchScript export, MONAI Label).
        dropout: dropout ratio in the encoders and decoders.
        act: activation type and arguments.
        output_act: activation of the reconstruction (None: linear).
        ddp_sync: sum the EMA statistics over ranks when a process group is initialised.
        top_reconstruction_weight: weight of the auxiliary loss (added to the quantisation loss ``forward``
            returns) that makes the top codes predict the image average-pooled to the bottom map's size; 0 turns
            it off. Not used at inference.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        num_res_layers: int = 2,
        num_res_channels: Sequence[int] | int = 16,
        embedding_dim: int = 32,
        num_embeddings: Sequence[int] | int = (256, 256),
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        top_downsamples: int = 1,
        return_loss: bool = True,
        dropout: float = 0.0,
        act: tuple | str | None = Act.RELU,
        output_act: tuple | str | None = None,
        ddp_sync: bool = True,
        top_reconstruction_weight: float = 0.0,
    ) -> None:
        super().__init__()
        res_channels = ensure_tuple_rep(num_res_channels, len(channels))
        top_embeddings, bottom_embeddings = ensure_tuple_rep(num_embeddings, 2)
        if top_downsamples < 1:
            raise ValueError(f"top_downsamples must be at least 1, got {top_downsamples}.")
        self.return_loss = return_loss
        self.top_downsamples = top_downsamples
        self.embedding_dim = embedding_dim
        self.num_embeddings: tuple[int, int] = (int(top_embeddings), int(bottom_embeddings))
        self.bottom_factor: int = 2 ** len(channels)
        self.top_factor: int = self.bottom_factor * 2**top_downsamples

        levels, top_levels = len(channels), top_downsamples
        top_channels, top_res = (channels[-1],) * top_levels, (res_channels[-1],) * top_levels
        common = {"spatial_dims": spatial_dims, "num_res_layers": num_res_layers, "dropout": dropout, "act": act}
        self.bottom_encoder = Encoder(
            in_channels=in_channels,
            out_channels=channels[-1],
            channels=channels,
            num_res_channels=res_channels,
            downsample_parameters=(_DOWNSAMPLE,) * levels,
            **common,
        )
        self.top_encoder = Encoder(
            in_channels=channels[-1],
            out_channels=embedding_dim,
            channels=top_channels,
            num_res_channels=top_res,
            downsample_parameters=(_DOWNSAMPLE,) * top_levels,
            **common,
        )
        self.top_decoder = Decoder(
            in_channels=embedding_dim,
            out_channels=embedding_dim,
            channels=top_channels,
            num_res_channels=top_res,
            upsample_parameters=(_UPSAMPLE,) * top_levels,
            output_act=None,
            **common,
        )
        self.bottom_projection = Convolution(
            spatial_dims, channels[-1] + embedding_dim, embedding_dim, kernel_size=1, conv_only=True
        )
        self.top_upsampler = _upsampler(spatial_dims, embedding_dim, top_levels, act)
        self.top_reconstruction_weight = float(top_reconstruction_weight)
        self.top_head = Convolution(spatial_dims, embedding_dim, out_channels, kernel_size=3, conv_only=True)
        self.thumbnail = (nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d)(self.bottom_factor)
        self.decoder = Decoder(
            in_channels=2 * embedding_dim,
            out_channels=out_channels,
            channels=channels,
            num_res_channels=res_channels,
            upsample_parameters=(_UPSAMPLE,) * levels,
            output_act=output_act,
            **common,
        )
        self.top_quantizer, self.bottom_quantizer = (
            ScriptableEMAQuantizer(
                spatial_dims=spatial_dims,
                num_embeddings=size,
                embedding_dim=embedding_dim,
                commitment_cost=commitment_cost,
                decay=decay,
                epsilon=epsilon,
                ddp_sync=ddp_sync,
            )
            for size in self.num_embeddings
        )

    def latent_shapes(self, image_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Code map shapes ``((top...), (bottom...))`` for images of spatial size ``image_size``.

        Raises:
            ValueError: when a size is not divisible by ``top_factor``.
        """
        sizes = [int(size) for size in image_size]
        self._check_sizes(sizes)
        return tuple(s // self.top_factor for s in sizes), tuple(s // self.bottom_factor for s in sizes)

    def _check_sizes(self, sizes: list[int]) -> None:
        for size in sizes:
            if size % self.top_factor != 0:
                raise ValueError(
                    f"VQVAE2 needs every spatial size divisible by {self.top_factor} (2**len(channels) * "
                    f"2**top_downsamples with top_downsamples={self.top_downsamples}), got {sizes}; pad or crop "
                    "the images first (e.g. ResizeWithPadOrCropd)."
                )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top encodings ``z_t`` (before quantisation) and bottom features ``h_b`` of ``images``."""
        self._check_sizes(list(images.shape[2:]))
        bottom_features = self.bottom_encoder(images)
        return self.top_encoder(bottom_features), bottom_features

    def quantize_top(self, encodings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(code vectors with straight-through gradient, commitment loss, indices)`` of the top level, in fp32."""
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            encodings = encodings.float()
            _, loss, indices = self.top_quantizer(encodings)
            return straight_through(self.top_quantizer.embed(indices), encodings), loss, indices

    def quantize_bottom(self, encodings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(code vectors with straight-through gradient, commitment loss, indices)`` of the bottom level."""
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            encodings = encodings.float()
            _, loss, indices = self.bottom_quantizer(encodings)
            return straight_through(self.bottom_quantizer.embed(indices), encodings), loss, indices

    def _quantize_levels(
        self, images: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``((q_t, q_b), summed quantisation loss, (top indices, bottom indices))``."""
        top_encodings, bottom_features = self.encode(images)
        top_quantized, top_loss, top_indices = self.quantize_top(top_encodings)
        bottom_encodings = self.bottom_projection(torch.cat([bottom_features, self.top_decoder(top_quantized)], 1))
        bottom_quantized, bottom_loss, bottom_indices = self.quantize_bottom(bottom_encodings)
        return (top_quantized, bottom_quantized), top_loss + bottom_loss, (top_indices, bottom_indices)

    def decode(self, top_quantized: torch.Tensor, bottom_quantized: torch.Tensor) -> torch.Tensor:
        """Images from the code vectors of both levels."""
        return self._decode_upsampled(self.top_upsampler(top_quantized), bottom_quantized)

    def _decode_upsampled(self, top_features: torch.Tensor, bottom_quantized: torch.Tensor) -> torch.Tensor:
        """Images from the top code vectors upsampled to the bottom map and the bottom code vectors."""
        return self.decoder(torch.cat([bottom_quantized, top_features], 1))

    @torch.jit.export
    def index_quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 codes ``(top [B, *top_shape], bottom [B, *bottom_shape])``; call in eval mode (in train mode the
        EMA codebooks update)."""
        return self._quantize_levels(images)[2]

    @torch.jit.export
    def decode_samples(self, top_codes: torch.Tensor, bottom_codes: torch.Tensor) -> torch.Tensor:
        """Images ``[B, out_channels, *image_size]`` from int64 code maps of both levels."""
        return self.decode(self.top_quantizer.embed(top_codes), self.bottom_quantizer.embed(bottom_codes))

    def forward(self, images: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``(reconstruction, quantization_loss)`` when ``return_loss``, else the reconstruction.

        The code vectors enter the decoder exactly as ``decode_samples`` looks them up, so in eval mode the
        reconstruction equals ``decode_samples(*index_quantize(images))``.
        """
        (top_quantized, bottom_quantized), loss, _ = self._quantize_levels(images)
        top_features = self.top_upsampler(top_quantized)
        reconstruction = self._decode_upsampled(top_features, bottom_quantized)
        if not self.return_loss:
            return reconstruction
        if self.top_reconstruction_weight > 0:
            loss = loss + self.top_reconstruction_weight * self.top_thumbnail_loss(top_features, images)
        return reconstruction, loss

    def top_thumbnail_loss(self, top_features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Mean absolute error of the thumbnail predicted from the upsampled top code vectors against ``images``
        average-pooled to the bottom map's size."""
        thumbnail = self.top_head(top_features)
        return torch.mean(torch.abs(thumbnail.float() - self.thumbnail(images).float()))


def _upsampler(spatial_dims: int, channels: int, steps: int, act: tuple | str | None) -> nn.Sequential:
    """``steps`` transposed stride-2 convolutions (activation between them) from the top map to the bottom map."""
    stride, kernel_size, dilation, padding, output_padding = _UPSAMPLE
    layers = [
        Convolution(
            spatial_dims=spatial_dims,
            in_channels=channels,
            out_channels=channels,
            strides=stride,
            kernel_size=kernel_size,
            adn_ordering="DA",
            act=act,
            norm=None,
            dilation=dilation,
            padding=padding,
            output_padding=output_padding,
            is_transposed=True,
            conv_only=step == steps - 1,
        )
        for step in range(steps)
    ]
    return nn.Sequential(*layers)
