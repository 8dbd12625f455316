"""Benchmark naive vs fast (cached) sampling of the Gated PixelCNN prior.

Run from the repository root::

    python scripts/benchmark_sampling.py --channels 64 --layers 10 --json out.json

What is measured, on the current machine, in one run:

* one full forward pass over the full latent (``H x W``): the cost of one naive step;
* fast sampling of the full latent, measured end to end;
* naive sampling of the full latent, measured on a prefix of positions (``--naive_rows``
  rows) and EXTRAPOLATED to all ``H * W`` positions (each naive step is one full forward
  pass of the same size, so the cost per position is constant): the median step time
  times ``H * W`` (the mean-based figure is reported as well);
* naive and fast sampling of a small latent (``--small_height x --small_width``), both
  fully measured, so the speed-up is also shown without extrapolation.

The weights are random: sampling cost does not depend on the weights. Other timings are
the best of ``--repeats`` runs, as the machine may be shared.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from bundle.stage2_prior.pixelcnn import GatedPixelCNN  # noqa: E402
from bundle.stage2_prior.sampling import sample_fast, sample_naive  # noqa: E402


def machine_info(device: torch.device) -> dict:
    """CPU model, core count, GPU and library versions of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls of ``fn`` (synchronising CUDA) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--kernel_size", type=int, default=5)
    parser.add_argument("--num_embeddings", type=int, default=512)
    parser.add_argument("--head_channels", type=int, default=128)
    parser.add_argument("--num_classes", type=int, default=0, help="> 0 for a class-conditioned model")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--naive_rows", type=int, default=2, help="rows of the full latent timed for naive")
    parser.add_argument("--small_height", type=int, default=16)
    parser.add_argument("--small_width", type=int, default=8)
    parser.add_argument(
        "--repeats", type=int, default=3, help="repeats (best taken) of every timing except the naive prefix"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = GatedPixelCNN(
        args.num_embeddings, args.channels, args.layers, args.kernel_size, args.num_classes, args.head_channels
    ).to(device)
    model.eval()
    n, height, width = args.num_samples, args.height, args.width
    labels = torch.arange(n, device=device) % args.num_classes if args.num_classes > 0 else None

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(args.seed)

    # warm up (allocator, oneDNN / cuDNN kernel selection)
    codes = torch.randint(0, args.num_embeddings, (n, height, width), device=device)
    with torch.no_grad():
        model(codes, labels)
    sample_fast(model, (2, width), n, labels=labels, generator=gen())

    with torch.no_grad():
        # cheap, so a few more repeats against bursts of load
        t_forward, _ = timed(lambda: model(codes, labels), device, max(5, args.repeats))
    t_fast, fast_codes = timed(
        lambda: sample_fast(model, (height, width), n, labels=labels, generator=gen()), device, args.repeats
    )

    # the real naive sampler on the first rows of the full latent; a forward pre-hook stamps every
    # step, so the per-step median is robust to bursts of load from other processes on the machine
    prefix = min(args.naive_rows, height) * width
    stamps: list[float] = []
    hook = model.register_forward_pre_hook(lambda module, inputs: stamps.append(time.perf_counter()))
    t_prefix, naive_prefix = timed(
        lambda: sample_naive(model, (height, width), n, labels=labels, generator=gen(), max_positions=prefix), device
    )
    hook.remove()
    steps = sorted(b - a for a, b in zip(stamps[:-1], stamps[1:])) or [t_prefix]
    t_step_median = steps[len(steps) // 2]
    prefix_equal = torch.equal(naive_prefix.view(n, -1)[:, :prefix], fast_codes.view(n, -1)[:, :prefix])
    t_naive_extrapolated = t_step_median * height * width
    t_naive_extrapolated_mean = t_prefix / prefix * height * width

    small = (args.small_height, args.small_width)
    t_small_fast, small_fast = timed(
        lambda: sample_fast(model, small, n, labels=labels, generator=gen()), device, args.repeats
    )
    t_small_naive, small_naive = timed(
        lambda: sample_naive(model, small, n, labels=labels, generator=gen()), device, args.repeats
    )
    small_equal = torch.equal(small_fast, small_naive)

    info = machine_info(device)
    config = {k: getattr(args, k) for k in ("channels", "layers", "kernel_size", "num_embeddings", "head_channels",
                                              "num_classes", "height", "width", "num_samples")}
    config["parameters"] = sum(p.numel() for p in model.parameters())
    config["receptive_field_rows_above_half_width"] = list(model.receptive_field)
    results = {
        "full_forward_pass_s": t_forward,
        "full": {
            "shape": [height, width],
            "fast_s": t_fast,
            "naive_s_extrapolated": t_naive_extrapolated,
            "naive_measured_positions": prefix,
            "naive_measured_s": t_prefix,
            "naive_s_per_position_median": t_step_median,
            "naive_s_per_position_mean": t_prefix / prefix,
            "naive_s_extrapolated_from_mean": t_naive_extrapolated_mean,
            "speedup_extrapolated": t_naive_extrapolated / t_fast,
            # cross-check: H*W forward passes at the best measured forward-pass time
            "naive_s_from_forward_pass": t_forward * height * width,
            "speedup_from_forward_pass": t_forward * height * width / t_fast,
            "fast_equals_naive_on_measured_prefix": prefix_equal,
        },
        "small": {
            "shape": list(small),
            "fast_s": t_small_fast,
            "naive_s": t_small_naive,
            "speedup_measured": t_small_naive / t_small_fast,
            "fast_equals_naive": small_equal,
        },
    }

    print(f"machine : {info['cpu']} | {info['cpu_cores']} cores ({info['torch_threads']} torch threads) | "
          f"GPU: {info['gpu'] or 'none'} | device {info['device']} | torch {info['torch']}")
    print(f"model   : GatedPixelCNN(K={args.num_embeddings}, channels={args.channels}, layers={args.layers}, "
          f"kernel={args.kernel_size}, head={args.head_channels}, classes={args.num_classes}), "
          f"{config['parameters']:,} parameters; batch of {n} samples; seconds per batch")
    print(f"one full forward pass on {height}x{width}: {t_forward:.4f} s (x {height * width} positions = "
          f"{t_forward * height * width:.1f} s, {t_forward * height * width / t_fast:.0f}x the fast sampler)")
    rows = [
        (f"{height}x{width}", f"{t_naive_extrapolated:.2f} (EXTRAPOLATED: {height * width} x median step "
         f"{t_step_median:.4f} s of {prefix} measured)", f"{t_fast:.3f}",
         f"{t_naive_extrapolated / t_fast:.1f}x (extrapolated)"),
        (f"{small[0]}x{small[1]}", f"{t_small_naive:.2f} (measured)", f"{t_small_fast:.3f}",
         f"{t_small_naive / t_small_fast:.1f}x (measured)"),
    ]
    header = ("latent", "naive s/batch", "fast s/batch", "speed-up")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"naive on the first {prefix} positions of {height}x{width}: {t_prefix:.2f} s measured in all "
          f"(mean step {t_prefix / prefix:.4f} s -> {t_naive_extrapolated_mean:.1f} s for the full map)")
    print(f"fast == naive: small latent {small_equal}, first {prefix} positions of {height}x{width} {prefix_equal}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "config": config, "results": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
