"""The two-level prior of a VQ-VAE-2: a top Gated PixelCNN, a bottom one conditioned on the top codes, and what
MONAI's engines need to train and validate them (``prepare_batch``, loss and per-level NLL metrics).

Wiring into ``monai.engines.SupervisedTrainer`` / ``SupervisedEvaluator``: :func:`prepare_code_batch` turns a
batch of :class:`~bundle.stage2_prior.codes.CodeDataset` items into ``(top, (top, bottom), (bottom,), kwargs)``,
so the engine calls ``inferer(top, network, bottom, **kwargs)``, i.e. ``prior(top, bottom, labels=...)``, stores
``pred = (top_logits, bottom_logits)`` and ``label = (top, bottom)``, and the loss is
``TwoLevelCrossEntropy()(pred, label)``. :class:`NLLBits` reads those two entries of the engine output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.metrics import Loss
from monai.utils import CommonKeys, ensure_tuple_rep
from torch import nn

from bundle.stage2_prior.pixelcnn import GatedPixelCNN, layers_to_cover, upsampling_ratio

__all__ = [
    "LEVELS",
    "TwoLevelPrior",
    "TwoLevelCrossEntropy",
    "NLLBits",
    "LevelOutput",
    "nll_bits",
    "image_nll_bits",
    "prepare_code_batch",
]

LEVELS = ("top", "bottom")


def _pair(value: int | Sequence[int], name: str, kind: type = int) -> tuple:
    """``(top, bottom)`` from one value for both or a pair; ``kind`` int also refuses floats, float takes both."""
    pair = ensure_tuple_rep(value, 2)
    allowed = (int, float) if kind is float else (int,)
    if not all(isinstance(v, allowed) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be a {kind.__name__} or a pair of them (top, bottom), got {value!r}.")
    return kind(pair[0]), kind(pair[1])


class TwoLevelPrior(nn.Module):
    """Priors over the top and bottom code maps of a two-level VQ-VAE.

    ``p(top, bottom | label) = p(top | label) * p(bottom | top, label)``: ``top`` is a Gated PixelCNN over the top
    map, ``bottom`` one over the bottom map whose gates also receive features of the whole top map (a non-causal
    conditioning stack, upsampled to the bottom map's size). Every per-level argument takes one int for both
    levels or a ``(top, bottom)`` pair.

    Args:
        num_embeddings: codebook sizes ``(top, bottom)``.
        channels: feature channels of each level's stacks. Default ``(64, 48)``: the top map has a quarter of
            the bottom map's positions (or a sixteenth), so a wider top costs little and carries the layout.
        num_layers: gated layers of each level. Default ``(16, 8)``: with kernel 5, 16 layers see the whole
            32 x 16 top map (15 are needed; 7 at 16 x 8); the bottom level gets the layout from the top codes
            and models local detail (it sees 17 rows above).
        kernel_size: odd kernel size of each level. Default 5.
        head_channels: hidden channels of each level's 1x1 output head. Default 128.
        cond_channels: channels of the bottom level's conditioning stack over the top codes. Default 32.
        cond_blocks: residual blocks of that stack at the top map's resolution. Default 2.
        num_classes: class labels for conditioning both levels, 0 for none.
        dropout: dropout probability inside each level's gated layers in training. Default 0 (none).
        latent_shapes: optional ``((h_t, w_t), (h_b, w_b))``; when given, the bottom shape must be a multiple of
            the top shape and the top prior must see the whole top map (checked here), and samplers use it.
        top_position_channels: channels of a learned position map of the top level, added inside its gates
            (``position_shape`` of :class:`~bundle.stage2_prior.pixelcnn.GatedPixelCNN`); 0 for none. It needs
            ``latent_shapes``, and the prior then takes only top maps of that shape.

    Raises:
        ValueError: if ``latent_shapes`` is inconsistent or missing for a position map, or the top prior does not
            cover the top map.
    """

    def __init__(
        self,
        num_embeddings: int | Sequence[int],
        channels: int | Sequence[int] = (64, 48),
        num_layers: int | Sequence[int] = (16, 8),
        kernel_size: int | Sequence[int] = 5,
        head_channels: int | Sequence[int] = 128,
        cond_channels: int = 32,
        cond_blocks: int = 2,
        num_classes: int = 0,
        latent_shapes: Sequence[Sequence[int]] | None = None,
        dropout: float | Sequence[float] = 0.0,
        top_position_channels: int = 0,
    ) -> None:
        super().__init__()
        if top_position_channels and latent_shapes is None:
            raise ValueError("a top position map (top_position_channels > 0) needs latent_shapes.")
        embeddings = _pair(num_embeddings, "num_embeddings")
        channels, num_layers = _pair(channels, "channels"), _pair(num_layers, "num_layers")
        kernel_size, head_channels = _pair(kernel_size, "kernel_size"), _pair(head_channels, "head_channels")
        dropout = _pair(dropout, "dropout", float)
        self.num_embeddings = embeddings
        self.num_classes = num_classes
        self.top = GatedPixelCNN(
            embeddings[0],
            channels[0],
            num_layers[0],
            kernel_size[0],
            num_classes,
            head_channels[0],
            cond_channels=top_position_channels,
            dropout=dropout[0],
            position_shape=latent_shapes[0] if top_position_channels else None,
        )
        self.bottom = GatedPixelCNN(
            embeddings[1],
            channels[1],
            num_layers[1],
            kernel_size[1],
            num_classes,
            head_channels[1],
            cond_embeddings=embeddings[0],
            cond_channels=cond_channels,
            cond_blocks=cond_blocks,
            dropout=dropout[1],
        )
        self.latent_shapes = None if latent_shapes is None else self._check_shapes(latent_shapes)
        self.frozen_levels: set[str] = set()

    def _check_shapes(self, latent_shapes: Sequence[Sequence[int]]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Validate ``((h_t, w_t), (h_b, w_b))`` against the architecture and return it as int tuples."""
        top, bottom = (tuple(int(s) for s in shape) for shape in latent_shapes)
        if len(top) != 2 or len(bottom) != 2:
            raise ValueError(f"latent_shapes must be ((h_t, w_t), (h_b, w_b)), got {latent_shapes!r}.")
        upsampling_ratio(top, bottom)
        if not self.top.covers(top):
            needed = layers_to_cover(top, self.top.kernel_size)
            raise ValueError(
                f"the top prior ({self.top.num_layers} layers, kernel {self.top.kernel_size}) does not see the whole "
                f"{top[0]} x {top[1]} top map: it needs at least {needed} layers."
            )
        return top, bottom

    def forward(
        self, top_codes: torch.Tensor, bottom_codes: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of both levels.

        Args:
            top_codes: integer ``[B, h_t, w_t]`` in ``[0, num_embeddings[0])``.
            bottom_codes: integer ``[B, h_b, w_b]`` in ``[0, num_embeddings[1])``, ``(h_b, w_b)`` a multiple of
                ``(h_t, w_t)``.
            labels: int64 ``[B]`` for a class-conditioned prior, else None.

        Returns:
            ``(top_logits [B, K_t, h_t, w_t], bottom_logits [B, K_b, h_b, w_b])``. A level named in
            ``frozen_levels`` (a level that stopped training, see
            :class:`~bundle.stage2_prior.level_stopping.LevelEarlyStopping`) is computed without gradients, which
            skips its share of the backward pass; when both are frozen both keep their gradients, so a trainer's
            backward still runs.
        """
        frozen = self.frozen_levels if set(LEVELS) - self.frozen_levels else set()
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and "top" not in frozen):
            top_logits = self.top(top_codes, labels)
        with torch.set_grad_enabled(grad and "bottom" not in frozen):
            bottom_logits = self.bottom(bottom_codes, labels, top_codes)
        return top_logits, bottom_logits


class TwoLevelCrossEntropy(nn.Module):
    """Training loss of a :class:`TwoLevelPrior`: the per-code mean cross-entropy of each level, summed.

    ``forward((top_logits, bottom_logits), (top_codes, bottom_codes)) -> scalar`` (nats).
    """

    def forward(self, logits: Sequence[torch.Tensor], codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: ``(top_logits [B, K_t, h_t, w_t], bottom_logits [B, K_b, h_b, w_b])``.
            codes: ``(top_codes, bottom_codes)``, int64 ``[B, h, w]``.

        Returns:
            Scalar tensor.
        """
        if len(logits) != 2 or len(codes) != 2:
            raise ValueError("logits and codes must be (top, bottom) pairs.")
        return F.cross_entropy(logits[0], codes[0]) + F.cross_entropy(logits[1], codes[1])


def nll_bits(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of one level's codes, in bits per code.

    Args:
        logits: ``[B, K, h, w]``.
        codes: int64 ``[B, h, w]``.

    Returns:
        Scalar tensor.
    """
    return F.cross_entropy(logits.float(), codes) / math.log(2)


def image_nll_bits(logits: Sequence[torch.Tensor], codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of both levels' codes of an image, in bits per image (the sum over codes).

    Args:
        logits: ``(top_logits, bottom_logits)``.
        codes: ``(top_codes, bottom_codes)``.

    Returns:
        Scalar tensor.
    """
    total = sum(F.cross_entropy(lg.float(), c, reduction="sum") for lg, c in zip(logits, codes))
    return total / (codes[0].shape[0] * math.log(2))


class LevelOutput:
    """Ignite ``output_transform``: ``(pred, label)`` of one level, or of both, from a MONAI engine's output.

    Args:
        level: ``"top"``, ``"bottom"`` or ``"image"`` (both levels, as pairs).
    """

    def __init__(self, level: str) -> None:
        if level not in (*LEVELS, "image"):
            raise ValueError(f"level must be 'top', 'bottom' or 'image', got {level!r}.")
        self.level = level

    def __call__(self, output: Mapping[str, Any]) -> tuple[Any, Any]:
        """Pick the level.

        Args:
            output: ``engine.state.output`` with ``pred`` ``(top_logits, bottom_logits)`` and ``label``
                ``(top_codes, bottom_codes)`` (engines with ``decollate=False``).

        Returns:
            ``(logits, codes)``.
        """
        pred, label = output[CommonKeys.PRED], output[CommonKeys.LABEL]
        if self.level == "image":
            return tuple(pred), tuple(label)
        index = LEVELS.index(self.level)
        return pred[index], label[index]


class NLLBits(Loss):
    """Ignite metric: NLL of a :class:`TwoLevelPrior` in bits per code of one level, or bits per image.

    Attach to a ``SupervisedEvaluator`` built with :func:`prepare_code_batch` and ``decollate=False``. Batches
    are weighted by their size, so the value is the mean over all maps.

    Args:
        level: ``"top"`` or ``"bottom"`` (bits per code of that level), or ``"image"`` (bits per image, both
            levels' codes summed).
        device: where the running sums live.
    """

    def __init__(self, level: str = "bottom", device: str | torch.device = "cpu") -> None:
        loss_fn = image_nll_bits if level == "image" else nll_bits
        super().__init__(
            loss_fn,
            output_transform=LevelOutput(level),
            batch_size=(lambda codes: len(codes[0])) if level == "image" else len,
            device=device,
            skip_unrolling=True,
        )
        self.level = level


def prepare_code_batch(
    batch: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
    non_blocking: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor], dict[str, torch.Tensor]]:
    """``prepare_batch`` for MONAI engines over :class:`~bundle.stage2_prior.codes.CodeDataset` batches.

    Args:
        batch: ``{"top": [B, h_t, w_t], "bottom": [B, h_b, w_b], optional "label": [B]}``, int64.
        device: where to move the tensors.
        non_blocking: asynchronous copies.
        kwargs: the engine's ``to_kwargs``; ignored (codes stay int64).

    Returns:
        ``(top, (top, bottom), (bottom,), {"labels": labels} or {})``: the engine calls
        ``inferer(top, network, bottom, labels=labels)`` and scores ``pred`` against ``(top, bottom)``.
    """
    top = batch["top"].to(device=device, non_blocking=non_blocking)
    bottom = batch["bottom"].to(device=device, non_blocking=non_blocking)
    extra = {"labels": batch["label"].to(device=device, non_blocking=non_blocking)} if "label" in batch else {}
    return top, (top, bottom), (bottom,), extra
