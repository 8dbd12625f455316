"""``compile: true``: the trainer really runs a compiled network, agrees with eager, and falls back cleanly."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from bundle.engine.compiling import (
    EagerFallbackBackend,
    compile_unavailable_reason,
    smoke_compile_failure,
    use_compile,
    with_eager_fallback,
)

from conftest import ROOT


def _trainer_losses(compile_on: bool, data: Path, out: Path, iterations: int = 3) -> tuple[list[float], object, object]:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / name) for name in ("inference.json", "train_vqvae.json")])
    parser.update(
        {
            "bundle_root": str(ROOT),
            "dataset_dir": str(data),
            "output_dir": str(out),
            "ckpt_dir": str(out / "models"),
            "resume": False,
            "max_epochs": 1,
            "val_interval": 10**6,
            "batch_size": 4,
            "amp": False,
            "channels_last": False,
            "compile": compile_on,
            "channels": [16, 32],
            "num_res_channels": [16, 16],
            "num_embeddings": 64,
            "embedding_dim": 16,
            "engine_compile_kwargs": "$@bundle.engine.compiling.with_eager_fallback(@compile_kwargs)",
            "train#trainer#compile_kwargs": "@engine_compile_kwargs",
        }
    )
    parser.get_parsed_content("initialize")  # set_determinism(seed): both trainers start from the same weights
    trainer = parser.get_parsed_content("train#trainer")
    losses: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine) -> None:
        losses.append(float(engine.state.output["loss"]))
        if len(losses) == iterations:
            engine.terminate()

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        trainer.run()
    finally:
        os.chdir(cwd)
    monitor = next(h for h in parser.get_parsed_content("train#handlers") if type(h).__name__ == "CodebookMonitor")
    assert parser.get_parsed_content("engine_compile_kwargs")["backend"].failures == []  # nothing fell back to eager
    return losses, trainer, monitor


@pytest.fixture
def fresh_dynamo():
    """Drops compiled frames and counters around the test, and checks that no global TorchDynamo flag was set."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    smoke_compile_failure.cache_clear()
    yield
    assert torch._dynamo.config.suppress_errors is False
    torch._dynamo.reset()
    smoke_compile_failure.cache_clear()


@pytest.mark.slow
def test_compiled_trainer_runs_a_compiled_network_that_agrees_with_eager(
    phantom_dir: Path, tmp_path: Path, fresh_dynamo
) -> None:
    if compile_unavailable_reason("cpu"):
        pytest.fail(f"torch.compile must work on the CI machine: {compile_unavailable_reason('cpu')}")
    eager, eager_trainer, eager_monitor = _trainer_losses(False, phantom_dir, tmp_path / "eager")
    compiled, trainer, monitor = _trainer_losses(True, phantom_dir, tmp_path / "compiled")
    assert not isinstance(eager_trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # frames were compiled, not skipped
    # The codebook monitor's hooks ran (eagerly, as graph breaks) on every compiled step and saw the same codes.
    # iterations x batch x (bottom map + top map)
    assert int(monitor.epoch_counts.sum()) == 3 * 4 * ((256 // 4) * (128 // 4) + (256 // 16) * (128 // 16))
    # (fusion changes fp32 rounding, so a few near-tie vectors pick a neighbouring code)
    assert int((monitor.epoch_counts - eager_monitor.epoch_counts).abs().sum()) <= 0.02 * monitor.epoch_counts.sum()
    assert len(eager) == len(compiled) == 3 and all(math.isfinite(v) for v in compiled)
    # Same weights, data and k-means init; only kernel fusion differs, so fp32 losses agree closely.
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-3 * abs(a), (eager, compiled)


def test_missing_cxx_compiler_falls_back_to_eager() -> None:
    import torch._inductor.config as inductor_config

    assert compile_unavailable_reason("cpu") is None
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):  # what a machine without g++ looks like
        reason = compile_unavailable_reason("cpu")
        assert reason and "InvalidCxxCompiler" in reason and "C++ compiler" in reason
        with pytest.warns(RuntimeWarning, match="training runs eagerly"):
            assert use_compile(True, "cpu") is False
    assert use_compile(False, "cpu") is False
    assert compile_unavailable_reason("cpu") is None


def failing_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> None:
    raise RuntimeError("backend failure injected by the test")


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))


def test_a_backend_failing_at_the_first_call_runs_eagerly_and_says_why(fresh_dynamo, caplog) -> None:
    net, x = tiny_net(), torch.rand(2, 1, 8, 8)
    assert use_compile(True, "cpu", {"backend": failing_backend}) is True
    kwargs = with_eager_fallback({"backend": failing_backend, "dynamic": False})
    assert kwargs["dynamic"] is False and isinstance(kwargs["backend"], EagerFallbackBackend)
    with caplog.at_level(logging.WARNING, logger="bundle.engine.compiling"):
        out = torch.compile(net, **kwargs)(x)
    assert torch.equal(out, net(x))
    assert kwargs["backend"].failures == ["RuntimeError: backend failure injected by the test"]
    assert "runs eagerly instead: RuntimeError: backend failure injected" in caplog.text
    # the same backend without the fall-back ends the run: nothing global turns failures into warnings
    torch._dynamo.reset()
    with pytest.raises(Exception, match="backend failure injected"):
        torch.compile(net, backend=failing_backend)(x)


def test_inductor_failing_to_build_falls_back_to_eager(fresh_dynamo) -> None:
    import torch._inductor.config as inductor_config

    net, x = tiny_net(), torch.rand(2, 1, 8, 8)
    kwargs = with_eager_fallback({})
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        out = torch.compile(net, **kwargs)(x)
    assert torch.equal(out, net(x))
    assert kwargs["backend"].failures and "InvalidCxxCompiler" in kwargs["backend"].failures[0]


def test_a_backward_that_fails_to_compile_falls_back_at_the_first_call_too(fresh_dynamo) -> None:
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    backend = aot_autograd(fw_compiler=boxed_nop, bw_compiler=failing_backend)
    net, x = tiny_net(), torch.rand(2, 1, 8, 8)
    net(x).square().mean().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    kwargs = with_eager_fallback({"backend": backend})
    torch.compile(net, **kwargs)(x).square().mean().backward()  # lazily compiled, this backward would raise
    assert kwargs["backend"].failures == ["RuntimeError: backend failure injected by the test"]
    assert all(torch.allclose(p.grad, g) for p, g in zip(net.parameters(), expected))


def test_an_error_of_the_network_itself_is_not_swallowed(fresh_dynamo) -> None:
    net = torch.nn.Linear(4, 2)
    kwargs = with_eager_fallback({})
    with pytest.raises(RuntimeError, match="same reduction dim|cannot be multiplied"):
        torch.compile(net, **kwargs)(torch.rand(3, 5))
    assert kwargs["backend"].failures == []


def test_cuda_without_a_working_triton_falls_back_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils._triton as triton_utils

    import bundle.engine.compiling as compiling

    monkeypatch.setattr(triton_utils, "has_triton_package", lambda: False)
    assert "needs Triton for CUDA, and it is not installed" in compile_unavailable_reason("cuda")
    monkeypatch.setattr(triton_utils, "has_triton_package", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    assert "compute capability 7.0 or higher, and cuda has 6.1" in compile_unavailable_reason("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tried = []
    monkeypatch.setattr(compiling, "smoke_compile_failure", lambda device: tried.append(device) or "ptxas failed")
    assert compile_unavailable_reason("cuda:0") == "ptxas failed" and tried == ["cuda:0"]
    with pytest.warns(RuntimeWarning, match="ptxas failed: training runs eagerly"):
        assert use_compile(True, "cuda:0") is False
    monkeypatch.setattr(compiling, "smoke_compile_failure", lambda device: None)
    assert compile_unavailable_reason("cuda") is None


def test_the_smoke_compile_runs_forward_and_backward_and_reports_a_broken_toolchain(fresh_dynamo) -> None:
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        reason = smoke_compile_failure("cpu")
    assert reason and reason.startswith("a test compile with inductor on cpu failed (") and "Cxx" in reason
    smoke_compile_failure.cache_clear()
    torch._dynamo.reset()
    assert smoke_compile_failure("cpu") is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiles_with_triton_and_trains_a_step_like_eager(fresh_dynamo) -> None:
    assert compile_unavailable_reason("cuda") is None, compile_unavailable_reason("cuda")
    net, x = tiny_net().cuda(), torch.rand(4, 1, 16, 16, device="cuda")
    net(x).square().mean().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    kwargs = with_eager_fallback({})
    torch.compile(net, **kwargs)(x).square().mean().backward()
    assert kwargs["backend"].failures == []
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert all(torch.allclose(p.grad, g, rtol=1e-3, atol=1e-5) for p, g in zip(net.parameters(), expected))
