"""``compile: true``: the trainer really runs a compiled network, agrees with eager, and falls back cleanly."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from bundle.engine.compiling import compile_unavailable_reason, use_compile
from conftest import ROOT


def _trainer_losses(compile_on: bool, data: Path, out: Path, iterations: int = 3) -> tuple[list[float], object, object]:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT), "dataset_dir": str(data), "output_dir": str(out),
                   "ckpt_dir": str(out / "models"), "resume": False, "max_epochs": 1, "val_interval": 10**6,
                   "batch_size": 4, "amp": False, "channels_last": False, "compile": compile_on,
                   "channels": [16, 32], "num_res_channels": [16, 16], "num_embeddings": 64, "embedding_dim": 16})
    parser.get_parsed_content("initialize")  # set_determinism(seed): both trainers start from the same weights
    trainer = parser.get_parsed_content("train::trainer")
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
    monitor = next(h for h in parser.get_parsed_content("train::handlers") if type(h).__name__ == "CodebookMonitor")
    return losses, trainer, monitor


@pytest.fixture
def fresh_dynamo():
    """use_compile sets a process-wide TorchDynamo flag; restore it and drop compiled frames after the test."""
    saved = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = False
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.config.suppress_errors = saved
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_trainer_runs_a_compiled_network_that_agrees_with_eager(phantom_dir: Path, tmp_path: Path,
                                                                          fresh_dynamo) -> None:
    if compile_unavailable_reason("cpu"):
        pytest.fail(f"torch.compile must work on the CI machine: {compile_unavailable_reason('cpu')}")
    eager, eager_trainer, eager_monitor = _trainer_losses(False, phantom_dir, tmp_path / "eager")
    compiled, trainer, monitor = _trainer_losses(True, phantom_dir, tmp_path / "compiled")
    assert not isinstance(eager_trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # frames were compiled, not skipped
    # The codebook monitor's hooks ran (eagerly, as graph breaks) on every compiled step and saw the same codes.
    assert int(monitor.epoch_counts.sum()) == 3 * 4 * (256 // 4) * (128 // 4)  # iterations x batch x latent
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


def test_a_backend_failing_at_run_time_runs_eagerly(fresh_dynamo) -> None:
    calls = []

    def failing_backend(graph_module, example_inputs):
        calls.append(1)
        raise RuntimeError("backend failure injected by the test")

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    x = torch.rand(2, 1, 8, 8)
    assert use_compile(True, "cpu", {"backend": failing_backend}) is True
    assert torch._dynamo.config.suppress_errors is True
    out = torch.compile(net, backend=failing_backend)(x)
    assert calls, "the backend was never reached"
    assert torch.equal(out, net(x))
    # without the fallback the same failure ends the run
    torch._dynamo.config.suppress_errors = False
    torch._dynamo.reset()
    with pytest.raises(Exception, match="backend failure injected"):
        torch.compile(net, backend=failing_backend)(x)
