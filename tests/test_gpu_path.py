"""The GPU path checked on the CPU: autocast dtypes per device, the non-finite guard with and without a GradScaler
and its host synchronisations, and ``scripts/gpu_check.sh``. Tests marked ``cuda`` run only with a CUDA GPU."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch.overrides import TorchFunctionMode

from bundle.engine.amp import needs_grad_scaler, resolve_amp_dtype
from bundle.engine.guards import NonFiniteGuard
from bundle.engine.inferers import AutocastInferer

from conftest import ROOT

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Tensor calls that copy a value to the host, so on a GPU they wait for the device. (``.to()`` is left out: on the
# CPU a copy to the host cannot be told from a no-op; the CUDA tests below catch it.)
SYNCING = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__format__",
    "__repr__",
    "equal",
    "allclose",
    "is_nonzero",
}
PER_STEP_HANDLERS = ("save_state", "check_step", "after_step")


class SyncCounter(TorchFunctionMode):
    """Records tensor calls that synchronise with the device (a CPU stand-in for CUDA's sync debug mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", "") in SYNCING:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def count_syncs(
    guard: NonFiniteGuard, context: Callable[[], Any], names: tuple[str, ...] = (*PER_STEP_HANDLERS, "read_counters")
) -> dict[str, list[str]]:
    """Runs the guard's handlers ``names`` under ``context()`` (call before ``attach``); returns their syncs."""
    calls: dict[str, list[str]] = {name: [] for name in names}

    def wrap(name: str) -> None:
        handler = getattr(guard, name)

        @functools.wraps(handler)
        def counted(engine: SupervisedTrainer) -> None:
            with context() as counter:
                try:
                    handler(engine)
                finally:
                    calls[name].extend(getattr(counter, "calls", []))

        setattr(guard, name, counted)

    for name in names:
        wrap(name)
    return calls


@contextlib.contextmanager
def cuda_sync_errors() -> Iterator[None]:
    """Any synchronising CUDA call inside raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield None
    finally:
        torch.cuda.set_sync_debug_mode("default")


def tiny_network(device: str = "cpu") -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1))
    return net.to(device)


def batches(count: int, nan_at: tuple[int, ...] = (), device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """``count`` batches; those at the 1-based iterations ``nan_at`` hold a NaN pixel (so BatchNorm's stats go NaN)."""
    generator = torch.Generator().manual_seed(1)
    data = [
        {"image": torch.rand(2, 1, 8, 8, generator=generator), "label": torch.rand(2, 1, 8, 8, generator=generator)}
        for _ in range(count)
    ]
    for iteration in nan_at:
        data[iteration - 1]["image"][0, 0, 0, 0] = float("nan")
    return [{key: value.to(device) for key, value in batch.items()} for batch in data]


def tiny_trainer(
    guard: NonFiniteGuard,
    optimizer: torch.optim.Optimizer,
    data: list[dict],
    amp: bool = False,
    device: str = "cpu",
    max_epochs: int = 1,
) -> SupervisedTrainer:
    """A ``SupervisedTrainer`` as the configs build it (no decollation), with only the guard attached."""
    return SupervisedTrainer(
        device=torch.device(device),
        max_epochs=max_epochs,
        train_data_loader=data,
        epoch_length=len(data),
        network=guard.network,
        optimizer=optimizer,
        loss_function=torch.nn.MSELoss(),
        train_handlers=[guard],
        decollate=False,
        amp=amp,
        amp_kwargs={"dtype": torch.float16},
    )


def training_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Weights, buffers and optimizer state (moments and step counts), copied."""
    state = [t.detach().clone() for t in net.state_dict().values()]
    return state + [v.clone() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def record_iteration(trainer: SupervisedTrainer, iteration: int, what: Callable[[], list]) -> dict[str, list]:
    """``what()`` at the start and at the end of ``iteration``."""
    seen: dict[str, list] = {}
    trainer.add_event_handler(Events.ITERATION_STARTED(once=iteration), lambda: seen.__setitem__("before", what()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda: seen.__setitem__("after", what()))
    return seen


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def with_cpu_scaler(trainer: SupervisedTrainer, init_scale: float) -> torch.amp.GradScaler:
    """Gives the engine an enabled GradScaler on the CPU (MONAI creates a CUDA one, disabled here, at ``run()``)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.add_event_handler(Events.STARTED, lambda engine: setattr(engine, "scaler", scaler))
    return scaler


def bad_gradients_at(trainer: SupervisedTrainer, iterations: set[int] | None, value: float = float("inf")) -> None:
    """Puts ``value`` into the last layer's weight gradient at ``iterations`` (every one when None); the loss stays
    finite."""
    current = [0]
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda engine: current.__setitem__(0, engine.state.iteration))
    trainer.network[2].weight.register_hook(
        lambda grad: torch.full_like(grad, value) if iterations is None or current[0] in iterations else grad
    )


# ------------------------------------------------------------------------------------------------ autocast dtype ---
def test_auto_dtype_is_bf16_on_the_cpu_and_names_are_checked() -> None:
    assert resolve_amp_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_amp_dtype("float16", "cpu") == torch.float16
    assert resolve_amp_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_amp_dtype(torch.float16, "cpu") == torch.float16
    for bad in ("fp16", "half", torch.int8):
        with pytest.raises(ValueError, match="amp_dtype must be"):
            resolve_amp_dtype(bad, "cpu")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_dtype_on_cuda_follows_native_bf16_support(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: asked.append(including_emulation) or native_bf16,
    )
    assert resolve_amp_dtype("auto", "cuda") == (torch.bfloat16 if native_bf16 else torch.float16)
    assert asked == [False]  # emulated bf16 (pre-Ampere GPUs) is slow: only native support counts
    assert resolve_amp_dtype("float16", "cuda:0") == torch.float16
    if native_bf16:
        assert resolve_amp_dtype("bfloat16", "cuda") == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="does not support it natively"):
            resolve_amp_dtype("bfloat16", "cuda")


def test_only_fp16_on_cuda_needs_the_engines_grad_scaler() -> None:
    assert needs_grad_scaler(True, torch.float16, "cuda") is True
    assert needs_grad_scaler(True, torch.float16, torch.device("cuda", 1)) is True
    assert needs_grad_scaler(True, torch.bfloat16, "cuda") is False
    assert needs_grad_scaler(False, torch.float16, "cuda") is False
    assert needs_grad_scaler(True, torch.bfloat16, "cpu") is False
    with pytest.warns(RuntimeWarning, match="without loss scaling"):
        assert needs_grad_scaler(True, torch.float16, "cpu") is False


class DtypeProbe(torch.nn.Module):
    """Records the dtype a linear layer computes in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.seen = torch.nn.Linear(4, 4), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.seen.append(y.dtype)
        return y


def test_autocast_inferer_resolves_auto_per_device_and_keeps_an_outer_autocast() -> None:
    probe, x = DtypeProbe(), torch.rand(2, 4)
    out = AutocastInferer(amp=True, dtype="auto")(x, probe)
    assert probe.seen == [torch.bfloat16] and out.dtype == torch.float32
    assert AutocastInferer(amp=True, dtype=torch.float16)(x, probe).dtype == torch.float32
    assert probe.seen[-1] == torch.float16
    # With its own amp off, the inferer must not switch off the engine's autocast around it (engine amp=True).
    with torch.autocast("cpu", dtype=torch.float16):
        AutocastInferer(amp=False)(x, probe)
    assert probe.seen[-1] == torch.float16
    AutocastInferer(amp=False)(x, probe)
    assert probe.seen[-1] == torch.float32
    with pytest.raises(ValueError, match="amp_dtype must be"):
        AutocastInferer(amp=True, dtype="fp8")


# ----------------------------------------------------------------------------- guard without a GradScaler --------
def test_fused_optimizer_skips_a_nan_batch_on_the_device_without_syncing() -> None:
    net = tiny_network()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, fused=True)
    guard = NonFiniteGuard(net, mode="skip", check_interval=3)
    syncs = count_syncs(guard, SyncCounter)
    trainer = tiny_trainer(guard, optimizer, batches(6, nan_at=(2,)))
    bad = record_iteration(trainer, 2, lambda: training_state(net, optimizer))
    good = record_iteration(trainer, 4, lambda: training_state(net, optimizer))
    trainer.run()
    # The NaN batch changed nothing: weights, BatchNorm statistics, Adam's moments and step count.
    assert same(bad["before"], bad["after"]) and not same(good["before"], good["after"])
    assert finite(training_state(net, optimizer))
    assert guard.skipped == 1 and trainer.state.metrics["nonfinite_skipped"] == 1
    assert int(optimizer.state[net[0].weight]["step"]) == 5
    # No synchronisation in any per-step handler; one per read (iterations 3 and 6, and the epoch end).
    assert all(syncs[name] == [] for name in PER_STEP_HANDLERS), syncs
    assert syncs["read_counters"] == ["tolist"] * 3


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_fused_optimizer_skips_a_step_whose_gradient_alone_is_not_finite(value: float) -> None:
    net = tiny_network()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, fused=True)
    guard = NonFiniteGuard(net, mode="skip", check_interval=0)
    trainer = tiny_trainer(guard, optimizer, batches(4))
    bad_gradients_at(trainer, {2}, value)
    bad = record_iteration(trainer, 2, lambda: [p.detach().clone() for p in net.parameters()])
    trainer.run()
    assert same(bad["before"], bad["after"]) and guard.skipped == 1


def test_fused_optimizer_in_stop_mode_raises_at_the_next_read_naming_the_bad_iteration() -> None:
    net = tiny_network()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, fused=True)
    trainer = tiny_trainer(NonFiniteGuard(net, check_interval=4), optimizer, batches(6, nan_at=(3,)))
    with pytest.raises(FloatingPointError, match=r"at epoch 1, iteration 3; the optimizer skipped that step"):
        trainer.run()
    assert trainer.state.iteration == 4
    assert finite(training_state(net, optimizer))


def test_skip_mode_stops_once_more_than_max_skips_batches_were_skipped() -> None:
    net = tiny_network()
    guard = NonFiniteGuard(net, mode="skip", max_skips=1, check_interval=1)
    trainer = tiny_trainer(guard, torch.optim.Adam(net.parameters(), lr=0.01, fused=True), batches(6, nan_at=(2, 4)))
    with pytest.raises(FloatingPointError, match="at epoch 1, iteration 4;"):
        trainer.run()
    assert guard.skipped == 1 and trainer.state.iteration == 4


def test_other_optimizers_cost_one_sync_per_step_and_stop_before_the_step() -> None:
    net = tiny_network()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)  # not fused: zeroed gradients would still move Adam
    guard = NonFiniteGuard(net, check_interval=0)
    syncs = count_syncs(guard, SyncCounter)
    trainer = tiny_trainer(guard, optimizer, batches(6, nan_at=(3,)))
    with pytest.raises(FloatingPointError, match=r"at epoch 1, iteration 3 \(loss=nan\); stopped before"):
        trainer.run()
    assert trainer.state.iteration == 3 and finite(training_state(net, optimizer))
    assert syncs["check_step"] == ["__bool__", "__bool__", "__bool__", "item"]  # the flag, each step; the message
    assert syncs["save_state"] == syncs["after_step"] == syncs["read_counters"] == []


# ------------------------------------------------------------------------------------ guard with a GradScaler ----
def test_with_a_scaler_the_guard_counts_its_skipped_steps_and_goes_on_without_syncing() -> None:
    net = tiny_network()
    guard = NonFiniteGuard(net, check_interval=0)
    syncs = count_syncs(guard, SyncCounter)
    trainer = tiny_trainer(guard, torch.optim.Adam(net.parameters(), lr=0.01), batches(6), amp=True)
    scaler = with_cpu_scaler(trainer, init_scale=2.0**8)
    bad_gradients_at(trainer, {3})
    skipped = record_iteration(trainer, 3, lambda: [p.detach().clone() for p in net.parameters()])
    trainer.run()
    assert trainer.state.iteration == 6  # a step the scaler skipped is no divergence
    assert same(skipped["before"], skipped["after"])
    assert guard.scaler_skipped == 1 and trainer.state.metrics["grad_scaler_skipped"] == 1
    assert trainer.state.metrics["grad_scale"] == scaler.get_scale() == 2.0**7
    assert trainer.state.metrics["nonfinite_skipped"] == 0
    assert all(syncs[name] == [] for name in PER_STEP_HANDLERS), syncs
    assert syncs["read_counters"] == ["tolist"]


def test_with_a_scaler_a_loss_non_finite_for_consecutive_steps_stops() -> None:
    net = tiny_network()
    guard = NonFiniteGuard(net, check_interval=1, max_nonfinite_streak=3)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    trainer = tiny_trainer(guard, optimizer, batches(8, nan_at=(2, 4, 5, 6)), amp=True)
    with_cpu_scaler(trainer, init_scale=2.0**8)
    with pytest.raises(FloatingPointError, match="non-finite for 3 consecutive steps"):
        trainer.run()
    assert trainer.state.iteration == 6  # the lone NaN batch at iteration 2 was tolerated
    assert guard.scaler_skipped == 4  # the scaler skipped each NaN step...
    assert finite(training_state(net, optimizer))  # ...and the guard put BatchNorm's statistics back each time


def test_with_a_scaler_a_collapsing_scale_stops() -> None:
    net = tiny_network()
    guard = NonFiniteGuard(net, check_interval=1, min_grad_scale=1.0)
    trainer = tiny_trainer(guard, torch.optim.Adam(net.parameters(), lr=0.01), batches(8), amp=True)
    with_cpu_scaler(trainer, init_scale=4.0)
    bad_gradients_at(trainer, None)
    with pytest.raises(FloatingPointError, match=r"scale fell to 0.5 \(below 1\)"):
        trainer.run()
    assert trainer.state.iteration == 3 and guard.scaler_skipped == 3


# ---------------------------------------------------------------------------------------------------- CUDA -------
@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("engine_amp", [False, True], ids=["fused_adam", "monai_grad_scaler"])
def test_cuda_guard_never_syncs_per_step_and_catches_a_nan_batch(engine_amp: bool) -> None:
    net = tiny_network("cuda")
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, fused=True)
    guard = NonFiniteGuard(net, mode="skip", check_interval=0)
    count_syncs(guard, cuda_sync_errors, names=PER_STEP_HANDLERS)
    trainer = tiny_trainer(guard, optimizer, batches(6, nan_at=(3,), device="cuda"), amp=engine_amp, device="cuda")
    bad_gradients_at(trainer, {5}, float("nan"))  # a NaN gradient with a finite loss: found by the fused max-norm
    trainer.run()
    assert finite(training_state(net, optimizer))
    if engine_amp:  # MONAI's own GradScaler skipped both steps (and maybe early overflows)
        assert guard.scaler is not None and trainer.state.metrics["grad_scaler_skipped"] >= 2
    else:
        assert trainer.state.metrics["nonfinite_skipped"] == 2


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("engine_amp", [False, True], ids=["fused_adam", "monai_grad_scaler"])
def test_cuda_training_iterations_make_no_host_sync(engine_amp: bool) -> None:
    net = tiny_network("cuda")
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, fused=True)
    trainer = tiny_trainer(
        NonFiniteGuard(net, check_interval=0), optimizer, batches(5, device="cuda"), amp=engine_amp, device="cuda"
    )
    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), lambda: torch.cuda.set_sync_debug_mode("error"))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda: torch.cuda.set_sync_debug_mode("default"))
    try:
        trainer.run()  # iterations 2 to 4: MONAI's loop, autocast, the scaler, the fused step and the guard
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.state.iteration == 5


@pytest.mark.cuda
@cuda_only
def test_cuda_auto_dtype_and_fp16_training_with_the_engines_scaler() -> None:
    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert resolve_amp_dtype("auto", "cuda") == (torch.bfloat16 if native_bf16 else torch.float16)
    probe = DtypeProbe().cuda()
    AutocastInferer(amp=True, dtype="auto")(torch.rand(2, 4, device="cuda"), probe)
    assert probe.seen == [resolve_amp_dtype("auto", "cuda")]
    net = tiny_network("cuda")
    trainer = tiny_trainer(
        NonFiniteGuard(net),
        torch.optim.Adam(net.parameters(), lr=0.01),
        batches(4, device="cuda"),
        amp=needs_grad_scaler(True, torch.float16, "cuda"),
        device="cuda",
        max_epochs=2,
    )
    trainer.run()
    assert trainer.scaler is not None and trainer.scaler.is_enabled()
    assert trainer.state.metrics["grad_scale"] > 0 and "grad_scaler_skipped" in trainer.state.metrics
    assert finite(training_state(net, trainer.optimizer))


# ---------------------------------------------------------------------------------------------- gpu_check.sh -----
def run_gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_check_says_there_is_no_gpu_and_fails(tmp_path: Path) -> None:
    result = run_gpu_check(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "NO CUDA GPU" in result.stderr and "nothing was checked" in result.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_training_overrides_exist_in_the_configs(tmp_path: Path) -> None:
    result = run_gpu_check(tmp_path, GPU_CHECK_DRY_RUN="1")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert sorted(lines) == ["ddp_1gpu", "sampling", "train_amp_auto", "train_compile", "train_fp16"]
    assert "--amp_dtype float16" in lines["train_fp16"] and "--compile True" in lines["train_compile"]
    assert "torch.distributed.run --standalone --nproc_per_node=1" in lines["ddp_1gpu"]
    assert "configs/multi_gpu_train.json" in lines["ddp_1gpu"] and "multi_gpu" not in lines["train_fp16"]
    assert "scripts/benchmark_sampling.py --device cuda" in lines["sampling"]


def test_gpu_check_dry_run_names_a_sampling_option_the_benchmark_does_not_take(gpu_check: Any) -> None:
    args = gpu_check.parse_args(["--python", sys.executable])
    command = gpu_check.sampling_command(args, Path("sampling.json"))
    assert gpu_check.rejected_sampling_arguments(command) is None
    assert "--naive_rows" in gpu_check.rejected_sampling_arguments([*command, "--naive_rows", "64"])


@pytest.fixture(scope="module")
def gpu_check() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_records_each_step_and_skips_what_no_longer_fits(gpu_check: Any, tmp_path: Path) -> None:
    args = gpu_check.parse_args(["--out_dir", str(tmp_path), "--budget_s", "40"])
    check = gpu_check.Check(args)
    assert check.command("passes", [sys.executable, "-c", "print('fine')"])["ok"] is True
    failed = check.command("fails", [sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"])
    assert failed["ok"] is False and failed["rc"] == 3 and "broken" in failed["log_tail"]
    check.deadline = time.monotonic() + gpu_check.MIN_STEP_S - 1
    assert check.command("late", [sys.executable, "-c", "1"]) == {"ok": False, "skipped": "out of time budget"}
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(saved["steps"]) == ["passes", "fails", "late"] and saved["all_ok"] is False
    assert (tmp_path / "logs" / "passes.log").read_text() == "fine\n"
    assert saved["environment"]["torch"] == torch.__version__


def test_gpu_check_stops_a_step_at_its_time_limit(gpu_check: Any, tmp_path: Path) -> None:
    start = time.monotonic()
    sleeper = "import time; print('started', flush=True); time.sleep(60)"
    step = gpu_check.run_step([sys.executable, "-c", sleeper], tmp_path / "slow.log", limit_s=3)
    assert time.monotonic() - start < 30
    assert step["ok"] is False and step["rc"] == "timeout" and "started" in step["log_tail"]


def test_gpu_check_reads_epoch_times_per_stage_and_the_last_metrics(gpu_check: Any, tmp_path: Path) -> None:
    stamp = "2026-01-01 10:00:00,000 -"
    done = " - INFO - Epoch[{}] Complete. Time taken: {}"
    log = "\n".join(
        [
            stamp + " ignite.engine.engine.SupervisedTrainer" + done.format(1, "00:01:02.500"),
            stamp + " ignite.engine.engine.SupervisedEvaluator" + done.format(1, "00:00:01.000"),
            stamp + " INFO - Epoch[1] Metrics -- val_ssim: 0.5000 grad_scaler_skipped: 2.0000 grad_scale: 32768.0000 ",
            stamp + " ignite.engine.engine.SupervisedTrainer" + done.format(2, "00:00:03.250"),
            stamp + " INFO - Epoch[2] Metrics -- val_ssim: 0.7500 ",
            stamp + " ignite.engine.engine.SupervisedTrainer" + done.format(1, "00:00:02.000"),
            stamp + " bundle.engine.compiling - WARNING - torch.compile failed on a graph of 12 nodes, which runs "
            "eagerly instead: InductorError: boom",
        ]
    )
    (tmp_path / "models" / "prior").mkdir(parents=True)
    (tmp_path / "models" / "prior" / "prior.pt").write_bytes(b"")
    summary = gpu_check.training_summary(log, tmp_path)
    assert summary["trainer_epoch_seconds"] == [[62.5, 3.25], [2.0]]
    assert summary["last_metrics"] == {"val_ssim": 0.75, "grad_scaler_skipped": 2.0, "grad_scale": 32768.0}
    assert summary["grad_scaler_active"] is True and summary["weights"] == ["models/prior/prior.pt"]
    assert len(summary["ran_eagerly_lines"]) == 1 and "InductorError: boom" in summary["ran_eagerly_lines"][0]


def test_gpu_check_inference_latency_builds_the_configured_network(gpu_check: Any) -> None:
    latency = gpu_check.inference_latency(str(ROOT / "configs" / "inference.json"), device="cpu", repeats=1)
    assert latency["image_size"] == [256, 128]
    keys = [f"{name}_batch{batch}_ms_per_slice" for name in ("fp32", "amp_auto_channels_last") for batch in (1, 16)]
    assert sorted(latency) == sorted(["image_size", *keys]) and all(latency[key] > 0 for key in keys)
