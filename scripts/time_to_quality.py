"""Wall time for the VQ-VAE to reach a test SSIM >= target (0.90) from a cold start, with the default settings.

Run from the repository root::

    python scripts/time_to_quality.py                          # --target 0.9 --max_minutes 30
    python scripts/time_to_quality.py --json docs/time_to_quality.json
    python scripts/time_to_quality.py --override batch_size 8  # any override, passed to every workflow

What it does:

1. Data: a fresh copy of the default phantom set (``bundle.data.phantom.write_hipmri_phantoms`` with its defaults,
   the same files as ``data/phantom``) in a temporary work folder, so that nothing another run does to
   ``data/phantom`` matters; ``--dataset_dir`` uses an existing set instead. Generating it is not timed.
2. Training, cold: ``python -m monai.bundle run training`` with ``configs/inference.json`` +
   ``configs/train_vqvae.json`` and a large ``--max_epochs``, temp ``output_dir``/``ckpt_dir``, and nothing else
   changed, plus one extra config file merged after them: ``{"+initialize": [...]}`` appends to ``initialize`` an
   expression that attaches, to the validation evaluator, a handler calling ``trainer.terminate()`` once the key metric
   (``val_ssim``) reaches the target. ``terminate()`` ends the run at the end of that epoch, after the best
   model (``models/model.pt``) and the resumable checkpoint are written, then the workflow finishes normally.
   The clock starts when the process is launched (imports, data caching, codebook k-means: all included); the
   time to the target on validation is when the evaluator logs it.
3. Test: ``python -m monai.bundle run evaluating`` (``configs/evaluate.json``, test split) on ``model.pt``. If
   the test SSIM is below the target, training resumes (the bundle resumes from ``outputs/checkpoints`` by
   itself) until validation reaches the target again, and the test is repeated. The time to test SSIM >=
   target counts the training processes only; the total with the evaluations is given too.

``--max_minutes`` bounds everything (a running training is terminated at the deadline). Results are printed
and written to ``<work_dir>/time_to_quality.json`` (and ``--json``). The work folder is kept (logs, weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = (
    "device",
    "batch_size",
    "learning_rate",
    "amp",
    "amp_dtype",
    "channels_last",
    "compile",
    "cache_rate",
    "num_workers",
    "val_interval",
    "seed",
    "image_size",
    "channels",
    "num_res_layers",
    "num_res_channels",
    "num_embeddings",
    "embedding_dim",
    "commitment_cost",
    "ema_decay",
    "codebook_init_from_data",
    "codebook_restart_dead",
    "codebook_restart_interval",
)


def log(message: str) -> None:
    print(message, flush=True)


def machine() -> dict:
    import ignite
    import monai
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "ignite": ignite.__version__,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ},
    }


def effective_settings(overrides: dict[str, str], dataset_dir: str) -> dict:
    """The training settings as the training configs resolve them (with the overrides), without running it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", name) for name in ("inference.json", "train_vqvae.json")])
    parser.update({"bundle_root": ROOT, "dataset_dir": dataset_dir})
    for key, value in overrides.items():
        parser[key] = _literal(value)
    out = {}
    for key in SETTINGS:
        try:
            value = parser.get_parsed_content(key)
        except Exception:  # noqa: BLE001  (a key a future config may not have)
            continue
        out[key] = str(value) if key == "device" else value
    out["key_metric"] = next(iter(parser.get("validate::key_metric")))
    return out


def write_json(content: dict, *paths: str | None) -> None:
    """Writes ``content`` to each of ``paths`` that is not None, and says so."""
    for path in filter(None, paths):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps(content, indent=4) + "\n")
        log(f"wrote {path}")


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _literal(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


# bundle.stage1_vqvae.codebook_monitor.CodebookMonitor logs "Epoch N codebook: codebook_top_usage=..., ..." before
# validation and StatsHandler "Epoch[N] Metrics -- ... codebook_top_usage: ..." after it; one codebook_usage for a
# single quantiser, codebook_top_usage and codebook_bottom_usage for the two-level model
USAGE_LINES = (re.compile(r"Epoch (\d+) codebook: (.*)"), re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)"))
USAGE_VALUE = re.compile(r"\b(codebook(?:_[a-z]+)?_usage)[=:] ?([0-9.]+(?:e[-+]?\d+)?)")


def read_usage(line: str, usage: dict[int, dict[str, float]]) -> None:
    """Adds the codebook usage values a training log line reports to ``usage[epoch]`` (the first value counts)."""
    for pattern in USAGE_LINES:
        found = pattern.search(line)
        if found:
            values = usage.setdefault(int(found.group(1)), {})
            for name, value in USAGE_VALUE.findall(found.group(2)):
                values.setdefault(name, float(value))


def format_usage(values: dict[str, float] | None) -> str:
    """``"top 0.812, bottom 0.640"`` (or ``"-"``)."""
    if not values:
        return "-"
    return ", ".join(
        f"{name.removeprefix('codebook_').removesuffix('usage').strip('_') or 'all'} {value:.3f}"
        for name, value in values.items()
    )


def stop_config(path: str, key_metric: str, target: float) -> str:
    """A config file to merge after the training configs: stop training at the end of the epoch that reaches the target."""
    expression = (
        "$@validate::evaluator.add_event_handler(ignite.engine.Events.EPOCH_COMPLETED, "
        f"lambda engine: @train::trainer.terminate() if engine.state.metrics.get('{key_metric}', -1.0) >= {target!r} "
        "else None)"
    )
    with open(path, "w") as f:
        json.dump({"+initialize": [expression]}, f, indent=2)
    return path


def bundle_command(run_id: str, config_files: list[str], args: dict) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        repr(config_files) if len(config_files) > 1 else config_files[0],
        "--meta_file",
        "configs/metadata.json",
        "--logging_file",
        "configs/logging.conf",
    ]
    for key, value in args.items():
        command += [f"--{key}", str(value)]
    return command


def stream(command: list[str], log_path: str, deadline: float, on_line) -> tuple[int | None, float]:
    """Runs ``command``, passing every output line to ``on_line(line, elapsed)`` and to ``log_path``.

    Terminates the process at ``deadline`` (``time.monotonic()``). Returns ``(exit code or None if stopped at
    the deadline, wall seconds)``.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    stopped = False
    with open(log_path, "a") as log_file:
        log_file.write("$ " + " ".join(command) + "\n")
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                log_file.write(line)
                on_line(line.rstrip("\n"), time.monotonic() - start)
            if not stopped and time.monotonic() > deadline:
                stopped = True
                log("deadline reached: terminating the training process")
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    code = proc.wait()
    return (None if stopped else code), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.9, help="SSIM to reach on validation and test")
    parser.add_argument("--max_minutes", type=float, default=30.0, help="bound on the whole measurement")
    parser.add_argument("--max_epochs", type=int, default=1000, help="passed to training (the stop ends it earlier)")
    parser.add_argument("--dataset_dir", default=None, help="existing data set (default: a fresh default phantom set)")
    parser.add_argument("--work_dir", default=None, help="folder for data, outputs, weights and logs (default: temp)")
    parser.add_argument("--device", default=None, help="override the config's device (e.g. cpu)")
    parser.add_argument(
        "--override",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="config override passed to training and evaluation, e.g. --override batch_size 8",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.chdir(ROOT)

    t_begin = time.monotonic()
    deadline = t_begin + 60 * args.max_minutes
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="time-to-quality-"))
    os.makedirs(work, exist_ok=True)
    info = machine()

    # ---- data ----
    data_s = 0.0
    if args.dataset_dir:
        dataset_dir = os.path.abspath(args.dataset_dir)
    else:
        from bundle.data.phantom import write_hipmri_phantoms

        dataset_dir = os.path.join(work, "phantom")
        t = time.monotonic()
        counts = write_hipmri_phantoms(dataset_dir)  # the defaults: the same set as data/phantom
        data_s = time.monotonic() - t
        log(f"default phantom set written to {dataset_dir} in {data_s:.1f} s (not timed): {counts}")
    deadline += data_s  # data generation does not count against the budget either

    overrides = dict(args.override)
    if args.device:
        overrides["device"] = f"$torch.device('{args.device}')"
    settings = effective_settings(overrides, dataset_dir)
    key = settings["key_metric"]
    common = {"dataset_dir": dataset_dir, "ckpt_dir": os.path.join(work, "models"), **overrides}
    train_args = {**common, "output_dir": os.path.join(work, "outputs"), "max_epochs": args.max_epochs}
    stop_file = stop_config(os.path.join(work, "stop_at_target.json"), key, args.target)
    train_cmd = bundle_command(
        "training", ["configs/inference.json", "configs/train_vqvae.json", stop_file], train_args
    )
    log(
        f"machine : {info['cpu']} | {info['cpu_cores']} cores, {info['torch_threads']} torch threads | GPU "
        f"{info['gpu'] or 'none'} | python {info['python']}, torch {info['torch']}, monai {info['monai']}, ignite "
        f"{info['ignite']} | load {info['load_average_start'][0]:.2f} | env {info['env'] or '-'}"
    )
    log("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    log(
        f"target  : test {key.replace('val_', '')} >= {args.target} (stop when {key} >= {args.target}); "
        f"budget {args.max_minutes} min; work dir {work}"
    )
    log("training: " + " ".join(train_cmd))

    epochs: list[dict] = []
    rounds: list[dict] = []
    train_wall = 0.0
    pattern = re.compile(rf"Epoch\[(\d+)\] Metrics -- .*?\b{re.escape(key)}: (-?[0-9.]+(?:e[-+]?\d+)?)")
    usage: dict[int, dict[str, float]] = {}
    val_reached: dict | None = None
    test_reached: dict | None = None
    status = "budget exhausted"

    for round_index in range(1, 1000):
        offset = train_wall

        def on_line(line: str, elapsed: float, offset=offset, round_index=round_index) -> None:
            nonlocal val_reached
            read_usage(line, usage)
            found = pattern.search(line)
            if not found:
                return
            epoch, value = int(found.group(1)), float(found.group(2))
            record = {
                "epoch": epoch,
                key: value,
                "elapsed_s": offset + elapsed,
                "round": round_index,
                "codebook_usage": usage.get(epoch),
            }
            epochs.append(record)
            log(
                f"  epoch {epoch:3d}  {key} {value:.4f}  at {offset + elapsed:7.1f} s  "
                f"(codebook usage {format_usage(usage.get(epoch))})"
            )
            if val_reached is None and value >= args.target:
                val_reached = dict(record)

        code, wall = stream(train_cmd, os.path.join(work, "train.log"), deadline, on_line)
        train_wall += wall
        if code is None:
            break
        if code != 0:
            status = f"training exited with code {code} (see {work}/train.log)"
            break
        if not epochs or epochs[-1][key] < args.target:
            status = "training ended before the target (raise --max_epochs)"
            break
        eval_dir = os.path.join(work, f"eval_round{round_index}")
        eval_cmd = bundle_command(
            "evaluating", ["configs/inference.json", "configs/evaluate.json"], {**common, "output_dir": eval_dir}
        )
        t = time.monotonic()
        done = subprocess.run(eval_cmd, cwd=ROOT, capture_output=True, text=True)
        eval_s = time.monotonic() - t
        with open(os.path.join(work, "evaluate.log"), "a") as f:
            f.write("$ " + " ".join(eval_cmd) + "\n" + done.stdout + done.stderr)
        if done.returncode != 0:
            status = f"evaluation failed (see {work}/evaluate.log)"
            break
        metrics = _read_json(os.path.join(eval_dir, "reconstruction_metrics.json"))
        test_value = metrics["ssim"]
        rounds.append(
            {
                "round": round_index,
                "last_epoch": epochs[-1]["epoch"],
                "train_wall_s": train_wall,
                "evaluation_s": eval_s,
                "test": metrics,
            }
        )
        log(
            f"round {round_index}: stopped after epoch {epochs[-1]['epoch']} at {train_wall:.1f} s of training; "
            f"test ssim {test_value:.4f}, psnr {metrics.get('psnr', float('nan')):.2f} dB "
            f"(evaluation {eval_s:.1f} s)"
        )
        if test_value >= args.target:
            test_reached = {
                "epoch": epochs[-1]["epoch"],
                "train_wall_s": train_wall,
                "test_ssim": test_value,
                "total_wall_s": time.monotonic() - t_begin - data_s,
                "rounds": round_index,
            }
            status = "reached"
            break
        if time.monotonic() > deadline:
            break
        log("test below target: resuming training from the last checkpoint")

    info["load_average_end"] = list(os.getloadavg())
    result = {
        "target": args.target,
        "key_metric": key,
        "status": status,
        "time_to_val_target_s": val_reached["elapsed_s"] if val_reached else None,
        "val_target_epoch": val_reached["epoch"] if val_reached else None,
        "time_to_test_target_s": test_reached["train_wall_s"] if test_reached else None,
        "time_to_test_target_with_evaluation_s": test_reached["total_wall_s"] if test_reached else None,
        "test_target_epoch": test_reached["epoch"] if test_reached else None,
        "test_ssim": test_reached["test_ssim"] if test_reached else (rounds[-1]["test"]["ssim"] if rounds else None),
        "training_wall_s": train_wall,
        "data_generation_s": data_s,
        "max_minutes": args.max_minutes,
        "epochs": epochs,
        "rounds": rounds,
        "settings": settings,
        "machine": info,
        "training_command": " ".join(train_cmd),
        "stop_config": _read_json(stop_file),
        "work_dir": work,
    }
    log("")
    log(
        f"time to {key} >= {args.target}: "
        + (f"{val_reached['elapsed_s']:.1f} s (epoch {val_reached['epoch']})" if val_reached else "not reached")
    )
    log(
        f"time to test ssim >= {args.target}: "
        + (
            f"{test_reached['train_wall_s']:.1f} s of training (epoch {test_reached['epoch']}, test ssim "
            f"{test_reached['test_ssim']:.4f}; {test_reached['total_wall_s']:.1f} s with evaluation)"
            if test_reached
            else f"not reached ({status})"
        )
    )
    log(
        f"load average: {info['load_average_start'][0]:.2f} at start, {info['load_average_end'][0]:.2f} at end "
        f"({info['cpu_cores']} cores)"
    )
    write_json(result, os.path.join(work, "time_to_quality.json"), args.json)


if __name__ == "__main__":
    main()
