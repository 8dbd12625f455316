"""``torch.compile`` that can run here, and that falls back to eager, graph by graph, when compiling fails."""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


def compile_unavailable_reason(device: torch.device | str, backend: str = "inductor") -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot run on ``device`` here, or None when it can.

    Checked up front because these failures only surface at the first forward pass, deep in a training run:
    TorchDynamo must support this Python, and the default ``inductor`` backend needs a C++ compiler for CPU code
    and a working Triton for CUDA code (see :func:`triton_unavailable_reason`).

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
        return triton_unavailable_reason(device)
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as error:  # noqa: BLE001  (InvalidCxxCompiler, or an OSError from the search)
            return f"the inductor backend needs a C++ compiler for CPU code ({type(error).__name__}: {error})"
    return None


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Why inductor cannot generate Triton kernels for the CUDA ``device``, or None when it can.

    Importing Triton is not enough: it also needs a GPU of compute capability 7.0 or higher, its bundled ``ptxas``,
    a C compiler for its launcher and the CUDA driver library. So after the cheap checks this compiles and runs a
    small forward and backward pass (:func:`smoke_compile_failure`), once per device.

    Args:
        device: a CUDA device.

    Returns:
        A short reason, or None.
    """
    from torch.utils._triton import has_triton_package

    device = torch.device(device)
    if not has_triton_package():
        return "the inductor backend needs Triton for CUDA, and it is not installed"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"Triton needs CUDA compute capability 7.0 or higher, and {device} has {major}.{minor}"
    return smoke_compile_failure(str(device))


def _smoke_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2.0 + torch.relu(x) * x


@functools.lru_cache(maxsize=None)
def smoke_compile_failure(device: str, backend: str = "inductor") -> str | None:
    """Compiles and runs a small element-wise forward and backward pass with ``backend`` on ``device``.

    Args:
        device: where to run it.
        backend: the ``torch.compile`` backend.

    Returns:
        None when it ran and agreed with eager, else why not (the error's type and first line).
    """
    x = torch.linspace(-2.0, 2.0, 257, device=device, requires_grad=True)
    try:
        compiled = torch.compile(_smoke_function, backend=backend, fullgraph=True, dynamic=False)(x)
        (gradient,) = torch.autograd.grad(compiled.sum(), x)
    except Exception as error:  # noqa: BLE001  (any compiler, assembler, linker or driver error)
        return f"a test compile with {backend} on {device} failed ({_first_line(error)})"
    expected = _smoke_function(x)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), x)
    if not (torch.allclose(compiled, expected, atol=1e-5) and torch.allclose(gradient, expected_gradient, atol=1e-5)):
        return f"a test compile with {backend} on {device} gave results that differ from eager"
    return None


def use_compile(requested: bool, device: torch.device | str, compile_kwargs: dict | None = None) -> bool:
    """The value for an engine's ``compile`` argument: ``requested``, unless compiling cannot work here.

    When it is not possible (see :func:`compile_unavailable_reason`) this warns and returns False, so the workflow
    trains eagerly. It sets no global TorchDynamo flag: pass :func:`with_eager_fallback` of the same
    ``compile_kwargs`` to the engine so that a graph that fails to compile at run time runs eagerly.

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
    logger.info("torch.compile on %s with %s", device, compile_kwargs or "default settings")
    return True


class EagerFallbackBackend:
    """A ``torch.compile`` backend that compiles with another one and runs a graph eagerly when that fails.

    Only the compilation is guarded: errors of the network itself are raised by TorchDynamo's tracing or at run
    time, outside the backend, and reach the caller unchanged. The backward graph is compiled together with the
    forward (``torch._functorch.config.force_non_lazy_backward_lowering``, patched for this call only), so its
    failures fall back too instead of surfacing at the first ``backward()``. Each failure is logged with its reason.

    Args:
        backend: the backend to compile with (a name or a callable).
        mode: ``torch.compile``'s ``mode`` for that backend.
        options: ``torch.compile``'s ``options`` for that backend.
        dynamic: ``torch.compile``'s ``dynamic``.
    """

    def __init__(
        self,
        backend: str | Callable = "inductor",
        mode: str | None = None,
        options: dict | None = None,
        dynamic: bool | None = None,
    ) -> None:
        if backend == "inductor":
            self.compiler = torch._TorchCompileInductorWrapper(mode, options, dynamic)
        else:
            self.compiler = torch._TorchCompileWrapper(backend, mode, options, dynamic)
        self.failures: list[str] = []

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        try:
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                return self.compiler(graph_module, example_inputs)
        except Exception as error:  # noqa: BLE001  (only the compilation runs in here)
            self.failures.append(_first_line(error))
            logger.warning(
                "torch.compile failed on a graph of %d nodes, which runs eagerly instead: %s",
                len(graph_module.graph.nodes),
                self.failures[-1],
            )
            return graph_module.forward


def with_eager_fallback(compile_kwargs: dict | None = None) -> dict:
    """``compile_kwargs`` for ``torch.compile`` (MONAI engines' ``compile_kwargs``) with an eager fall-back.

    Args:
        compile_kwargs: ``torch.compile`` keyword arguments; ``backend``, ``mode`` and ``options`` move into an
            :class:`EagerFallbackBackend`.

    Returns:
        The keyword arguments to pass on.
    """
    kwargs = dict(compile_kwargs or {})
    backend = kwargs.pop("backend", "inductor")
    mode, options = kwargs.pop("mode", None), kwargs.pop("options", None)
    return {**kwargs, "backend": EagerFallbackBackend(backend, mode, options, kwargs.get("dynamic"))}


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
