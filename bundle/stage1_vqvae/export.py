"""The decoder-only form of the VQ-VAE-2 for TorchScript export with ``python -m monai.bundle ckpt_export``.

``ckpt_export`` builds a network from a config ID, loads ``models/*.pt`` into it strictly, and scripts it (or, with
``--use_trace``, traces it with one random float input of ``--input_shape``). Sampling needs the decoder half, which
is not a plain ``forward(image)``:

* :class:`VQVAE2Decoder`: top and bottom code maps to images (``VQVAE2.decode_samples``). Two inputs, so export it
  by scripting (``ckpt_export`` without ``--use_trace`` and ``--input_shape``) or trace it yourself with a pair.

It loads the full ``models/model.pt``, skips the encoding weights, and casts its integer inputs with
``.long()``, so a trace with float inputs in [0, 1) (code 0) is valid; the exported module takes int64 code maps.
It keeps the weights' names, so use it by swapping the ``_target_`` of ``network_def`` on the command line
(see ``docs/distributed_and_export.md``). The prior's export form is in ``bundle.stage2_prior.export``."""

from __future__ import annotations

from typing import Any

import torch

from bundle.stage1_vqvae.vqvae2 import VQVAE2

# The modules of VQVAE2 that only encoding needs: images -> codes.
VQVAE2_ENCODING_MODULES = ("bottom_encoder", "top_encoder", "top_decoder", "bottom_projection")


class _DropWeights:
    """A ``load_state_dict`` pre-hook that drops the weights of the named submodules from the incoming state dict."""

    def __init__(self, *module_names: str) -> None:
        self.module_names = module_names

    def __call__(self, module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        prefixes = tuple(f"{prefix}{name}." for name in self.module_names)
        for key in [k for k in state_dict if k.startswith(prefixes)]:
            del state_dict[key]


class VQVAE2Decoder(VQVAE2):
    """The VQ-VAE-2's decoder half: ``forward(top_codes [B, h_t, w_t], bottom_codes [B, h_b, w_b]) -> images``.

    Same arguments as :class:`bundle.stage1_vqvae.vqvae2.VQVAE2` (``return_loss`` is ignored). The output is what
    ``decode_samples`` gives, unclamped. ``torch.jit.script`` compiles it; ``index_quantize`` is not available.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("return_loss", None)
        super().__init__(return_loss=False, **kwargs)
        for name in VQVAE2_ENCODING_MODULES:
            delattr(self, name)
        self.register_load_state_dict_pre_hook(_DropWeights(*VQVAE2_ENCODING_MODULES))

    @torch.jit.unused
    def index_quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Not available: the encoding modules are removed."""
        raise NotImplementedError("VQVAE2Decoder has no encoder; use VQVAE2.index_quantize.")

    def forward(self, top_codes: torch.Tensor, bottom_codes: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.decode_samples(top_codes.long(), bottom_codes.long())
