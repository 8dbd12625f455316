"""Which organs generated slices show, and where, beside real slices: a segmenter trained on labelled real slices.

The realism measures of ``compare_samples.py`` compare feature statistics; they hardly see whether a sample has
femoral heads or a rectum. This script trains a small MONAI ``UNet`` on the training slices and their masks
(``keras_slices_seg_<split>/seg_<name>``, the HipMRI layout that the demo phantoms share; labels 0 background,
1 body, 2 bone, 3 bladder, 4 rectum, 5 prostate), checks it on the validation slices (Dice per organ), and segments:

- the real test slices (beside their own masks: how far the segmenter itself is off),
- the same slices through the VQ-VAE-2's codes and decoder (what a perfect prior would give),
- their own top codes with bottom codes drawn by the bottom prior (what a perfect top prior would give),
- every folder of ``sample_*.nii.gz`` files.

A segmenter trained on real slices still labels texture it has never seen, but less certainly: a pixel whose most
likely label is below ``--confidence`` (0.9) counts as background. For each organ the script reports the share of
slices that show it (at least ``--min_area`` pixels), its share of all pixels (%), the mean number of its connected
parts where shown (two femoral heads count 2) and the mean centre of its pixels. Example, 128 samples after the demo::

    python -m monai.bundle run sampling --config_file "['configs/inference.json','configs/sample.json']" \
        --num_samples 128 --samples_dir outputs/samples_128
    python scripts/sample_anatomy.py --samples outputs/samples_128 --json docs/sample_anatomy.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import Compose, ResizeWithPadOrCropd
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_sampling import machine_info  # noqa: E402
from compare_samples import add_model_arguments, inference_parser, load_prior, read_samples  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from bundle.data.phantom import LABELS  # noqa: E402
from bundle.data.transforms import EnsureSlice2Dd, SafeLoadImaged  # noqa: E402
from bundle.engine.weights import load_weights  # noqa: E402
from bundle.evaluation.generation_report import training_references  # noqa: E402

ORGANS = ("bone", "bladder", "rectum", "prostate")
REFERENCE_NAMES = {
    "reconstruction": "reconstructed (a perfect prior)",
    "real_top": "real top codes, drawn bottom (a perfect top prior)",
}


def mask_path(image_path: str | Path) -> Path:
    """The mask of a HipMRI-layout slice: ``keras_slices_<split>/case_<rest>`` -> ``keras_slices_seg_<split>/seg_<rest>``."""
    path = Path(image_path)
    return (
        path.parent.parent
        / path.parent.name.replace("keras_slices_", "keras_slices_seg_", 1)
        / path.name.replace("case_", "seg_", 1)
    )


def labelled_items(parser: ConfigParser, split: str, num: int) -> list[dict]:
    """``num`` slices of ``split`` that have a mask, evenly spaced through its list (all for 0); a slice without a mask
    is skipped and counted.

    Raises:
        ValueError: no slice of ``split`` has a mask.
    """
    items = [
        {"image": item["image"], "label": str(mask_path(item["image"]))}
        for item in parser.get_parsed_content("split_datalist")(split)
    ]
    found = [item for item in items if Path(item["label"]).is_file()]
    if len(found) < len(items):
        print(f"{split}: {len(items) - len(found)} of {len(items)} slices have no mask and are skipped")
    if not found:
        raise ValueError(f"no {split} slice under '{parser['dataset_dir']}' has a mask (keras_slices_seg_{split}/).")
    return found[:: max(1, len(found) // num)][:num] if num else found


def load_labelled(parser: ConfigParser, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices preprocessed as every workflow does, ``[N, 1, H, W]`` float32, and their masks, ``[N, 1, H, W]`` int64.

    Raises:
        ValueError: a mask holds a label outside :data:`~bundle.data.phantom.LABELS`; names the first such file.
    """
    keys = ["image", "label"]
    transform = Compose(
        [
            SafeLoadImaged(keys=keys, image_only=True, ensure_channel_first=True),
            EnsureSlice2Dd(keys=keys),
            ResizeWithPadOrCropd(keys=keys, spatial_size=parser["image_size"]),
            parser.get_parsed_content("intensity_scaling"),
        ]
    )
    loaded = [transform(item) for item in items]
    masks = torch.stack([torch.as_tensor(d["label"]) for d in loaded]).round().long()
    bad = [item["label"] for item, mask in zip(items, masks) if mask.min() < 0 or mask.max() >= len(LABELS)]
    if bad:
        raise ValueError(f"{len(bad)} masks hold labels outside 0 to {len(LABELS) - 1} ({LABELS}), first '{bad[0]}'.")
    return torch.stack([torch.as_tensor(d["image"]) for d in loaded]).float(), masks


def train_segmenter(images: torch.Tensor, masks: torch.Tensor, epochs: int, seed: int) -> UNet:
    """A 2D MONAI ``UNet`` over ``len(LABELS)`` classes, Dice + cross-entropy, Adam 1e-3, batches of 16, in eval mode."""
    torch.manual_seed(seed)
    net = UNet(2, 1, len(LABELS), channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    loss, optimizer = DiceCELoss(to_onehot_y=True, softmax=True), torch.optim.Adam(net.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=order).split(16):
            optimizer.zero_grad()
            loss(net(images[index]), masks[index]).backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def segment(net: UNet, images: torch.Tensor, confidence: float = 0.0) -> torch.Tensor:
    """Label maps ``[N, 1, H, W]`` int64; a pixel whose most likely label has a probability below ``confidence`` is
    background (a segmenter trained on real slices still labels texture it has never seen, with less certainty)."""
    maps = []
    for batch in images.split(16):
        probability, labels = net(batch).softmax(1).max(1, keepdim=True)
        maps.append(labels.masked_fill(probability < confidence, LABELS["background"]))
    return torch.cat(maps)


def organ_dice(labels: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean Dice of each organ over the slices whose mask shows it."""
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    scores = metric(one_hot(labels, len(LABELS)), one_hot(masks, len(LABELS)))
    return {organ: round(float(scores[:, LABELS[organ]].nanmean()), 3) for organ in ORGANS}


def organ_figures(labels: torch.Tensor, min_area: int) -> dict[str, dict[str, float | None]]:
    """Per organ: the share of slices showing it, its mean number of parts there, its mean share of the slice's pixels
    (%, over all slices) and its mean centre ``(row, col)`` where shown.

    Args:
        labels: label maps ``[N, 1, H, W]``.
        min_area: pixels an organ (and each counted part) needs to count.
    """
    maps = labels[:, 0].numpy()
    figures = {}
    for organ in ORGANS:
        shown, parts, centres = 0, [], []
        for organ_map in maps == LABELS[organ]:
            if organ_map.sum() < min_area:
                continue
            shown += 1
            components, count = ndimage.label(organ_map)
            parts.append(int((np.bincount(components.ravel())[1:] >= min_area).sum()))
            centres.append(ndimage.center_of_mass(organ_map))
        figures[organ] = {
            "shown": round(shown / len(maps), 3),
            "parts": round(float(np.mean(parts)), 2) if parts else None,
            "area_percent": round(float((maps == LABELS[organ]).mean() * 100), 2),
            "centre": [round(float(c), 1) for c in np.mean(centres, 0)] if centres else None,
        }
    return figures


def sample_folder(folder: str) -> torch.Tensor:
    """Every ``sample_*.nii.gz`` of ``folder``, ``[N, 1, H, W]``.

    Raises:
        ValueError: the folder holds none.
    """
    count = len(list(Path(folder).glob("sample_*.nii*")))
    if count == 0:
        raise ValueError(f"'{folder}' holds no sample_*.nii.gz files.")
    return read_samples(folder, count)


def table(results: dict) -> list[str]:
    """A row per set: per organ, the share of slices showing it, its area (%), mean parts and mean centre."""
    lines = [f"{'':50s} " + " ".join(f"{organ + ': shown area parts centre':>36s}" for organ in ORGANS)]
    for name, figures in results.items():
        cells = []
        for organ in ORGANS:
            f = figures[organ]
            centre = "-" if f["centre"] is None else f"({f['centre'][0]:.0f}, {f['centre'][1]:.0f})"
            parts = "-" if f["parts"] is None else f"{f['parts']:.2f}"
            cells.append(f"{f['shown']:>10.3f} {f['area_percent']:>6.2f} {parts:>6s} {centre:>11s}")
        lines.append(f"{name[-50:]:50s} " + " ".join(cells))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="*", default=[], help="folders of sample_*.nii.gz files")
    add_model_arguments(parser)
    parser.add_argument("--num", type=int, default=128, help="real test slices, evenly spaced (0: all)")
    parser.add_argument(
        "--train_num", type=int, default=0, help="training slices for the segmenter, evenly spaced (0: all)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="the segmenter's epochs")
    parser.add_argument("--min_area", type=int, default=20, help="pixels an organ needs to count as shown")
    parser.add_argument("--confidence", type=float, default=0.9, help="a pixel less certain than this is background")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Trains the segmenter, segments every set, prints the table and returns (and writes) the record."""
    args = parse_args(argv)
    parser = inference_parser(args.dataset_dir, args.overlay)
    train_images, train_masks = load_labelled(parser, labelled_items(parser, "train", args.train_num))
    net = train_segmenter(train_images, train_masks, args.epochs, args.seed)
    val_images, val_masks = load_labelled(parser, labelled_items(parser, "validate", 0))
    dice = organ_dice(segment(net, val_images, args.confidence), val_masks)
    test, test_masks = load_labelled(parser, labelled_items(parser, "test", args.num))
    vqvae = load_weights(parser.get_parsed_content("network_def"), args.ckpt_path, torch.device("cpu"))
    with torch.no_grad():
        references = training_references(vqvae, load_prior(parser, args.prior_path), test, args.temperature, args.seed)
    images = {"real test slices": test}
    images.update({REFERENCE_NAMES[key]: slices for key, slices in references.items()})
    images.update({folder: sample_folder(folder) for folder in args.samples})
    sets = {"real test slices, their masks": test_masks}
    sets.update({name: segment(net, x, args.confidence) for name, x in images.items()})
    results = {name: organ_figures(labels, args.min_area) for name, labels in sets.items()}
    print(f"segmenter: {len(train_images)} training slices, {args.epochs} epochs; validation Dice {json.dumps(dice)}")
    print("\n".join(table(results)))
    record = {
        "command": "python scripts/sample_anatomy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(torch.device("cpu")),
        "segmenter": {"training_slices": len(train_images), "epochs": args.epochs, "validation_dice": dice},
        "test_slices": len(test),
        "min_area": args.min_area,
        "confidence": args.confidence,
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=4) + "\n")
    return record


if __name__ == "__main__":
    main()
