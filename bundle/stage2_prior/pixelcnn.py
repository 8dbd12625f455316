"""Gated PixelCNN prior over VQ-VAE code maps.

Implements the Gated PixelCNN of van den Oord et al. (2016), "Conditional Image
Generation with PixelCNN Decoders", for 2D maps of integer codes:

* a vertical stack that sees every row above the current one (full width within
  the kernel) and a horizontal stack that sees the pixels to the left in the
  current row, so there is no blind spot;
* gated ``tanh(a) * sigmoid(b)`` units in both stacks;
* a 1x1 link from the vertical to the horizontal stack (after shifting the
  vertical features down by one row, so the current row is never seen);
* a residual connection in the horizontal stack and skip connections summed
  into a small 1x1 output head;
* mask type "A" in the first layer (the current position is not seen) and "B"
  afterwards;
* optional class conditioning, a learned per-layer bias added inside every gate.

Masking is implemented by padding, shifting and cropping (as in most reference
implementations), never by multiplying the weights with masks, so every
convolution only computes taps that are actually used.

Receptive field: with ``L = num_layers`` and ``p = kernel_size // 2``, the logit
at ``(i, j)`` depends on the codes at

* rows ``i - 1 - L*p .. i - 1`` and columns ``j - L*p .. j + L*p`` (above), and
* row ``i``, columns ``j - 1 - L*p .. j - 1`` (to the left),

clipped to the map. Nothing at or after ``(i, j)`` in raster order is seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedPixelCNN", "GatedLayer", "VerticalConv", "HorizontalConv", "down_shift", "gate"]


def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation ``tanh(a) * sigmoid(b)`` over the two channel halves.

    Args:
        x: tensor with ``2 * C`` channels in dim 1.

    Returns:
        Tensor with ``C`` channels.
    """
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Shift a ``[B, C, H, W]`` map down by one row, filling the first row with zeros.

    Used on the vertical stack before it feeds the horizontal stack: vertical
    features at row ``i`` include row ``i`` itself, so the horizontal stack at row
    ``i`` must only receive the vertical features of row ``i - 1``.

    Args:
        x: tensor ``[B, C, H, W]``.

    Returns:
        Tensor of the same shape.
    """
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


class VerticalConv(nn.Module):
    """``(k//2 + 1) x k`` convolution whose output row ``i`` sees input rows ``i - k//2 .. i``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel width ``k``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.pad = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, (self.pad + 1, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolution.

        Args:
            x: tensor ``[B, C_in, H, W]``.

        Returns:
            Tensor ``[B, C_out, H, W]``.
        """
        # pad left/right for "same" width and only on top, so no row below is seen
        return self.conv(F.pad(x, (self.pad, self.pad, self.pad, 0)))


class HorizontalConv(nn.Module):
    """``1 x (k//2 + 1)`` convolution over the current row.

    Output column ``j`` sees input columns ``j - k//2 .. j`` (mask "B") or
    ``j - k//2 - 1 .. j - 1`` (mask "A", the input is shifted right by one column
    so the current position is excluded).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel width ``k``.
        mask_type: ``"A"`` or ``"B"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str) -> None:
        super().__init__()
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}.")
        self.pad = kernel_size // 2
        self.mask_type = mask_type
        self.conv = nn.Conv2d(in_channels, out_channels, (1, self.pad + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolution.

        Args:
            x: tensor ``[B, C_in, H, W]``.

        Returns:
            Tensor ``[B, C_out, H, W]``.
        """
        if self.mask_type == "A":
            # one extra zero column on the left and drop the last one: a shift right by one
            x = F.pad(x, (self.pad + 1, 0))[..., :-1]
        else:
            x = F.pad(x, (self.pad, 0))
        return self.conv(x)


class GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack.

    Args:
        channels: feature channels ``C`` of both stacks (gates use ``2C``).
        kernel_size: odd kernel size ``k``.
        mask_type: ``"A"`` for the first layer, ``"B"`` otherwise.
        num_classes: number of labels for conditioning (0 for none).
        is_last: the last layer only feeds its skip, so it has no ``h_out`` (and returns its
            horizontal input unchanged), which keeps every parameter in use.
    """

    def __init__(
        self, channels: int, kernel_size: int, mask_type: str, num_classes: int = 0, is_last: bool = False
    ) -> None:
        super().__init__()
        self.mask_type = mask_type
        self.v_conv = VerticalConv(channels, 2 * channels, kernel_size)
        self.h_conv = HorizontalConv(channels, 2 * channels, kernel_size, mask_type)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = None if is_last else nn.Conv2d(channels, channels, 1)
        self.h_skip = nn.Conv2d(channels, channels, 1)
        # a residual in the type-A layer would pass the current position's own code through
        self.residual = mask_type == "B"
        self.num_classes = num_classes
        if num_classes > 0:
            self.cond_v = nn.Embedding(num_classes, 2 * channels)
            self.cond_h = nn.Embedding(num_classes, 2 * channels)

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run both stacks.

        Args:
            v: vertical stack input ``[B, C, H, W]``.
            h: horizontal stack input ``[B, C, H, W]``.
            labels: int64 ``[B]`` when the layer is conditioned, else None.

        Returns:
            ``(v_out, h_out, skip)``, each ``[B, C, H, W]`` (the last layer passes ``v`` and ``h`` through).
        """
        v_pre = self.v_conv(v)
        h_pre = self.h_conv(h)
        if self.num_classes > 0:
            v_pre = v_pre + self.cond_v(labels)[:, :, None, None]
            h_pre = h_pre + self.cond_h(labels)[:, :, None, None]
        h_pre = h_pre + self.v_to_h(down_shift(v_pre))
        g = gate(h_pre)
        if self.h_out is None:
            return v, h, self.h_skip(g)
        h_out = self.h_out(g)
        if self.residual:
            h_out = h_out + h
        return gate(v_pre), h_out, self.h_skip(g)


class GatedPixelCNN(nn.Module):
    """Gated PixelCNN over 2D maps of codebook indices (raster order).

    Args:
        num_embeddings: codebook size ``K``; codes are in ``[0, K)``.
        channels: feature channels of both stacks.
        num_layers: number of gated layers (the first has mask "A").
        kernel_size: odd kernel size ``k``; each layer grows the receptive field by ``k // 2``.
        num_classes: number of labels for class conditioning, 0 for an unconditioned model.
        head_channels: hidden channels of the 1x1 output head.
    """

    def __init__(
        self,
        num_embeddings: int,
        channels: int = 64,
        num_layers: int = 8,
        kernel_size: int = 5,
        num_classes: int = 0,
        head_channels: int = 128,
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or channels < 1 or num_layers < 1 or head_channels < 1 or num_classes < 0:
            raise ValueError("num_embeddings, channels, num_layers, head_channels must be >= 1, num_classes >= 0.")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}.")
        self.num_embeddings = num_embeddings
        self.channels = channels
        self.num_layers = num_layers
        self.kernel_size = kernel_size
        self.num_classes = num_classes
        self.head_channels = head_channels

        self.embedding = nn.Embedding(num_embeddings, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel_size, "A" if i == 0 else "B", num_classes, is_last=i == num_layers - 1)
            for i in range(num_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, head_channels, 1),
            nn.ReLU(),
            nn.Conv2d(head_channels, num_embeddings, 1),
        )

    @property
    def receptive_field(self) -> tuple[int, int]:
        """``(rows_above, half_width)``: rows ``i-rows_above .. i-1`` within ``j +- half_width`` are seen.

        The current row is seen for columns ``j - half_width - 1 .. j - 1``.
        """
        span = self.num_layers * (self.kernel_size // 2)
        return span + 1, span

    def check_labels(self, labels: torch.Tensor | None, batch_size: int) -> None:
        """Validate ``labels`` against the model's conditioning.

        Args:
            labels: int64 ``[B]`` or None.
            batch_size: expected ``B``.

        Raises:
            ValueError: if labels are given to an unconditioned model, missing for a
                conditioned one, or have the wrong shape, dtype or range.
        """
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("labels were given but the model is unconditioned (num_classes=0).")
            return
        if labels is None:
            raise ValueError(f"the model is conditioned (num_classes={self.num_classes}); labels are required.")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}.")
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape [{batch_size}], got {list(labels.shape)}.")
        # the range checks read values back (.item()), which would split a torch.compile graph; eager calls check
        if labels.numel() > 0 and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(labels)
            if lo.item() < 0 or hi.item() >= self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}), got range [{lo.item()}, {hi.item()}].")

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Embed a code map.

        Args:
            codes: int64 ``[B, H, W]`` in ``[0, num_embeddings)``.

        Returns:
            Float tensor ``[B, channels, H, W]``.

        Raises:
            ValueError: for a wrong shape, dtype or out-of-range codes.
        """
        if codes.dim() != 3:
            raise ValueError(f"codes must have shape [B, H, W], got {list(codes.shape)}.")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}.")
        if codes.numel() > 0 and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(codes)
            if lo.item() < 0 or hi.item() >= self.num_embeddings:
                raise ValueError(
                    f"codes must be in [0, {self.num_embeddings}), got range [{lo.item()}, {hi.item()}]."
                )
        return self.embedding(codes.long()).permute(0, 3, 1, 2)

    def forward_embedded(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from an already embedded map (a continuous relaxation, e.g. for gradient checks).

        Args:
            x: float ``[B, channels, H, W]``.
            labels: int64 ``[B]`` or None.

        Returns:
            Logits ``[B, num_embeddings, H, W]``.
        """
        self.check_labels(labels, x.shape[0])
        v, h, skip = x, x, None
        for layer in self.layers:
            v, h, s = layer(v, h, labels)
            skip = s if skip is None else skip + s
        return self.head(skip)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``p(code[i, j] | codes before (i, j) in raster order, label)``.

        Args:
            codes: int64 ``[B, H, W]`` in ``[0, num_embeddings)``.
            labels: int64 ``[B]`` for a conditioned model, else None.

        Returns:
            Float logits ``[B, num_embeddings, H, W]``.
        """
        return self.forward_embedded(self.embed(codes), labels)
