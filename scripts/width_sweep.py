"""Quality per FLOP of the VQ-VAE's width: time and training compute to a test SSIM >= 0.90, width by width.

Run from the repository root::

    python scripts/width_sweep.py                                # 6 widths, up to --max_minutes each (~35 min)
    python scripts/width_sweep.py --json docs/width_sweep.json
    python scripts/width_sweep.py --widths 32,64:16 64,128:32    # channels:residual channels

For each width (``channels`` of the two levels, ``num_res_channels`` of both), everything else at the
config's defaults:

1. the training cost, counted with ``torch.utils.flop_counter.FlopCounterMode`` on one fp32 forward + backward
   of a 256x128 slice through ``configs/inference.json``'s ``network_def``, and the parameter count;
2. ``scripts/time_to_quality.py`` with ``--override channels ... --override num_res_channels ...``: a cold-start
   training on a fresh default phantom set that stops once validation SSIM reaches the target, then a test
   evaluation (resuming if the test is below it), within ``--max_minutes``.

It prints, per width: GFLOP per training image, seconds per epoch, the epoch and wall time at which validation
and test reached the target, the training compute spent until then (epochs x training images x GFLOP/image),
and the best validation SSIM. The runs are sequential (a training run cannot be interleaved with another), so
the load average of each is recorded: compare them only on an otherwise idle machine. The results go to
``<work_dir>/width_sweep.json`` (and ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

DEFAULT_WIDTHS = ("16,32:8", "24,48:12", "32,64:16", "48,96:24", "64,128:32", "96,192:48")


def parse_width(text: str) -> tuple[list[int], list[int]]:
    """``"64,128:32"`` -> ``([64, 128], [32, 32])``."""
    channels_text, _, res_text = text.partition(":")
    channels = [int(c) for c in channels_text.split(",")]
    res = [int(res_text) if res_text else channels[0] // 2] * len(channels)
    return channels, res


def cost(channels: list[int], res_channels: list[int]) -> dict:
    """GFLOP of one fp32 training step per 256x128 slice, and the parameter count, of ``network_def``."""
    import torch
    from monai.bundle import ConfigParser
    from torch.utils.flop_counter import FlopCounterMode

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    parser.update(
        {"bundle_root": ROOT, "channels": channels, "num_res_channels": res_channels, "network_returns_loss": True}
    )
    net = parser.get_parsed_content("network_def", lazy=False).train()
    x = torch.rand(1, 1, *parser.get_parsed_content("image_size"))
    with FlopCounterMode(display=False) as counter:
        reconstruction, quantization_loss = net(x)
        (torch.nn.functional.l1_loss(reconstruction, x) + quantization_loss).backward()
    return {"gflop_per_image": counter.get_total_flops() / 1e9, "parameters": sum(p.numel() for p in net.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--widths",
        nargs="+",
        default=list(DEFAULT_WIDTHS),
        help="channels[:residual channels], e.g. 64,128:32 (residual default: half the first level's channels)",
    )
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--max_minutes", type=float, default=9.0, help="budget of each width's run")
    parser.add_argument("--dataset_dir", default=None, help="existing data set (default: a fresh default phantom set)")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument(
        "--override",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="passed on to every run, e.g. --override compile True",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="width-sweep-"))
    os.makedirs(work, exist_ok=True)

    results = []
    for width in args.widths:
        channels, res = parse_width(width)
        name = f"{channels[0]},{channels[1]}:{res[0]}"
        row = {"width": name, "channels": channels, "num_res_channels": res, **cost(channels, res)}
        run_dir = os.path.join(work, name.replace(",", "-").replace(":", "_r"))
        command = [
            sys.executable,
            os.path.join(ROOT, "scripts", "time_to_quality.py"),
            "--work_dir",
            run_dir,
            "--target",
            str(args.target),
            "--max_minutes",
            str(args.max_minutes),
            "--override",
            "channels",
            json.dumps(channels),
            "--override",
            "num_res_channels",
            json.dumps(res),
        ]
        if args.dataset_dir:
            command += ["--dataset_dir", os.path.abspath(args.dataset_dir)]
        for key, value in args.override:
            command += ["--override", key, value]
        print(
            f"== {name}: {row['gflop_per_image']:.2f} GFLOP per training image, {row['parameters']:,} parameters",
            flush=True,
        )
        t = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        row["run_wall_s"] = time.monotonic() - t
        with open(os.path.join(work, f"{os.path.basename(run_dir)}.log"), "w") as f:
            f.write(done.stdout + done.stderr)
        report_path = os.path.join(run_dir, "time_to_quality.json")
        if done.returncode != 0 or not os.path.exists(report_path):
            row["status"] = f"time_to_quality.py exited {done.returncode}; see {run_dir}.log"
            results.append(row)
            print("   " + row["status"], flush=True)
            continue
        with open(report_path) as f:
            report = json.load(f)
        epochs = report["epochs"]
        images = len(
            _training_files(os.path.abspath(args.dataset_dir) if args.dataset_dir else os.path.join(run_dir, "phantom"))
        )
        # seconds per epoch from the steady part of the run (the first epoch carries start-up and k-means)
        steady = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(epochs[1:], epochs[2:]) if b["round"] == a["round"]]
        reached_epoch = report["test_target_epoch"]
        row.update(
            {
                "status": report["status"],
                "epoch_s": sorted(steady)[len(steady) // 2] if steady else None,
                "training_images": images,
                "val_target_epoch": report["val_target_epoch"],
                "time_to_val_target_s": report["time_to_val_target_s"],
                "test_target_epoch": reached_epoch,
                "time_to_test_target_s": report["time_to_test_target_s"],
                "test_ssim": report["test_ssim"],
                "tflop_to_test_target": (
                    (reached_epoch * images * row["gflop_per_image"] / 1e3) if reached_epoch else None
                ),
                "best_val_ssim": max(e[report["key_metric"]] for e in epochs) if epochs else None,
                "epochs_run": epochs[-1]["epoch"] if epochs else 0,
                "codebook_usage": epochs[-1].get("codebook_usage") if epochs else None,
                "load_average": [report["machine"]["load_average_start"][0], report["machine"]["load_average_end"][0]],
                "curve": [(e["epoch"], round(e["elapsed_s"], 1), round(e[report["key_metric"]], 4)) for e in epochs],
            }
        )
        results.append(row)
        print(
            f"   {row['status']}: test target at epoch {reached_epoch} after {_fmt(row['time_to_test_target_s'])} s "
            f"(test SSIM {_fmt(row['test_ssim'], 4)}); {_fmt(row['epoch_s'])} s/epoch; best val SSIM "
            f"{_fmt(row['best_val_ssim'], 4)}",
            flush=True,
        )

    from time_to_quality import machine, write_json

    out = {
        "target": args.target,
        "max_minutes_each": args.max_minutes,
        "overrides": dict(args.override),
        "machine": machine(),
        "results": results,
    }
    print()
    print(
        f"{'width (ch:res)':<15}{'GFLOP/img':>10}{'params':>10}{'s/epoch':>9}{'epoch':>7}{'to test':>9}"
        f"{'TFLOP':>8}{'test SSIM':>11}{'best val':>10}  load"
    )
    for r in results:
        print(
            f"{r['width']:<15}{r['gflop_per_image']:>10.2f}{r['parameters']:>10,}{_fmt(r.get('epoch_s')):>9}"
            f"{_fmt(r.get('test_target_epoch'), 0):>7}{_fmt(r.get('time_to_test_target_s'), 0):>9}"
            f"{_fmt(r.get('tflop_to_test_target'), 0):>8}{_fmt(r.get('test_ssim'), 4):>11}"
            f"{_fmt(r.get('best_val_ssim'), 4):>10}  {_fmt_load(r.get('load_average'))}"
        )
    print(
        f"'to test': seconds of training until the test SSIM was >= {args.target} (blank: not within "
        f"{args.max_minutes} min); TFLOP: training compute until then"
    )
    write_json(out, os.path.join(work, "width_sweep.json"), args.json)


def _training_files(dataset_dir: str) -> list[str]:
    from bundle.data.discovery import datalist

    return datalist(dataset_dir, "train")


def _fmt_load(load) -> str:
    return "-" if not load else f"{load[0]:.2f} -> {load[1]:.2f}"


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
