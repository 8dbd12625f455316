"""Whether ``torch.compile`` can run here, so that a config's ``compile: true`` falls back to eager cleanly."""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger(__name__)


def compile_unavailable_reason(device: torch.device | str, backend: str = "inductor") -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot run on ``device`` here, or None when it can.

    Checked up front because these failures only surface at the first forward pass, deep in a training run:
    TorchDynamo must support this Python, and the default ``inductor`` backend needs a C++ compiler for CPU
    code and Triton for CUDA code.

    Args:
        device: the device the compiled network runs on.
        backend: the ``torch.compile`` backend; only ``inductor`` has prerequisites checked here.

    Returns:
        A short reason, or None.
    """
    device = torch.device(device)
    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python or platform"
    if backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "the inductor backend needs Triton for CUDA, and it is not installed"
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as error:  # noqa: BLE001  (InvalidCxxCompiler, or an OSError from the search)
            return f"the inductor backend needs a C++ compiler for CPU code ({type(error).__name__}: {error})"
    return None


def use_compile(requested: bool, device: torch.device | str, compile_kwargs: dict | None = None) -> bool:
    """The value for an engine's ``compile`` argument: ``requested``, unless compiling cannot work here.

    When it is not possible (see :func:`compile_unavailable_reason`) this warns and returns False, so the
    workflow trains eagerly. When it is, this also sets ``torch._dynamo.config.suppress_errors``, so that a
    function TorchDynamo or the backend fails on at run time runs eagerly (PyTorch logs the error) instead of
    ending the run.

    Args:
        requested: the config's ``compile`` setting.
        device: the device the engine runs on.
        compile_kwargs: the config's ``compile_kwargs`` (for its ``backend``).

    Returns:
        Whether to compile.
    """
    if not requested:
        return False
    backend = (compile_kwargs or {}).get("backend", "inductor")
    reason = compile_unavailable_reason(device, backend if isinstance(backend, str) else "")
    if reason:
        warnings.warn(f"compile is true, but {reason}: training runs eagerly.", RuntimeWarning, stacklevel=2)
        return False
    torch._dynamo.config.suppress_errors = True
    logger.info("torch.compile on %s with %s", device, compile_kwargs or "default settings")
    return True
