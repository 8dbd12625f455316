"""Each level of the two-level prior as a logits module for TorchScript export by tracing.

Both classes are :class:`~bundle.stage2_prior.two_level.TwoLevelPrior` subclasses, so the prior's checkpoint loads
into them unchanged. Their ``forward`` casts codes (and labels) to int64, so a float example input (what
``python -m monai.bundle ckpt_export --use_trace True --input_shape ...`` makes) traces the integer graph. Tracing
bakes the range checks of the embeddings out of the graph, so the exported modules do not validate codes.

* :class:`TopPriorLogits`: ``forward(top_codes [B, h_t, w_t], labels [B] or None) -> [B, K_t, h_t, w_t]``, one
  input, so ``ckpt_export`` can trace it.
* :class:`BottomPriorLogits`: ``forward(bottom_codes [B, h_b, w_b], top_codes [B, h_t, w_t], labels [B] or None)
  -> [B, K_b, h_b, w_b]``; two inputs, so trace it with ``torch.jit.trace(module, (bottom, top))``.
"""

from __future__ import annotations

import torch

from bundle.stage2_prior.two_level import TwoLevelPrior

__all__ = ["TopPriorLogits", "BottomPriorLogits"]


def _long(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.long()


class TopPriorLogits(TwoLevelPrior):
    """The top level of a :class:`~bundle.stage2_prior.two_level.TwoLevelPrior`: top codes to top logits."""

    def forward(  # type: ignore[override]
        self, top_codes: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Top logits.

        Args:
            top_codes: ``[B, h_t, w_t]`` codes (any dtype holding integers).
            labels: ``[B]`` for a class-conditioned prior, else None.

        Returns:
            ``[B, K_t, h_t, w_t]``.
        """
        return self.top(top_codes.long(), _long(labels))


class BottomPriorLogits(TwoLevelPrior):
    """The bottom level of a :class:`~bundle.stage2_prior.two_level.TwoLevelPrior`: bottom codes and the top
    codes that condition them to bottom logits."""

    def forward(  # type: ignore[override]
        self, bottom_codes: torch.Tensor, top_codes: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bottom logits.

        Args:
            bottom_codes: ``[B, h_b, w_b]`` codes (any dtype holding integers).
            top_codes: ``[B, h_t, w_t]`` codes.
            labels: ``[B]`` for a class-conditioned prior, else None.

        Returns:
            ``[B, K_b, h_b, w_b]``.
        """
        return self.bottom(bottom_codes.long(), _long(labels), top_codes.long())
