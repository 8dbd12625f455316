"""Realism of saved sample folders side by side, against the same real test slices, in one run.

Each folder of ``sample_*.nii.gz`` files (written by the ``sampling`` workflow of this or any earlier version of the
bundle) is compared with the same real test slices, in the feature space of one trained VQ-VAE-2, by the
classifier two-sample test and precision/recall of ``bundle.evaluation.generation_report``. The real training
slices against the same test slices give the floor; the same training slices reconstructed by that VQ-VAE-2 give
what a perfect prior would score with it. Example, a folder from an older model beside the current one:

    python scripts/compare_samples.py --samples outputs/samples old/outputs/samples --json docs/sample_comparison.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai.bundle import ConfigParser  # noqa: E402

from bundle.data.discovery import scan_key  # noqa: E402
from bundle.engine.weights import load_weights  # noqa: E402
from bundle.evaluation.generation_report import _realism_report, reconstruct, vqvae2_feature_maps  # noqa: E402

SPLITS = ("test", "train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="+", required=True, help="folders of sample_*.nii.gz files")
    parser.add_argument("--dataset_dir", default=str(ROOT / "data" / "phantom"))
    parser.add_argument("--ckpt_path", default=str(ROOT / "models" / "model.pt"), help="VQ-VAE-2 of the features")
    parser.add_argument("--num", type=int, default=48, help="slices per set")
    parser.add_argument("--seed", type=int, default=0)
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


def main(argv: list[str] | None = None) -> int:
    """Prints (and writes) the realism figures of every folder beside the real-vs-real floor."""
    args = parse_args(argv)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "dataset_dir": args.dataset_dir, "network_returns_loss": False})
    device = torch.device("cpu")
    vqvae = load_weights(parser.get_parsed_content("network_def"), args.ckpt_path, device)
    (test, test_scans), (train, train_scans) = (real_slices(parser, split, args.num, args.seed) for split in SPLITS)
    results = {}
    with torch.no_grad():
        features = vqvae2_feature_maps(vqvae)
        reconstructed = reconstruct(vqvae, train)
        for folder in args.samples:
            samples = read_samples(folder, args.num)
            results[folder] = _realism_report(
                samples, test, train, features, device, args.seed, test_scans, train_scans, reconstructed
            )
    keys = ["c2st_accuracy", "precision", "recall", "density", "coverage"]
    print(f"{'':40s} " + " ".join(f"{k:>14s}" for k in keys))
    first = next(iter(results.values()))
    for label, name in (
        ("real train vs real test (floor)", "_real_baseline"),
        ("reconstructed train vs real test", "_reconstruction_baseline"),
    ):
        print(f"{label:40s} " + " ".join(f"{first[k + name]:14.3f}" for k in keys))
    for folder, report in results.items():
        print(f"{folder[-40:]:40s} " + " ".join(f"{report[k]:14.3f}" for k in keys))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"num": args.num, "seed": args.seed, "results": results}, indent=4) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
