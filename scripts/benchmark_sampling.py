"""Naive versus fast (cached) sampling of the two-level prior, level by level, and the time to sample slices.

Run from the repository root::

    python scripts/benchmark_sampling.py                      # the networks of configs/inference.json, 16 maps
    python scripts/benchmark_sampling.py --num_samples 4 --json out.json
    python scripts/benchmark_sampling.py --override prior_layers "[15, 3]" --override prior_channels 16

The prior and the VQ-VAE are ``configs/inference.json``'s ``prior_def`` and ``network_def`` (with any
``--override``), with random weights: the cost of sampling does not depend on the weights. For each level, on its
full code map (``latent_shapes``), with a batch of ``--num_samples`` maps:

* one forward pass over the whole map: the cost of one naive step;
* fast sampling, measured end to end (best of ``--repeats``);
* naive sampling, run to the end when its estimate (forward pass x positions) is within ``--naive_budget_s``;
  otherwise run on the first ``--naive_positions`` positions and EXTRAPOLATED to the whole map (every naive step
  is a full forward pass of the same size): median step time x positions;
* ``torch.equal`` of the naive codes and the fast codes on every position naive sampled;
* on CUDA, fast sampling without CUDA graphs as well (``fast_eager``): what replaying each row as a graph saves,
  and ``torch.equal`` of both.

The bottom level is conditioned on the top codes the fast sampler drew, for both samplers. Then:

* decoding the sampled codes with the VQ-VAE, and ``bundle.stage2_prior.generation.generate`` end to end for
  ``--num_samples`` slices (both levels, fast sampler, and decoding), the time a user waits for new slices;
* a small two-level map pair (``--small_top``, the bottom map scaled like ``latent_shapes``), sampled to the end
  by both samplers through ``sample_codes``: a fully measured speed-up and exact equality of both levels.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402

import torch  # noqa: E402

from bundle.stage2_prior.generation import generate  # noqa: E402
from bundle.stage2_prior.pixelcnn import GatedPixelCNN  # noqa: E402
from bundle.stage2_prior.sampling import sample_codes, sample_fast, sample_fast_eager, sample_naive  # noqa: E402

LEVELS = ("top", "bottom")


def machine_info(device: torch.device) -> dict:
    """CPU model, core count, GPU and library versions of this machine.

    Args:
        device: the device the benchmark runs on.

    Returns:
        A JSON-ready dict.
    """
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls of ``fn`` (waiting for CUDA), and the last result.

    Args:
        fn: the call to time.
        device: CUDA is synchronised before and after each call.
        repeats: calls; the fastest counts.

    Returns:
        ``(seconds, result)``.
    """
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


@contextlib.contextmanager
def step_stamps(model: GatedPixelCNN) -> Iterator[list[float]]:
    """Times at which ``model`` embeds a code map: once per naive step (the fast sampler reads the table directly).

    Args:
        model: the prior of one level.

    Yields:
        The list the stamps are appended to.
    """
    stamps: list[float] = []
    handle = model.embedding.register_forward_pre_hook(lambda module, inputs: stamps.append(time.perf_counter()))
    try:
        yield stamps
    finally:
        handle.remove()


def compare_level(
    model: GatedPixelCNN,
    shape: Sequence[int],
    num_samples: int,
    cond_codes: torch.Tensor | None = None,
    naive_positions: int = 8,
    naive_budget_s: float = 30.0,
    repeats: int = 1,
    seed: int = 0,
) -> tuple[dict, torch.Tensor]:
    """Naive versus fast sampling of one level's full code map, with the same seed.

    Args:
        model: the prior of the level, in eval mode.
        shape: ``(H, W)`` of the map.
        num_samples: maps sampled together.
        cond_codes: the conditioning (top) code map for a spatially conditioned level, else None.
        naive_positions: positions naive samples when the whole map would take longer than ``naive_budget_s``.
        naive_budget_s: naive runs to the end when one forward pass times ``H * W`` is within this.
        repeats: repeats of the forward pass and of fast sampling (best taken).
        seed: the sampling seed.

    Returns:
        ``(figures, fast codes [N, H, W])``.
    """
    device = next(model.parameters()).device
    height, width = int(shape[0]), int(shape[1])
    positions = height * width
    codes = torch.randint(0, model.num_embeddings, (num_samples, height, width), device=device)
    with torch.no_grad():  # the first call warms up (allocator, kernel selection) and is not counted
        forward_s, _ = timed(lambda: model(codes, None, cond_codes), device, max(3, repeats + 1))

    def sample(sampler: Callable, **kwargs: object) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sampler(model, (height, width), num_samples, generator=generator, cond_codes=cond_codes, **kwargs)

    fast_s, fast = timed(lambda: sample(sample_fast), device, repeats)
    run_to_end = forward_s * positions <= naive_budget_s
    measured = positions if run_to_end else max(1, min(naive_positions, positions))
    with step_stamps(model) as stamps:
        naive_run_s, naive = timed(lambda: sample(sample_naive, max_positions=measured), device)
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    step_s = statistics.median(steps) if steps else naive_run_s / measured
    naive_s = naive_run_s if run_to_end else step_s * positions
    equal = torch.equal(naive.view(num_samples, -1)[:, :measured], fast.view(num_samples, -1)[:, :measured])
    graphs = {}
    if device.type == "cuda":  # elsewhere "fast" is the eager pass
        eager_s, eager = timed(lambda: sample(sample_fast_eager), device, repeats)
        graphs = {
            "fast_eager_s": eager_s,
            "graph_speedup": eager_s / fast_s,
            "graph_equals_eager": torch.equal(fast, eager),
        }
    figures = {
        "shape": [height, width],
        "num_samples": num_samples,
        "conditioned_on_top_codes": cond_codes is not None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_pass_s": forward_s,
        "fast_s": fast_s,
        "naive_s": naive_s,
        "naive_extrapolated": not run_to_end,
        "naive_measured_positions": measured,
        "naive_measured_s": naive_run_s,
        "naive_s_per_position_median": step_s,
        "speedup": naive_s / fast_s,
        "fast_equals_naive": equal,
        **graphs,
    }
    return figures, fast


def compare_two_level(
    prior: torch.nn.Module, top_shape: Sequence[int], bottom_shape: Sequence[int], num_samples: int, seed: int = 0
) -> dict:
    """Both samplers through ``sample_codes`` on a (small) map pair, to the end: time and exact equality.

    Args:
        prior: the :class:`~bundle.stage2_prior.two_level.TwoLevelPrior`.
        top_shape: ``(h_t, w_t)``.
        bottom_shape: ``(h_b, w_b)``.
        num_samples: map pairs sampled together.
        seed: the sampling seed.

    Returns:
        JSON-ready figures.
    """
    device = next(prior.parameters()).device

    def sample(sampler: str) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_codes(prior, top_shape, bottom_shape, num_samples, seed=seed, sampler=sampler)

    naive_s, naive = timed(lambda: sample("naive"), device)
    fast_s, fast = timed(lambda: sample("fast"), device)
    return {
        "latent_shapes": [list(top_shape), list(bottom_shape)],
        "num_samples": num_samples,
        "naive_s": naive_s,
        "fast_s": fast_s,
        "speedup_measured": naive_s / fast_s,
        "fast_equals_naive": all(torch.equal(a, b) for a, b in zip(naive, fast)),
    }


def sampling_report(
    vqvae: torch.nn.Module,
    prior: torch.nn.Module,
    latent_shapes: Sequence[Sequence[int]],
    num_samples: int = 16,
    naive_positions: int = 8,
    naive_budget_s: float = 30.0,
    small_top: Sequence[int] = (4, 2),
    repeats: int = 1,
    seed: int = 0,
) -> dict:
    """Every sampling figure: each level fast versus naive, decoding, ``generate`` end to end, the small check.

    Args:
        vqvae: the two-level VQ-VAE (eval mode), for decoding.
        prior: the :class:`~bundle.stage2_prior.two_level.TwoLevelPrior` (eval mode).
        latent_shapes: ``((h_t, w_t), (h_b, w_b))``.
        num_samples: maps (and slices) sampled together.
        naive_positions: see :func:`compare_level`.
        naive_budget_s: see :func:`compare_level`.
        small_top: top map of the fully measured check; its bottom map has the ratio of ``latent_shapes``.
        repeats: repeats of the repeated timings (best taken).
        seed: the sampling seed.

    Returns:
        JSON-ready figures; ``levels`` holds one entry per level.
    """
    device = next(vqvae.parameters()).device
    top_shape, bottom_shape = (tuple(int(s) for s in shape) for shape in latent_shapes)
    levels, codes = {}, {}
    for level, model, cond in (("top", prior.top, None), ("bottom", prior.bottom, "top")):
        levels[level], codes[level] = compare_level(
            model,
            top_shape if level == "top" else bottom_shape,
            num_samples,
            codes.get(cond),
            naive_positions,
            naive_budget_s,
            repeats,
            seed,
        )
    with torch.no_grad():
        decode_s, _ = timed(lambda: vqvae.decode_samples(codes["top"], codes["bottom"]), device, repeats + 1)
    generate_s, (images, _, _) = timed(
        lambda: generate(vqvae, prior, num_samples, seed=seed, batch_size=num_samples, latent_shapes=latent_shapes),
        device,
        repeats,
    )
    ratio = [b // t for t, b in zip(top_shape, bottom_shape)]
    small_bottom = [s * r for s, r in zip(small_top, ratio)]
    naive_s = sum(v["naive_s"] for v in levels.values())
    fast_s = sum(v["fast_s"] for v in levels.values())
    return {
        "num_samples": num_samples,
        "latent_shapes": [list(top_shape), list(bottom_shape)],
        "levels": levels,
        "naive_codes_s": naive_s,
        "fast_codes_s": fast_s,
        "speedup": naive_s / fast_s,
        "decode_s": decode_s,
        "naive_slices_s": naive_s + decode_s,
        "fast_slices_s": fast_s + decode_s,
        "generate": {
            "num_slices": int(images.shape[0]),
            "seconds": generate_s,
            "seconds_per_slice": generate_s / images.shape[0],
            "sampler": "fast",
            "function": "bundle.stage2_prior.generation.generate",
        },
        "small": compare_two_level(prior, small_top, small_bottom, num_samples, seed),
        "fast_equals_naive": all(v["fast_equals_naive"] for v in levels.values()),
    }


def build_networks(overrides: dict, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, tuple]:
    """The VQ-VAE and the prior of ``configs/inference.json`` (random weights, eval mode) and ``latent_shapes``.

    Args:
        overrides: config overrides, e.g. ``{"prior_layers": [15, 3]}``.
        device: where to put them.

    Returns:
        ``(vqvae, prior, latent_shapes)``.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    parser.update({"bundle_root": ROOT, **overrides})
    vqvae = parser.get_parsed_content("network_def").to(device).eval()
    prior = parser.get_parsed_content("prior_def").to(device).eval()
    return vqvae, prior, parser.get_parsed_content("latent_shapes")


def print_report(report: dict) -> None:
    """A table of :func:`sampling_report`'s figures.

    Args:
        report: its result.
    """
    n = report["num_samples"]
    print(f"batch of {n} maps, seconds per batch; naive EXTRAPOLATED where marked")
    header = ("level", "map", "forward pass", "naive", "fast", "speed-up", "codes equal")
    rows = [header]
    for level, v in report["levels"].items():
        naive = f"{v['naive_s']:.2f}" + (
            f" (EXTRAPOLATED from {v['naive_measured_positions']} positions)" if v["naive_extrapolated"] else ""
        )
        equal = f"{v['fast_equals_naive']} ({v['naive_measured_positions']} positions)"
        shape = f"{v['shape'][0]}x{v['shape'][1]}"
        rows.append(
            (level, shape, f"{v['forward_pass_s']:.4f}", naive, f"{v['fast_s']:.3f}", f"{v['speedup']:.0f}x", equal)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for level, v in report["levels"].items():
        if "fast_eager_s" in v:
            print(
                f"{level}: fast without CUDA graphs {v['fast_eager_s']:.3f} s, with {v['fast_s']:.3f} s "
                f"({v['graph_speedup']:.1f}x), codes equal {v['graph_equals_eager']}"
            )
    g, s = report["generate"], report["small"]
    print(
        f"two levels: naive {report['naive_codes_s']:.1f} s, fast {report['fast_codes_s']:.2f} s "
        f"({report['speedup']:.0f}x); decoding {report['decode_s']:.3f} s"
    )
    print(f"generate(): {g['num_slices']} slices in {g['seconds']:.2f} s ({g['seconds_per_slice']:.3f} s per slice)")
    print(
        f"small maps {s['latent_shapes']}, both measured to the end: naive {s['naive_s']:.2f} s, fast "
        f"{s['fast_s']:.3f} s ({s['speedup_measured']:.1f}x), codes equal {s['fast_equals_naive']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--naive_positions", type=int, default=8, help="positions naive samples when extrapolating")
    parser.add_argument("--naive_budget_s", type=float, default=30.0, help="run naive to the end within this estimate")
    parser.add_argument("--small_top", default="4,2", help="top map of the fully measured check, e.g. 4,2")
    parser.add_argument("--repeats", type=int, default=2, help="repeats (best taken) of the repeated timings")
    parser.add_argument(
        "--override", nargs=2, action="append", default=[], metavar=("KEY", "JSON"), help="config override"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Runs :func:`sampling_report` on the config's networks and prints (and writes) the figures.

    Args:
        argv: command-line arguments; ``None`` reads ``sys.argv``.
    """
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    overrides = {key: json.loads(value) for key, value in args.override}
    vqvae, prior, latent_shapes = build_networks(overrides, device)
    report = sampling_report(
        vqvae,
        prior,
        latent_shapes,
        args.num_samples,
        args.naive_positions,
        args.naive_budget_s,
        [int(s) for s in args.small_top.split(",")],
        args.repeats,
        args.seed,
    )
    info = machine_info(device)
    print(
        f"machine : {info['cpu']} | {info['cpu_cores']} cores ({info['torch_threads']} torch threads) | "
        f"GPU: {info['gpu'] or 'none'} | device {info['device']} | torch {info['torch']}"
    )
    print_report(report)
    if args.json:
        content = {"machine": info, "overrides": overrides, "results": report}
        with open(args.json, "w") as f:
            f.write(json.dumps(content, indent=4) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
