"""Soak and scale checks: resident memory over thousands of training iterations, and a 20,000-slice data set.

    python scripts/soak.py --iterations 3000 --slices 20000 --json outputs/soak.json

1. Builds the bundle's VQ-VAE-2 trainer from ``configs/inference.json`` + ``configs/train_vqvae.json`` (tiny phantom
   set, tiny network by default so thousands of iterations fit in minutes on a CPU), runs ``--iterations``
   iterations and samples the process's resident memory (RSS) every ``--every`` iterations; reports the growth
   after a warm-up.
2. Writes ``--slices`` HipMRI-layout files (hard links to a few phantom slices, so the disk cost is nil), times
   ``bundle.data.discovery.datalist`` on them, and builds the config's ``CacheDataset`` with ``--cache_rate`` to
   show that memory follows what caching asks for, not the data set's size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    """Resident memory of this process in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def parser_for(overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / name) for name in ("inference.json", "train_vqvae.json")])
    parser.update(overrides)
    return parser


def soak(work: Path, iterations: int, every: int, tiny: bool) -> dict:
    """Trains for ``iterations`` iterations and samples RSS."""
    from ignite.engine import Events

    from bundle.data.phantom import write_hipmri_phantoms

    data = work / "data"
    write_hipmri_phantoms(data, train_cases=2, val_cases=1, test_cases=1, slices_per_case=8)
    overrides = {
        "dataset_dir": str(data),
        "output_dir": str(work / "out"),
        "ckpt_dir": str(work / "models"),
        "batch_size": 4,
        "max_epochs": 10**6,
        "val_interval": 10**6,
        "resume": False,
    }
    if tiny:
        overrides.update(
            {"channels": [16, 32], "num_res_channels": [16, 16], "num_embeddings": 64, "embedding_dim": 16}
        )
    os.chdir(ROOT)
    parser = parser_for(overrides)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train::trainer")
    samples: list[tuple[int, float]] = []

    @trainer.on(Events.ITERATION_COMPLETED(every=every))
    def sample(engine) -> None:
        samples.append((engine.state.iteration, rss_mib()))
        if engine.state.iteration >= iterations:
            engine.terminate()

    start = time.time()
    trainer.run()
    warm = [m for i, m in samples if i >= iterations // 5]
    return {
        "iterations": trainer.state.iteration,
        "seconds": round(time.time() - start, 1),
        "rss_mib_samples": samples,
        "rss_after_warmup_first_mib": warm[0],
        "rss_last_mib": warm[-1],
        "rss_growth_after_warmup_mib": round(warm[-1] - warm[0], 1),
        "rss_max_after_warmup_mib": max(warm),
    }


def scale(work: Path, slices: int, cache_rate: float) -> dict:
    """Discovers and caches a data set of ``slices`` files."""
    from bundle.data.discovery import datalist
    from bundle.data.phantom import write_hipmri_phantoms

    source = work / "source"
    write_hipmri_phantoms(source, train_cases=1, val_cases=1, test_cases=1, slices_per_case=8)
    originals = sorted((source / "keras_slices_train").iterdir())
    root = work / "big"
    for split, count in (("train", slices), ("validate", 8), ("test", 8)):
        folder = root / f"keras_slices_{split}"
        folder.mkdir(parents=True)
        for k in range(count):
            os.link(originals[k % len(originals)], folder / f"case_{k // 100:03d}_week_0_slice_{k % 100}.nii.gz")
    before = rss_mib()
    start = time.time()
    items = datalist(root, "train")
    discover_s = time.time() - start
    after_discovery = rss_mib()
    parser = parser_for({"dataset_dir": str(root), "cache_rate": cache_rate, "output_dir": str(work / "o2")})
    start = time.time()
    dataset = parser.get_parsed_content("train::dataset")
    cache_s = time.time() - start
    return {
        "slices": len(items),
        "discovery_seconds": round(discover_s, 2),
        "rss_before_mib": round(before, 1),
        "rss_after_discovery_mib": round(after_discovery, 1),
        "cache_rate": cache_rate,
        "cached_items": int(dataset.cache_num),
        "cache_seconds": round(cache_s, 1),
        "rss_after_cache_mib": round(rss_mib(), 1),
        "expected_cache_mib": round(dataset.cache_num * 256 * 128 * 4 / 2**20, 1),
    }


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--iterations", type=int, default=3000)
    args.add_argument("--every", type=int, default=100)
    args.add_argument("--full_network", action="store_true", help="soak the default network instead of a tiny one")
    args.add_argument("--slices", type=int, default=20000)
    args.add_argument("--cache_rate", type=float, default=0.01)
    args.add_argument("--json", default="")
    options = args.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            }
        }
        report["scale"] = scale(Path(tmp) / "scale", options.slices, options.cache_rate)
        print(json.dumps(report["scale"], indent=1))
        report["soak"] = soak(Path(tmp) / "soak", options.iterations, options.every, not options.full_network)
        print(json.dumps({k: v for k, v in report["soak"].items() if k != "rss_mib_samples"}, indent=1))
    if options.json:
        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
