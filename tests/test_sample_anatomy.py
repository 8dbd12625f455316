"""``scripts/sample_anatomy.py``: organ figures by value, masks found or skipped with a count, low-confidence pixels
left unlabelled, and a run end to end on a small phantom set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from bundle.data.phantom import LABELS, write_hipmri_phantoms

from conftest import ROOT, save_untrained_models, write_sample_folder

sys.path.insert(0, str(ROOT / "scripts"))

import sample_anatomy  # noqa: E402


def _disk(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_organ_figures_count_slices_parts_area_and_centre() -> None:
    maps = np.zeros((2, 1, 64, 32), dtype=np.int64)
    maps[0, 0][_disk((64, 32), (20, 8), 4) | _disk((64, 32), (20, 24), 4)] = LABELS["bone"]  # two femoral heads
    maps[0, 0][_disk((64, 32), (40, 16), 1)] = LABELS["rectum"]  # 5 pixels: too small to count
    maps[1, 0][_disk((64, 32), (30, 16), 6)] = LABELS["bladder"]
    figures = sample_anatomy.organ_figures(torch.from_numpy(maps), min_area=20)

    assert figures["bone"]["shown"] == 0.5 and figures["bone"]["parts"] == 2.0
    assert figures["bone"]["centre"] == [20.0, 16.0]  # midway between the two heads
    assert figures["bone"]["area_percent"] == pytest.approx(round(2 * 49 / (2 * 64 * 32) * 100, 2))
    assert figures["bladder"]["shown"] == 0.5 and figures["bladder"]["parts"] == 1.0
    assert figures["bladder"]["centre"] == [30.0, 16.0]
    assert figures["rectum"] == {"shown": 0.0, "parts": None, "area_percent": 0.12, "centre": None}
    assert figures["prostate"]["shown"] == 0.0 and figures["prostate"]["area_percent"] == 0.0


def test_mask_path_follows_the_hipmri_layout() -> None:
    image = Path("/data/keras_slices_train/case_004_week_1_slice_7.nii.gz")
    assert sample_anatomy.mask_path(image) == Path("/data/keras_slices_seg_train/seg_004_week_1_slice_7.nii.gz")


class _FixedLogits(nn.Module):
    """Bone with probability about 0.80 in the left half, bladder with about 0.9999 in the right half."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(images.shape[0], len(LABELS), *images.shape[2:])
        half = images.shape[-1] // 2
        logits[:, LABELS["bone"], :, :half] = 3.0
        logits[:, LABELS["bladder"], :, half:] = 12.0
        return logits


def test_pixels_below_the_confidence_are_background() -> None:
    images = torch.rand(3, 1, 8, 6)
    plain = sample_anatomy.segment(_FixedLogits(), images)
    assert (plain[..., :3] == LABELS["bone"]).all() and (plain[..., 3:] == LABELS["bladder"]).all()
    confident = sample_anatomy.segment(_FixedLogits(), images, confidence=0.9)
    assert (confident[..., :3] == LABELS["background"]).all() and (confident[..., 3:] == LABELS["bladder"]).all()


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small phantom set, random VQ-VAE-2 and prior checkpoints, and a folder of the real test slices as samples."""
    root = tmp_path_factory.mktemp("anatomy")
    write_hipmri_phantoms(root / "data", train_cases=2, val_cases=1, test_cases=1, slices_per_case=6)
    parser = sample_anatomy.inference_parser(str(root / "data"))
    save_untrained_models(parser, root)
    test, masks = sample_anatomy.load_labelled(parser, sample_anatomy.labelled_items(parser, "test", 0))
    write_sample_folder(root / "copies", test)
    args = ["--dataset_dir", str(root / "data"), "--ckpt_path", str(root / "model.pt"), "--epochs", "1"]
    return {"root": root, "args": [*args, "--prior_path", str(root / "prior.pt")], "masks": masks, "parser": parser}


def test_every_set_is_segmented_and_the_masks_row_is_the_truth(setting: dict, capsys: pytest.CaptureFixture) -> None:
    copies, out = str(setting["root"] / "copies"), setting["root"] / "anatomy.json"
    record = sample_anatomy.main([*setting["args"], "--samples", copies, "--num", "0", "--json", str(out)])

    assert json.loads(out.read_text()) == record
    assert record["test_slices"] == 6 and record["segmenter"]["training_slices"] == 12
    assert set(record["segmenter"]["validation_dice"]) == set(sample_anatomy.ORGANS)
    assert all(0.0 <= dice <= 1.0 for dice in record["segmenter"]["validation_dice"].values())
    results = record["results"]
    assert list(results) == [
        "real test slices, their masks",
        "real test slices",
        "reconstructed (a perfect prior)",
        "real top codes, drawn bottom (a perfect top prior)",
        copies,
    ]
    assert results["real test slices, their masks"] == sample_anatomy.organ_figures(setting["masks"], 20)
    assert results[copies] == results["real test slices"]  # the same slices, segmented alike
    for figures in results.values():
        assert all(0.0 <= figures[organ]["shown"] <= 1.0 for organ in sample_anatomy.ORGANS)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("segmenter: 12 training slices, 1 epochs; validation Dice")
    assert printed[2].startswith("real test slices, their masks") and len(printed) == 2 + len(results)


def test_slices_without_a_mask_are_skipped_and_counted(setting: dict, capsys: pytest.CaptureFixture) -> None:
    folder = setting["root"] / "data" / "keras_slices_seg_test"
    held = setting["root"] / "held_masks"
    held.mkdir()
    masks = sorted(folder.glob("seg_*"))
    try:
        masks[0].rename(held / masks[0].name)
        items = sample_anatomy.labelled_items(setting["parser"], "test", 0)
        assert len(items) == 5 and all(Path(item["label"]).is_file() for item in items)
        assert "test: 1 of 6 slices have no mask and are skipped" in capsys.readouterr().out
        for mask in masks[1:]:
            mask.rename(held / mask.name)
        with pytest.raises(ValueError, match="no test slice under .* has a mask"):
            sample_anatomy.labelled_items(setting["parser"], "test", 0)
    finally:
        for mask in held.iterdir():
            mask.rename(folder / mask.name)
        held.rmdir()
    assert len(sample_anatomy.labelled_items(setting["parser"], "test", 0)) == 6


def test_a_mask_with_an_unknown_label_is_named(setting: dict, tmp_path: Path) -> None:
    items = sample_anatomy.labelled_items(setting["parser"], "test", 0)
    mask = nib.load(items[2]["label"])
    broken = tmp_path / "seg_broken.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj) + 7, mask.affine), broken)
    with pytest.raises(ValueError, match="1 masks hold labels outside 0 to 5 .* first '.*seg_broken.nii.gz'"):
        sample_anatomy.load_labelled(setting["parser"], [*items[:2], {**items[2], "label": str(broken)}])
