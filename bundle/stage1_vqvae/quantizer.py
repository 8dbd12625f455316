"""MONAI's EMA vector quantiser in a form that TorchScript compiles, with the same weights and behaviour, and without
the one-hot matrix of MONAI's version (about a tenth of a CPU training step at 64 x 32 codes and 256 entries)."""

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

    ``quantize`` and ``forward`` compute what MONAI's do without its ``[positions, num_embeddings]`` one-hot matrix:
    the nearest code comes from one fused ``addmm`` (the squared norm of the input does not change the nearest
    code), and the EMA statistics from ``bincount`` and ``index_add_``. Codes can differ from MONAI's only where two
    entries are equally near to rounding.
    """

    def nearest_codes(self, flat_input: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry of each row of ``flat_input`` (``[N, embedding_dim]``, fp32)."""
        codebook = self.embedding.weight
        return torch.addmm((codebook**2).sum(1), flat_input, codebook.t(), alpha=-2.0).argmin(1)

    def quantize(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened fp32 inputs ``[N, embedding_dim]``, their code indices ``[N]`` and the indices shaped as the
        inputs without their channel axis. (MONAI's second output is a one-hot matrix; here it is the indices.)"""
        indices_shape = list(inputs.shape)
        del indices_shape[1]
        flat_input = inputs.float().permute(self.flatten_permutation).contiguous().view(-1, self.embedding_dim)
        flat_indices = self.nearest_codes(flat_input)
        return flat_input, flat_indices, flat_indices.view(indices_shape)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MONAI's ``EMAQuantizer.forward``: ``(straight-through codes, commitment loss, indices)``; in training
        mode the codebook moves towards the mean of the inputs assigned to each code (EMA)."""
        flat_input, flat_indices, encoding_indices = self.quantize(inputs)
        quantized = self.embed(encoding_indices)
        if self.training:
            with torch.no_grad():
                self.ema_update(flat_input, flat_indices)
        loss = self.commitment_cost * torch.nn.functional.mse_loss(quantized.detach(), inputs)
        return inputs + (quantized - inputs).detach(), loss, encoding_indices

    def ema_update(self, flat_input: torch.Tensor, flat_indices: torch.Tensor) -> None:
        """MONAI's EMA codebook update, from per-code counts and vector sums of this batch (summed over ranks)."""
        encodings_sum = torch.bincount(flat_indices, minlength=self.num_embeddings).to(flat_input.dtype)
        dw = flat_input.new_zeros(self.num_embeddings, self.embedding_dim).index_add_(0, flat_indices, flat_input)
        if self.ddp_sync:
            self.distributed_synchronization(encodings_sum, dw)
        self.ema_cluster_size.data.mul_(self.decay).add_(torch.mul(encodings_sum, 1 - self.decay))
        n = self.ema_cluster_size.sum()
        weights = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.ema_w.data.mul_(self.decay).add_(torch.mul(dw, 1 - self.decay))
        self.embedding.weight.data.copy_(self.ema_w / weights.unsqueeze(1))

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
