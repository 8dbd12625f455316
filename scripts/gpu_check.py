"""The GPU check behind ``scripts/gpu_check.sh``: runs each step with a time limit and writes ``gpu_check.json``.

Steps, in order (a step that no longer fits in ``--budget_s`` is recorded as skipped):

1. the tests marked ``cuda`` (``pytest -m cuda tests``);
2. a phantom data set;
3. both training stages, a few epochs each, through ``python -m monai.bundle run``: amp "auto", fp16, a 1-GPU
   ``torchrun`` DDP run, and compiled;
4. inference latency of the reconstruction network (fp32, and amp "auto" with channels-last);
5. naive vs fast (cached) sampling of the prior, the fast one with and without CUDA graphs, through
   ``scripts/benchmark_sampling.py``.

Each result holds the exit status, the seconds taken, the log's tail on failure and what the log says (epoch
times, validation metrics, GradScaler skips, compile fall-backs). Run it through ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

NO_GPU_MESSAGE = "gpu_check: NO CUDA GPU is available here (torch.cuda.is_available() is False): nothing was checked."
EPOCH_LINE = re.compile(r" - (\S+) - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")
METRIC_LINE = re.compile(
    r"\b(val_\w+|grad_scaler_skipped|grad_scale|nonfinite_skipped|codebook_\w+): (-?[\d.eE+-]+|nan|inf)"
)
STEP_LIMITS_S = {
    "cuda_tests": 150,
    "phantoms": 60,
    "train_amp_auto": 90,
    "train_fp16": 90,
    "ddp_1gpu": 100,
    "inference_latency": 60,
    "sampling": 120,
    "train_compile": 180,
}
MIN_STEP_S = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (``scripts/gpu_check.sh`` sets them all)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="gpu_check_out")
    parser.add_argument("--python", default=sys.executable, help="the interpreter for the steps")
    parser.add_argument(
        "--train_configs",
        default="configs/inference.json,configs/train_vqvae.json,configs/train_prior.json",
        help="the configs layered for training both stages, comma-separated",
    )
    parser.add_argument("--multi_gpu_config", default="configs/multi_gpu_train.json")
    parser.add_argument("--inference_config", default="configs/inference.json")
    parser.add_argument("--run_id", default="training")
    parser.add_argument("--short_run", default="--resume False --max_epochs 3 --prior_max_epochs 2")
    parser.add_argument("--amp_auto", default="--amp True --amp_dtype auto --compile False")
    parser.add_argument("--amp_fp16", default="--amp True --amp_dtype float16 --compile False")
    parser.add_argument("--compiled", default="--amp True --amp_dtype auto --compile True")
    parser.add_argument("--budget_s", type=float, default=450.0)
    parser.add_argument("--dry_run", action="store_true", help="check the plan against the configs; run nothing")
    return parser.parse_args(argv)


def training_commands(args: argparse.Namespace, data_dir: Path, runs_dir: Path) -> dict[str, list[str]]:
    """The ``monai.bundle`` training command of each training step."""

    def bundle_run(name: str, variant: str, configs: list[str], launcher: list[str]) -> list[str]:
        out = runs_dir / name
        return [
            *launcher,
            "-m",
            "monai.bundle",
            "run",
            args.run_id,
            "--config_file",
            str(configs),
            "--dataset_dir",
            str(data_dir),
            "--output_dir",
            str(out),
            "--ckpt_dir",
            str(out / "models"),
            *shlex.split(args.short_run),
            *shlex.split(variant),
        ]

    python = [args.python]
    torchrun = [args.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    configs = args.train_configs.split(",")
    return {
        "train_amp_auto": bundle_run("train_amp_auto", args.amp_auto, configs, python),
        "train_fp16": bundle_run("train_fp16", args.amp_fp16, configs, python),
        "ddp_1gpu": bundle_run("ddp_1gpu", args.amp_auto, [*configs, args.multi_gpu_config], torchrun),
        "train_compile": bundle_run("train_compile", args.compiled, configs, python),
    }


def unknown_overrides(command: list[str]) -> list[str]:
    """The ``--id`` overrides of a ``monai.bundle run`` command that its config files do not define."""
    from monai.bundle import ConfigParser

    start = command.index("--config_file")
    parser = ConfigParser()
    parser.read_config(ast.literal_eval(command[start + 1]))
    keys = [arg[2:] for arg in command[start + 2 :] if arg.startswith("--")]
    return [key for key in keys if key not in parser]


def run_step(command: list[str], log_path: Path, limit_s: float) -> dict[str, Any]:
    """Runs ``command`` from the bundle root with a time limit, its output into ``log_path``.

    The command runs in its own process group, killed whole at the limit (``torchrun`` leaves workers otherwise).
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=limit_s)
        rc: int | str = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, rc = process.communicate()[0], "timeout"
    log_path.write_text(output)
    step: dict[str, Any] = {
        "ok": rc == 0,
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "command": shlex.join(command),
        "log": str(log_path),
    }
    if rc != 0:
        step["log_tail"] = output[-3000:]
    return step


def trainer_epoch_seconds(log: str) -> list[list[float]]:
    """Seconds per epoch of each trainer run in the log, in order (a run starts again at epoch 1)."""
    runs: list[list[float]] = []
    for name, epoch, hours, minutes, seconds in EPOCH_LINE.findall(log):
        if name.endswith("Trainer"):
            if epoch == "1" or not runs:
                runs.append([])
            runs[-1].append(int(hours) * 3600 + int(minutes) * 60 + float(seconds))
    return runs


def training_summary(log: str, out_dir: Path) -> dict[str, Any]:
    """What a training log says: epoch times per stage, the last value of each metric, compile fall-backs."""
    metrics = {name: float(value) for name, value in METRIC_LINE.findall(log)}
    return {
        "trainer_epoch_seconds": trainer_epoch_seconds(log),
        "last_metrics": metrics,
        "grad_scaler_active": "grad_scaler_skipped" in metrics,
        "ran_eagerly_lines": [line[-300:] for line in log.splitlines() if "runs eagerly" in line][:5],
        "weights": sorted(str(p.relative_to(out_dir)) for p in (out_dir / "models").rglob("*.pt")),
    }


def inference_latency(inference_config: str, device: str = "cuda", repeats: int = 30) -> dict[str, Any]:
    """Milliseconds per slice of the reconstruction network (best of ``repeats``): fp32, and amp "auto" with
    channels-last, at batch 1 and 16."""
    from monai.bundle import ConfigParser

    from bundle.engine.inferers import AutocastInferer

    parser = ConfigParser()
    parser.read_config(inference_config)
    network = parser.get_parsed_content("network_def").to(device).eval()
    size = list(parser.get_parsed_content("image_size"))
    results: dict[str, Any] = {"image_size": size}
    for name, inferer, layout in (
        ("fp32", AutocastInferer(amp=False), torch.contiguous_format),
        ("amp_auto_channels_last", AutocastInferer(amp=True, dtype="auto", channels_last=True), torch.channels_last),
    ):
        network = network.to(memory_format=layout)
        for batch in (1, 16):
            x = torch.rand(batch, 1, *size, device=device)
            seconds = best_time(lambda: inferer(x, network), torch.device(device), repeats)
            results[f"{name}_batch{batch}_ms_per_slice"] = round(1000 * seconds / batch, 3)
    return results


def best_time(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """The best wall time of ``repeats`` calls of ``function`` without gradients, after ``warmup`` calls."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for _ in range(warmup):
            function()
        best = float("inf")
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            best = min(best, time.perf_counter() - start)
    return best


def sampling_command(args: argparse.Namespace, json_path: Path) -> list[str]:
    """``scripts/benchmark_sampling.py`` on the configured networks: naive vs fast, with and without CUDA graphs."""
    return [
        args.python,
        "scripts/benchmark_sampling.py",
        "--device",
        "cuda",
        "--num_samples",
        "16",
        "--naive_budget_s",
        "40",
        "--json",
        str(json_path),
    ]


def rejected_sampling_arguments(command: list[str]) -> str | None:
    """What ``scripts/benchmark_sampling.py`` says of ``command``'s arguments when it rejects them, else None."""
    spec = importlib.util.spec_from_file_location("benchmark_sampling", ROOT / "scripts" / "benchmark_sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            module.parse_args(command[2:])
    except SystemExit:
        return errors.getvalue().strip().splitlines()[-1]
    return None


def environment() -> dict[str, Any]:
    """The device, its driver and the library versions."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    found: dict[str, Any] = {"device": None}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found = {
            "device": properties.name,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "device_count": torch.cuda.device_count(),
            "bf16_supported": torch.cuda.is_bf16_supported(including_emulation=False),
            "driver": _nvidia_smi("driver_version"),
        }
    return {
        **found,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        **{package: version(package) for package in ("triton", "monai", "pytorch-ignite", "numpy")},
    }


def _nvidia_smi(field: str) -> str | None:
    from shutil import which

    if which("nvidia-smi") is None:
        return None
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else None


class Check:
    """Runs the steps within the time budget and rewrites the JSON after each, so a cut-off run keeps its results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out_dir = args, Path(args.out_dir).resolve()
        (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.results: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "environment": environment(),
            "budget_s": args.budget_s,
            "steps": {},
        }

    def step(self, name: str, action: Callable[[float], dict[str, Any]]) -> dict[str, Any]:
        """Runs ``action(limit_s)`` for step ``name`` unless the budget is spent; records and saves the result."""
        limit = min(STEP_LIMITS_S.get(name, 60), self.deadline - time.monotonic())
        if limit < MIN_STEP_S:
            result: dict[str, Any] = {"ok": False, "skipped": "out of time budget"}
        else:
            try:
                result = action(limit)
            except Exception as error:  # noqa: BLE001  (one step's failure is a result, not the end of the check)
                result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        self.results["steps"][name] = result
        print(f"gpu_check: {name}: {'ok' if result.get('ok') else 'FAILED'} {json.dumps(result)[:300]}", flush=True)
        self.save()
        return result

    def command(self, name: str, command: list[str], summarise: bool = False) -> dict[str, Any]:
        """Runs a command as step ``name``; a training step's log is summarised."""

        def action(limit: float) -> dict[str, Any]:
            result = run_step(command, self.out_dir / "logs" / f"{name}.log", limit)
            if summarise:
                log = (self.out_dir / "logs" / f"{name}.log").read_text()
                result.update(training_summary(log, self.out_dir / "runs" / name))
            return result

        return self.step(name, action)

    def save(self) -> None:
        """Writes ``gpu_check.json``."""
        self.results["all_ok"] = all(step.get("ok") for step in self.results["steps"].values())
        (self.out_dir / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n")


def dry_run(args: argparse.Namespace) -> int:
    """Prints the commands and checks each against what it runs (config overrides, script options); 1 on a miss."""
    commands = training_commands(args, Path(args.out_dir) / "phantom", Path(args.out_dir) / "runs")
    problems = {name: unknown_overrides(command) for name, command in commands.items()}
    for name, command in commands.items():
        print(f"{name}: {shlex.join(command)}")
    sampling = sampling_command(args, Path(args.out_dir) / "sampling.json")
    print(f"sampling: {shlex.join(sampling)}")
    problems["sampling"] = rejected_sampling_arguments(sampling)
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems:
        print(f"gpu_check: arguments that the configs or scripts do not take: {problems}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """Runs the check; 0 when every step passed, 1 when one failed, 2 without a CUDA GPU."""
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print(f"{NO_GPU_MESSAGE} (torch {torch.__version__}, built for CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    check = Check(args)
    data_dir, runs_dir = check.out_dir / "phantom", check.out_dir / "runs"
    # one process (-n 0): the CUDA tests share one GPU, and some of them time it
    pytest = "-m pytest -q -rfs -n 0 -m cuda tests -p no:cacheprovider --continue-on-collection-errors"
    check.command("cuda_tests", [args.python, *shlex.split(pytest)])
    check.command("phantoms", [args.python, "scripts/make_phantoms.py", "--out_dir", str(data_dir)])
    commands = training_commands(args, data_dir, runs_dir)
    for name in ("train_amp_auto", "train_fp16", "ddp_1gpu"):
        check.command(name, commands[name], summarise=True)
    check.step("inference_latency", lambda limit: {"ok": True, **inference_latency(args.inference_config)})
    sampling_json = check.out_dir / "sampling.json"
    sampling = check.command("sampling", sampling_command(args, sampling_json))
    if sampling.get("ok") and sampling_json.exists():
        sampling["results"] = json.loads(sampling_json.read_text())
        check.save()
    check.command("train_compile", commands["train_compile"], summarise=True)
    print(f"gpu_check: wrote {check.out_dir / 'gpu_check.json'}; all ok: {check.results['all_ok']}")
    return 0 if check.results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
