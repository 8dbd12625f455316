"""Mixed precision per device: the autocast dtype to use, and when fp16 needs the engine's loss scaling.

MONAI 1.6.1's ``SupervisedTrainer(amp=True, amp_kwargs=...)`` creates a ``GradScaler`` at each ``run()`` and autocasts
with ``torch.autocast("cuda", **amp_kwargs)``; on any other device both are disabled. So the engine's own ``amp`` is
right for fp16 on CUDA (the only case that needs loss scaling), and an autocasting inferer
(:class:`bundle.engine.inferers.AutocastInferer`) covers bf16 on every device, where no scaler is needed.
"""

from __future__ import annotations

import warnings

import torch

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bfloat16 natively (not by emulation).

    Args:
        device: the device the network runs on.

    Returns:
        True on the CPU and on CUDA devices that PyTorch reports as natively supporting bf16 (compute capability 8.0
        or higher, or ROCm); False elsewhere.
    """
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


def resolve_amp_dtype(amp_dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The autocast dtype for ``amp_dtype`` on ``device``.

    Args:
        amp_dtype: ``"auto"`` (bf16 where the device supports it natively, else fp16), ``"bfloat16"``, ``"float16"``,
            ``"float32"``, or a ``torch.dtype`` among those.
        device: the device the network runs on.

    Returns:
        The dtype.

    Raises:
        ValueError: for an unknown name, or bf16 requested on a CUDA device without native bf16.
    """
    if amp_dtype == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    dtype = AMP_DTYPES.get(amp_dtype, amp_dtype) if isinstance(amp_dtype, str) else amp_dtype
    if dtype not in AMP_DTYPES.values():
        raise ValueError(f"amp_dtype must be 'auto' or one of {list(AMP_DTYPES)}, got {amp_dtype!r}.")
    if dtype == torch.bfloat16 and torch.device(device).type == "cuda" and not bf16_supported(device):
        raise ValueError(f"amp_dtype is bfloat16, but {device} does not support it natively: use 'auto' or 'float16'.")
    return dtype


def needs_grad_scaler(amp: bool, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether training must use the engine's own ``amp`` (autocast plus ``GradScaler``): fp16 autocast on CUDA.

    Use it as the value of ``SupervisedTrainer(amp=...)`` with ``amp_kwargs={"dtype": dtype}``, and autocast in the
    inferer only when it is False. fp16 on another device has no loss scaling in MONAI's engines: this warns.

    Args:
        amp: whether mixed precision is on.
        dtype: the autocast dtype (see :func:`resolve_amp_dtype`).
        device: the device the network trains on.

    Returns:
        True when loss scaling is needed and available.
    """
    if not amp or dtype != torch.float16:
        return False
    if torch.device(device).type == "cuda":
        return True
    warnings.warn(
        f"fp16 autocast on {torch.device(device).type} trains without loss scaling (MONAI's engines scale only on "
        "CUDA): small gradients may underflow; amp_dtype 'auto' or 'bfloat16' avoids it.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False
