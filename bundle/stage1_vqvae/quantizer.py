"""MONAI's EMA vector quantiser in a form that TorchScript compiles, with the same weights and behaviour."""

from __future__ import annotations

import torch
from monai.networks.layers.vector_quantizer import EMAQuantizer


class ScriptableEMAQuantizer(EMAQuantizer):
    """:class:`monai.networks.layers.vector_quantizer.EMAQuantizer` that ``torch.jit.script`` accepts.

    MONAI's ``distributed_synchronization`` calls ``torch.distributed.is_initialized``, which TorchScript cannot
    compile. Here the all-reduce lives in a method TorchScript skips (``torch.jit.unused``) and is only called in
    eager mode, so eager training still sums the codebook statistics over ranks when a process group is
    initialised (with ``ddp_sync=True``), and a scripted module (an exported, single-process model) skips it.
    The arguments and the state dict are those of ``EMAQuantizer``.
    """

    def distributed_synchronization(self, encodings_sum: torch.Tensor, dw: torch.Tensor) -> None:
        """Sums the per-code counts and vector sums over ranks in eager mode; a no-op in TorchScript.

        Args:
            encodings_sum: per-code counts of this batch, ``[num_embeddings]``.
            dw: per-code sums of the input vectors of this batch, ``[num_embeddings, embedding_dim]``.
        """
        if not torch.jit.is_scripting():
            self._all_reduce(encodings_sum, dw)

    @torch.jit.unused
    def _all_reduce(self, encodings_sum: torch.Tensor, dw: torch.Tensor) -> None:
        if self.ddp_sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tensor=encodings_sum, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(tensor=dw, op=torch.distributed.ReduceOp.SUM)


def straight_through(codes: torch.Tensor, encodings: torch.Tensor) -> torch.Tensor:
    """Code vectors in the forward pass, identity gradient to the encodings in the backward pass.

    Written as ``codes + (encodings - encodings.detach())`` rather than ``encodings + (codes - encodings).detach()``:
    the added term is exactly zero, so the forward value is bit-for-bit the code vectors that decoding from
    indices sees.

    Args:
        codes: the selected code vectors.
        encodings: the encoder outputs they replace (same shape).

    Returns:
        ``codes`` with the gradient of ``encodings``.
    """
    return codes + (encodings - encodings.detach())
