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
* optional class conditioning, a learned per-layer bias added inside every gate;
* optional spatial conditioning on another code map (the top map of a two-level
  VQ-VAE): a small non-causal stack over the embedded conditioning codes,
  upsampled to this map's size, projected per layer by a 1x1 convolution and
  added inside every gate of both stacks. The conditioning map is observed, so
  it is seen whole; causality only concerns the map being modelled.
* an optional learned position map (one feature vector per position of a map of
  fixed size) added to the conditioning features, or alone used as them: it
  tells every gate where it is, which zero-padded convolutions see only near the
  borders. It depends on no code, so it keeps the model causal.

Masking is implemented by padding, shifting and cropping (as in most reference
implementations), never by multiplying the weights with masks, so every
convolution only computes taps that are actually used.

Receptive field: with ``L = num_layers`` and ``p = kernel_size // 2``, the logit
at ``(i, j)`` depends on the codes at

* rows ``i - 1 - L*p .. i - 1`` and columns ``j - L*p .. j + L*p`` (above), and
* row ``i``, columns ``j - 1 - L*p .. j - 1`` (to the left),

clipped to the map. Nothing at or after ``(i, j)`` in raster order is seen.
:meth:`GatedPixelCNN.covers` tells whether every position sees every earlier one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GatedPixelCNN",
    "GatedLayer",
    "ConditionStack",
    "ResidualBlock",
    "VerticalConv",
    "HorizontalConv",
    "check_code_map",
    "down_shift",
    "gate",
    "layers_to_cover",
    "span_to_cover",
    "upsampling_ratio",
]

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_code_map(codes: torch.Tensor, num_embeddings: int, name: str = "codes") -> None:
    """Validate a batch of code maps.

    Args:
        codes: expected integer ``[B, H, W]`` in ``[0, num_embeddings)``.
        num_embeddings: codebook size.
        name: argument name for the messages.

    Raises:
        ValueError: for a wrong shape, dtype or out-of-range codes.
    """
    if codes.dim() != 3:
        raise ValueError(f"{name} must have shape [B, H, W], got {list(codes.shape)}.")
    if codes.dtype not in INTEGER_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {codes.dtype}.")
    # the range check reads values back (.item()), which would split a torch.compile graph; eager calls check
    if codes.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(codes)
        if lo.item() < 0 or hi.item() >= num_embeddings:
            raise ValueError(f"{name} must be in [0, {num_embeddings}), got range [{lo.item()}, {hi.item()}].")


def span_to_cover(shape: Sequence[int]) -> int:
    """Smallest receptive-field span ``L * (k // 2)`` with which every position of an ``(H, W)`` map sees every
    earlier position in raster order.

    Position ``(i, j)`` sees rows ``i - 1 - span .. i - 1`` within columns ``j +- span`` and its own row from
    column ``j - 1 - span``: the last row must reach row 0 (``span >= H - 2``) and the first column must reach
    the last one in the rows above (``span >= W - 1``); a single row only needs ``span >= W - 2``.

    Args:
        shape: ``(H, W)``.

    Returns:
        The span, ``>= 0``.
    """
    height, width = int(shape[0]), int(shape[1])
    needed = max(height - 2, width - 1) if height > 1 else width - 2
    return max(needed, 0)


def layers_to_cover(shape: Sequence[int], kernel_size: int) -> int:
    """Fewest gated layers of kernel size ``kernel_size`` whose receptive field covers an ``(H, W)`` map.

    Args:
        shape: ``(H, W)``.
        kernel_size: odd kernel size ``k >= 3``.

    Returns:
        ``ceil(span_to_cover(shape) / (k // 2))``, at least 1.
    """
    half = kernel_size // 2
    return max(1, -(-span_to_cover(shape) // half))


def upsampling_ratio(source: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """Integer ``(rows, columns)`` factors that take a ``source`` map shape to a ``target`` one.

    Args:
        source: ``(h, w)`` of the conditioning map.
        target: ``(H, W)`` of the conditioned map.

    Returns:
        ``(H // h, W // w)``.

    Raises:
        ValueError: if a target size is not a positive multiple of the source size.
    """
    ratio = []
    for small, large in zip(source, target):
        if small < 1 or large < small or large % small:
            raise ValueError(
                f"the conditioning map {tuple(source)} must divide the conditioned map {tuple(target)} exactly."
            )
        ratio.append(large // small)
    return ratio[0], ratio[1]


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


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``, the residual block of the conditioning stack.

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: tensor ``[B, C, H, W]``.

        Returns:
            Tensor of the same shape.
        """
        return x + self.body(x)


class ConditionStack(nn.Module):
    """Non-causal features of a conditioning code map, upsampled to the map that it conditions.

    Embedding, a 3x3 convolution and ``num_blocks`` residual blocks at the conditioning map's resolution, then
    nearest-neighbour upsampling by the integer ratio of the two shapes and a 3x3 convolution at the target
    resolution. The features are linear at the output: each gated layer projects them with its own 1x1
    convolution.

    Args:
        num_embeddings: codebook size of the conditioning map.
        channels: feature channels.
        num_blocks: residual blocks at the conditioning map's resolution.
    """

    def __init__(self, num_embeddings: int, channels: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding = nn.Embedding(num_embeddings, channels)
        self.blocks = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            *(ResidualBlock(channels) for _ in range(num_blocks)),
            nn.ReLU(),
        )
        self.refine = nn.Conv2d(channels, channels, 3, padding=1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Embed conditioning codes.

        Args:
            codes: integer ``[B, h, w]`` in ``[0, num_embeddings)``.

        Returns:
            Float tensor ``[B, channels, h, w]``.
        """
        check_code_map(codes, self.num_embeddings, "cond_codes")
        return self.embedding(codes.long()).permute(0, 3, 1, 2)

    def forward_embedded(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Features from already embedded codes (a continuous relaxation, e.g. for gradient checks).

        Args:
            x: float ``[B, channels, h, w]``.
            size: ``(H, W)`` of the conditioned map, a multiple of ``(h, w)``.

        Returns:
            Float tensor ``[B, channels, H, W]``.
        """
        upsampling_ratio(x.shape[-2:], size)
        features = F.interpolate(self.blocks(x), size=(int(size[0]), int(size[1])), mode="nearest")
        return self.refine(features)

    def forward(self, codes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Features of a conditioning code map at the conditioned map's size.

        Args:
            codes: integer ``[B, h, w]``.
            size: ``(H, W)``, a multiple of ``(h, w)``.

        Returns:
            Float tensor ``[B, channels, H, W]``.
        """
        return self.forward_embedded(self.embed(codes), size)


class GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack.

    Args:
        channels: feature channels ``C`` of both stacks (gates use ``2C``).
        kernel_size: odd kernel size ``k``.
        mask_type: ``"A"`` for the first layer, ``"B"`` otherwise.
        num_classes: number of labels for conditioning (0 for none).
        is_last: the last layer only feeds its skip, so it has no ``h_out`` (and returns its
            horizontal input unchanged), which keeps every parameter in use.
        cond_channels: channels of the spatial conditioning features (0 for none), projected by 1x1
            convolutions into both gates.
        dropout: dropout probability on the horizontal gate's output in training (it feeds the residual output
            and the skip); 0 for none.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        mask_type: str,
        num_classes: int = 0,
        is_last: bool = False,
        cond_channels: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.mask_type = mask_type
        self.v_conv = VerticalConv(channels, 2 * channels, kernel_size)
        self.h_conv = HorizontalConv(channels, 2 * channels, kernel_size, mask_type)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = None if is_last else nn.Conv2d(channels, channels, 1)
        self.h_skip = nn.Conv2d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # a residual in the type-A layer would pass the current position's own code through
        self.residual = mask_type == "B"
        self.num_classes = num_classes
        if num_classes > 0:
            self.cond_v = nn.Embedding(num_classes, 2 * channels)
            self.cond_h = nn.Embedding(num_classes, 2 * channels)
        self.cond_channels = cond_channels
        if cond_channels > 0:
            # no bias: the gate convolutions have one already
            self.cond_proj_v = nn.Conv2d(cond_channels, 2 * channels, 1, bias=False)
            self.cond_proj_h = nn.Conv2d(cond_channels, 2 * channels, 1, bias=False)

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run both stacks.

        Args:
            v: vertical stack input ``[B, C, H, W]``.
            h: horizontal stack input ``[B, C, H, W]``.
            labels: int64 ``[B]`` when the layer is class conditioned, else None.
            cond: conditioning features ``[B, cond_channels, H, W]`` when spatially conditioned, else None.

        Returns:
            ``(v_out, h_out, skip)``, each ``[B, C, H, W]`` (the last layer passes ``v`` and ``h`` through).
        """
        v_pre = self.v_conv(v)
        h_pre = self.h_conv(h)
        if self.num_classes > 0:
            v_pre = v_pre + self.cond_v(labels)[:, :, None, None]
            h_pre = h_pre + self.cond_h(labels)[:, :, None, None]
        if self.cond_channels > 0:
            v_pre = v_pre + self.cond_proj_v(cond)
            h_pre = h_pre + self.cond_proj_h(cond)
        h_pre = h_pre + self.v_to_h(down_shift(v_pre))
        g = self.dropout(gate(h_pre))
        if self.h_out is None:
            return v, h, self.h_skip(g)
        h_out = self.h_out(g)
        if self.residual:
            h_out = h_out + h
        return gate(v_pre), h_out, self.h_skip(g)


class GatedPixelCNN(nn.Module):
    """Gated PixelCNN over 2D maps of codebook indices (raster order), optionally conditioned.

    Args:
        num_embeddings: codebook size ``K``; codes are in ``[0, K)``.
        channels: feature channels of both stacks.
        num_layers: number of gated layers (the first has mask "A").
        kernel_size: odd kernel size ``k``; each layer grows the receptive field by ``k // 2``.
        num_classes: number of labels for class conditioning, 0 for no class conditioning.
        head_channels: hidden channels of the 1x1 output head.
        cond_embeddings: codebook size of a conditioning code map (the top map of a two-level model), 0 for no
            spatial conditioning.
        cond_channels: feature channels of the conditioning stack and the position map (used when
            ``cond_embeddings > 0`` or ``position_shape`` is given).
        cond_blocks: residual blocks of the conditioning stack (used when ``cond_embeddings > 0``).
        dropout: dropout probability inside every gated layer in training (see :class:`GatedLayer`), in
            ``[0, 1)``; sampling and evaluation run in eval mode, without it.
        position_shape: ``(H, W)`` to learn a position map of ``cond_channels`` features per position, added to
            the conditioning stack's features (used alone without a stack); the model then takes only ``H x W``
            maps. None for no position map.
    """

    def __init__(
        self,
        num_embeddings: int,
        channels: int = 64,
        num_layers: int = 8,
        kernel_size: int = 5,
        num_classes: int = 0,
        head_channels: int = 128,
        cond_embeddings: int = 0,
        cond_channels: int = 32,
        cond_blocks: int = 2,
        dropout: float = 0.0,
        position_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if num_embeddings < 1 or channels < 1 or num_layers < 1 or head_channels < 1 or num_classes < 0:
            raise ValueError("num_embeddings, channels, num_layers, head_channels must be >= 1, num_classes >= 0.")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}.")
        if cond_embeddings < 0 or (cond_embeddings > 0 and (cond_channels < 1 or cond_blocks < 0)):
            raise ValueError("cond_embeddings must be >= 0; when > 0, cond_channels >= 1 and cond_blocks >= 0.")
        if position_shape is not None and (len(position_shape) != 2 or min(position_shape) < 1 or cond_channels < 1):
            raise ValueError(f"position_shape must be (H, W) >= 1 with cond_channels >= 1, got {position_shape!r}.")
        self.num_embeddings = num_embeddings
        self.channels = channels
        self.num_layers = num_layers
        self.kernel_size = kernel_size
        self.num_classes = num_classes
        self.head_channels = head_channels
        self.cond_embeddings = cond_embeddings
        self.cond_channels = cond_channels if cond_embeddings > 0 or position_shape is not None else 0

        self.embedding = nn.Embedding(num_embeddings, channels)
        self.cond_stack = ConditionStack(cond_embeddings, cond_channels, cond_blocks) if cond_embeddings else None
        self.layers = nn.ModuleList(
            GatedLayer(
                channels,
                kernel_size,
                "A" if i == 0 else "B",
                num_classes,
                is_last=i == num_layers - 1,
                cond_channels=self.cond_channels,
                dropout=dropout,
            )
            for i in range(num_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, head_channels, 1), nn.ReLU(), nn.Conv2d(head_channels, num_embeddings, 1)
        )
        self.position = None
        if position_shape is not None:
            self.position = nn.Parameter(0.1 * torch.randn(1, cond_channels, *(int(s) for s in position_shape)))

    @property
    def receptive_field(self) -> tuple[int, int]:
        """``(rows_above, half_width)``: rows ``i-rows_above .. i-1`` within ``j +- half_width`` are seen.

        The current row is seen for columns ``j - half_width - 1 .. j - 1``.
        """
        span = self.num_layers * (self.kernel_size // 2)
        return span + 1, span

    def covers(self, shape: Sequence[int]) -> bool:
        """Whether every position of an ``(H, W)`` map sees every earlier position in raster order.

        Args:
            shape: ``(H, W)``.

        Returns:
            True when ``num_layers * (kernel_size // 2) >= span_to_cover(shape)``.
        """
        return self.receptive_field[1] >= span_to_cover(shape)

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
        if labels.dtype not in INTEGER_DTYPES:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}.")
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape [{batch_size}], got {list(labels.shape)}.")
        if labels.numel() > 0 and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(labels)
            if lo.item() < 0 or hi.item() >= self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}), got range [{lo.item()}, {hi.item()}].")

    def condition(self, cond_codes: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | None:
        """Conditioning features at the modelled map's size, computed once per map: those of ``cond_codes`` plus
        the position map, each where the model has it.

        Args:
            cond_codes: integer ``[B, h, w]`` for a spatially conditioned model, else None.
            shape: ``(B, H, W)`` of the modelled code maps; ``(H, W)`` must be multiples of ``(h, w)``.

        Returns:
            Float ``[B, cond_channels, H, W]``, or None for a model with neither.

        Raises:
            ValueError: if ``cond_codes`` are given to a model without a conditioning stack, missing for one with
                it, or have a wrong batch size, shape, dtype or range, or if ``(H, W)`` is not the position map's.
        """
        features = self.code_features(cond_codes, shape)
        if self.position is None:
            return features
        expected, got = tuple(self.position.shape[-2:]), tuple(shape[-2:])
        if got != expected:
            raise ValueError(f"the model has a position map for {expected} maps; got a map of {got}.")
        position = self.position.expand(shape[0], -1, -1, -1)
        return position if features is None else features + position

    def code_features(self, cond_codes: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | None:
        """The conditioning stack's features of ``cond_codes`` at ``shape`` ``(B, H, W)``; None without a stack."""
        if self.cond_stack is None:
            if cond_codes is not None:
                raise ValueError("cond_codes were given but the model has no spatial conditioning (cond_embeddings=0).")
            return None
        if cond_codes is None:
            raise ValueError(
                f"the model is conditioned on a code map (cond_embeddings={self.cond_embeddings}); "
                "cond_codes are required."
            )
        if cond_codes.dim() != 3 or cond_codes.shape[0] != shape[0]:
            raise ValueError(f"cond_codes must have shape [{shape[0]}, h, w], got {list(cond_codes.shape)}.")
        return self.cond_stack(cond_codes, shape[-2:])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Embed a code map.

        Args:
            codes: integer ``[B, H, W]`` in ``[0, num_embeddings)``.

        Returns:
            Float tensor ``[B, channels, H, W]``.

        Raises:
            ValueError: for a wrong shape, dtype or out-of-range codes.
        """
        check_code_map(codes, self.num_embeddings)
        return self.embedding(codes.long()).permute(0, 3, 1, 2)

    def forward_embedded(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits from an already embedded map (a continuous relaxation, e.g. for gradient checks).

        Args:
            x: float ``[B, channels, H, W]``.
            labels: int64 ``[B]`` or None.
            cond: conditioning features ``[B, cond_channels, H, W]`` from :meth:`condition`, or None.

        Returns:
            Logits ``[B, num_embeddings, H, W]``.
        """
        self.check_labels(labels, x.shape[0])
        if (cond is None) != (self.cond_channels == 0):
            raise ValueError(
                "cond features must be given exactly when the model has a conditioning stack or a position map."
            )
        if cond is not None and cond.shape != (x.shape[0], self.cond_channels, *x.shape[2:]):
            raise ValueError(f"cond must have shape [B, {self.cond_channels}, H, W] like x, got {list(cond.shape)}.")
        v, h, skip = x, x, None
        for layer in self.layers:
            v, h, s = layer(v, h, labels, cond)
            skip = s if skip is None else skip + s
        return self.head(skip)

    def forward(
        self, codes: torch.Tensor, labels: torch.Tensor | None = None, cond_codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of ``p(code[i, j] | codes before (i, j) in raster order, label, cond_codes)``.

        Args:
            codes: integer ``[B, H, W]`` in ``[0, num_embeddings)``.
            labels: int64 ``[B]`` for a class-conditioned model, else None.
            cond_codes: integer ``[B, h, w]`` in ``[0, cond_embeddings)`` for a spatially conditioned model
                (``H``, ``W`` multiples of ``h``, ``w``), else None.

        Returns:
            Float logits ``[B, num_embeddings, H, W]``.
        """
        x = self.embed(codes)
        return self.forward_embedded(x, labels, self.condition(cond_codes, codes.shape))
