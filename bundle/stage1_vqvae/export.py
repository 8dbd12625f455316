"""Single-input forms of the bundle's networks for TorchScript export with ``python -m monai.bundle ckpt_export``.

``ckpt_export`` builds a network from a config ID, loads ``models/*.pt`` into it strictly, and traces it with one
random float input of ``--input_shape``. Sampling needs two pieces that are not a plain ``forward(image)``:

* :class:`VQVAEDecoder`: code maps ``[B, h, w]`` to images (``VQVAE.decode_samples``) — the VQ-VAE without its
  encoder, loading the full ``models/model.pt`` (the encoder's weights are skipped).
* :class:`GatedPixelCNNLogits`: the prior's logits for a code map, loading ``models/prior/prior.pt``.

Both cast their integer inputs with ``.long()``, so the float input that ``ckpt_export`` traces with (values in
[0, 1), i.e. code 0) gives a valid trace; the exported modules take int64 code maps. Neither changes the weights'
names, so use them by swapping the ``_target_`` of ``network_def`` / ``prior_def`` on the command line (see
``docs/distributed_and_export.md``)."""

from __future__ import annotations

from typing import Any

import torch

from bundle.stage1_vqvae.vqvae import VQVAE

def _drop_encoder_weights(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        del state_dict[key]


class VQVAEDecoder(VQVAE):
    """The VQ-VAE's decoder half: ``forward(codes [B, h, w]) -> images [B, out_channels, H, W]``.

    Same arguments as :class:`bundle.stage1_vqvae.vqvae.VQVAE` (``return_loss`` is ignored). The output is what
    ``decode_samples`` gives, unclamped (``bundle.stage2_prior.generation.generate`` clamps it to [0, 1]).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("return_loss", None)
        super().__init__(return_loss=False, **kwargs)
        del self.encoder
        self.register_load_state_dict_pre_hook(_drop_encoder_weights)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.decode_samples(codes.long())
