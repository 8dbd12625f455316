"""Realism of saved sample folders side by side, against the same real test slices, in one run.

Each folder of ``sample_*.nii.gz`` files (written by the ``sampling`` workflow of this or any earlier version of the
bundle) is compared with the same real test slices, in the feature space of one trained VQ-VAE-2, by the
classifier two-sample test and precision/recall of ``bundle.evaluation.generation_report``. The real training
slices against the same test slices give the floor; the same training slices reconstructed by that VQ-VAE-2 give
what a perfect prior would score with it; their own top codes with bottom codes drawn by the bottom prior of
``--prior_path`` (default ``models/prior/prior.pt`` where it exists) give what a perfect top prior would score, so a
shortfall can be put on the top or the bottom level. Example, a folder from an older model beside the current one:

    python scripts/compare_samples.py --samples outputs/samples old/outputs/samples --json docs/sample_comparison.json

A single comparison of 48 slices moves by up to 0.25 in two-sample accuracy with its seed alone; to tell two models
apart, compare 128 slices (all of the demo's test split) at several seeds, which also prints the means:

    python scripts/compare_samples.py --samples outputs/samples old/outputs/samples --num 128 --seed 0 1 2

For a model trained with an overlay, give it too: ``--overlay configs/hipmri_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai.bundle import ConfigParser  # noqa: E402

from bundle.data.discovery import scan_key  # noqa: E402
from bundle.engine.weights import load_weights  # noqa: E402
from bundle.evaluation.generation_report import _realism_report, training_references, vqvae2_feature_maps  # noqa: E402

SPLITS = ("test", "train")
KEYS = ("c2st_accuracy", "precision", "recall", "density", "coverage")
REFERENCES = (
    ("real train vs real test (floor)", "_real_baseline"),
    ("reconstructed train vs real test", "_reconstruction_baseline"),
    ("train's top codes, bottom prior's draws", "_real_top_baseline"),
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The data set, the models of the references (VQ-VAE-2, prior, the bottom prior's temperature) and overlays."""
    parser.add_argument("--dataset_dir", default=str(ROOT / "data" / "phantom"))
    parser.add_argument(
        "--ckpt_path", default=str(ROOT / "models" / "model.pt"), help="VQ-VAE-2 of the features and references"
    )
    parser.add_argument(
        "--prior_path",
        default=None,
        help="two-level prior whose bottom level draws the real-top reference (default models/prior/prior.pt if "
        "present; '' for none)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=json.loads((ROOT / "configs" / "sample.json").read_text())["temperature"],
        help="the bottom prior's temperature for the real-top reference (default that of configs/sample.json)",
    )
    parser.add_argument(
        "--overlay",
        nargs="*",
        default=[],
        help="config files read after configs/inference.json (configs/hipmri_gpu.json)",
    )


def inference_parser(dataset_dir: str, overlay: Sequence[str] = ()) -> ConfigParser:
    """``configs/inference.json`` and then ``overlay``, for the data in ``dataset_dir``, networks returning outputs."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), *overlay])
    parser.update({"bundle_root": str(ROOT), "dataset_dir": dataset_dir, "network_returns_loss": False})
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="+", required=True, help="folders of sample_*.nii.gz files")
    add_model_arguments(parser)
    parser.add_argument("--num", type=int, default=48, help="slices per set")
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="comparison seeds (the real slices drawn, the classifier's start); with several, also their means",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def read_samples(folder: str | Path, num: int) -> torch.Tensor:
    """The first ``num`` ``sample_*.nii.gz`` of ``folder`` as ``[N, 1, H, W]`` float32."""
    paths = sorted(Path(folder).glob("sample_*.nii*"))[:num]
    if len(paths) < num:
        raise ValueError(f"'{folder}' holds {len(paths)} sample_*.nii.gz files, {num} are needed.")
    return torch.from_numpy(np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in paths]))[:, None]


def real_slices(parser: ConfigParser, split: str, num: int, seed: int) -> tuple[torch.Tensor, list[object]]:
    """``num`` slices of ``split``, drawn with ``seed``, preprocessed as every workflow does, and their scans."""
    items = parser.get_parsed_content("split_datalist")(split)
    transform = parser.get_parsed_content("eval_preprocessing")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    images = torch.stack([transform(items[i])["image"] for i in order]).float()
    return images, [scan_key(items[i]["image"]) or items[i]["image"] for i in order]


def compare(
    parser: ConfigParser,
    vqvae: torch.nn.Module,
    prior: torch.nn.Module | None,
    folders: list[str],
    num: int,
    seed: int,
    temperature: float,
) -> dict:
    """The realism report of every folder against ``num`` real test slices drawn with ``seed``, each beside the same
    number of real training slices, their reconstructions and (with ``prior``) their real-top redraws."""
    (test, test_scans), (train, train_scans) = (real_slices(parser, split, num, seed) for split in SPLITS)
    features, device = vqvae2_feature_maps(vqvae), torch.device("cpu")
    references = training_references(vqvae, prior, train, temperature, seed)
    return {
        folder: _realism_report(
            read_samples(folder, num), test, train, features, device, seed, test_scans, train_scans, references
        )
        for folder in folders
    }


def load_prior(parser: ConfigParser, path: str | None) -> torch.nn.Module | None:
    """The two-level prior at ``path`` (None: ``models/prior/prior.pt`` if present; ``''``: no prior)."""
    default = ROOT / "models" / "prior" / "prior.pt"
    if path == "" or (path is None and not default.is_file()):
        return None
    return load_weights(parser.get_parsed_content("prior_def"), path or str(default), torch.device("cpu"))


def mean_over_seeds(runs: list[dict]) -> dict:
    """Per folder, the mean of each figure of :data:`KEYS` (and of its references) over the runs."""
    suffixes = ("", *(suffix for _, suffix in REFERENCES))
    first = next(iter(runs[0].values()))
    names = [key + suffix for key in KEYS for suffix in suffixes if key + suffix in first]
    return {folder: {name: statistics.fmean(run[folder][name] for run in runs) for name in names} for folder in runs[0]}


def table(results: dict) -> list[str]:
    """The figures of :data:`KEYS`, a row per reference and per folder."""
    first = next(iter(results.values()))
    lines = [f"{'':40s} " + " ".join(f"{k:>14s}" for k in KEYS)]
    present = [(label, suffix) for label, suffix in REFERENCES if KEYS[0] + suffix in first]
    lines += [f"{label:40s} " + " ".join(f"{first[k + suffix]:14.3f}" for k in KEYS) for label, suffix in present]
    return lines + [f"{folder[-40:]:40s} " + " ".join(f"{r[k]:14.3f}" for k in KEYS) for folder, r in results.items()]


def main(argv: list[str] | None = None) -> int:
    """Prints (and writes) the realism figures of every folder beside the references, per seed and as a mean."""
    args = parse_args(argv)
    parser = inference_parser(args.dataset_dir, args.overlay)
    vqvae = load_weights(parser.get_parsed_content("network_def"), args.ckpt_path, torch.device("cpu"))
    prior = load_prior(parser, args.prior_path)
    runs = {}
    with torch.no_grad():
        for seed in args.seed:
            runs[seed] = compare(parser, vqvae, prior, args.samples, args.num, seed, args.temperature)
            print("\n".join(([f"comparison seed {seed}"] if len(args.seed) > 1 else []) + table(runs[seed])))
    if len(args.seed) == 1:
        record = {"num": args.num, "seed": args.seed[0], "results": runs[args.seed[0]]}
    else:
        means = mean_over_seeds(list(runs.values()))
        print("\n".join([f"mean of {len(runs)} comparison seeds"] + table(means)))
        record = {
            "num": args.num,
            "seeds": args.seed,
            "results": means,
            "per_seed": {str(s): r for s, r in runs.items()},
        }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=4) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
