"""An inferer that runs the network under autocast on any device, for ``SupervisedTrainer``/``Evaluator``."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from monai.inferers import Inferer

from bundle.engine.amp import resolve_amp_dtype


class AutocastInferer(Inferer):
    """Calls the network under ``torch.autocast`` for the input's device, optionally in channels-last layout.

    MONAI engines' own ``amp`` only autocasts on CUDA (with a fp16 ``GradScaler``); bf16 needs no scaler, so
    doing the autocast here gives mixed precision on the CPU too with the stock engines.

    Args:
        amp: whether to autocast.
        dtype: ``"auto"`` (bf16 where the input's device supports it, else fp16: see
            :func:`bundle.engine.amp.resolve_amp_dtype`), ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``. fp16
            training on CUDA wants a GradScaler: use the engine's ``amp`` then (:func:`bundle.engine.amp.needs_grad_scaler`).
        channels_last: convert 4D inputs to ``torch.channels_last`` (the network should be converted too).
        output_index: when the network returns a tuple, return only this element (e.g. 0, the reconstruction,
            for metrics); None returns the output as is.
    """

    def __init__(
        self,
        amp: bool = False,
        dtype: str | torch.dtype = "bfloat16",
        channels_last: bool = False,
        output_index: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("amp", amp), ("channels_last", channels_last)):
            if not isinstance(value, bool):
                raise TypeError(
                    f"{name} must be a bool, got {value!r}: on the command line write --{name} True or False."
                )
        if dtype != "auto":
            dtype = resolve_amp_dtype(dtype, "cpu")  # validates the name; device checks happen at the first call
        self.amp, self.dtype, self.channels_last, self.output_index = amp, dtype, channels_last, output_index
        self.device_dtypes: dict[torch.device, torch.dtype] = {}

    def autocast_dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype on ``device`` (resolved once per device)."""
        if device not in self.device_dtypes:
            self.device_dtypes[device] = resolve_amp_dtype(self.dtype, device)
        return self.device_dtypes[device]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        # With amp off, enter no autocast at all: an ``enabled=False`` region would switch off the engine's own amp.
        autocast = torch.autocast(inputs.device.type, self.autocast_dtype(inputs.device)) if self.amp else nullcontext()
        with autocast:
            outputs = network(inputs, *args, **kwargs)
        if isinstance(outputs, (tuple, list)):
            if self.output_index is not None:
                return _fp32(outputs[self.output_index])
            return type(outputs)(_fp32(o) for o in outputs)
        return _fp32(outputs)


def _fp32(value: Any) -> Any:
    # Losses and metrics downstream expect fp32 in the default memory layout.
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float().contiguous()
    return value
