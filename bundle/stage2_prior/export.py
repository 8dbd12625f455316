"""The prior in a single-input form for TorchScript export (``python -m monai.bundle ckpt_export``)."""

from __future__ import annotations

import torch

from bundle.stage2_prior.pixelcnn import GatedPixelCNN

class GatedPixelCNNLogits(GatedPixelCNN):
    """:class:`~bundle.stage2_prior.pixelcnn.GatedPixelCNN` whose ``forward`` casts codes (and labels) to int64.

    ``forward(codes [B, h, w], labels [B] or None) -> logits [B, num_embeddings, h, w]``. Tracing bakes the
    range checks of ``GatedPixelCNN.embed`` out of the graph, so the exported module does not validate codes.
    """

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(codes.long(), None if labels is None else labels.long())
