"""Data discovery: layouts, masks ignored, labels, demo generation and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.data.discovery import datalist, detect_layout, slice_index


def test_hipmri_layout_lists_images_not_masks(phantom_dir: Path) -> None:
    assert detect_layout(phantom_dir) == "hipmri"
    items = datalist(phantom_dir, "train")
    assert len(items) == 3 * 6
    names = [Path(i["image"]).name for i in items]
    assert all(n.startswith("case_") and n.endswith(".nii.gz") for n in names)
    assert all("keras_slices_train" in i["image"] for i in items)
    assert len(datalist(phantom_dir, "validate")) == 6 and len(datalist(phantom_dir, "test")) == 6


def test_masks_beside_images_are_skipped(tmp_path: Path, phantom_dir: Path) -> None:
    split = tmp_path / "keras_slices_train"
    shutil.copytree(phantom_dir / "keras_slices_train", split)
    for mask in sorted((phantom_dir / "keras_slices_seg_train").iterdir())[:3]:
        shutil.copy(mask, split / mask.name)
    items = datalist(tmp_path, "train")
    assert len(items) == 18 and not any(Path(i["image"]).name.startswith("seg_") for i in items)


def test_oasis_png_layout(tmp_path: Path) -> None:
    for split in ("train", "seg_train"):
        folder = tmp_path / f"keras_png_slices_{split}"
        folder.mkdir()
        for k in range(3):
            Image.fromarray(np.full((32, 32), k * 40, np.uint8)).save(folder / f"case_{k}.png")
    assert detect_layout(tmp_path) == "oasis"
    items = datalist(tmp_path, "train")
    assert len(items) == 3 and all("keras_png_slices_train" in i["image"] for i in items)


def test_datalist_json_relative_paths_and_labels(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").touch()
    content = {"training": [{"image": "a.nii.gz", "label": 2}], "validation": ["a.nii.gz"], "test": []}
    (tmp_path / "datalist.json").write_text(json.dumps(content))
    assert detect_layout(tmp_path) == "datalist"
    items = datalist(tmp_path, "train", num_classes=4)
    assert items == [{"image": str(tmp_path / "a.nii.gz"), "label": 2}]
    assert datalist(tmp_path / "datalist.json", "validate")[0]["image"] == str(tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="holds no images"):
        datalist(tmp_path, "test")


def test_slice_position_labels_are_bucketed(phantom_dir: Path) -> None:
    items = datalist(phantom_dir, "train", num_classes=3, max_slice=5)
    labels = {slice_index(i["image"]): i["label"] for i in items}
    assert labels == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datalist(tmp_path / "missing", "train")
    with pytest.raises(ValueError, match="holds no known layout"):
        datalist(tmp_path, "train")
    (tmp_path / "keras_slices_train").mkdir()
    with pytest.raises(ValueError, match="split 'train'.*holds no images"):
        datalist(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="keras_slices_test"):
        datalist(tmp_path, "test")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        datalist(tmp_path / "bad.json", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        datalist(tmp_path, "training")


def test_demo_data_generated_only_for_the_demo_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bundle.data.phantom

    calls, real_writer = [], bundle.data.phantom.write_hipmri_phantoms

    def fake_writer(root, **kwargs):
        calls.append(Path(root))
        real_writer(root, train_cases=1, val_cases=1, test_cases=1, slices_per_case=2)

    monkeypatch.setattr(bundle.data.phantom, "write_hipmri_phantoms", fake_writer)
    demo = tmp_path / "demo"
    assert len(datalist(demo, "train", demo_dir=demo)) == 2
    assert calls == [demo]
    with pytest.raises(FileNotFoundError):
        datalist(tmp_path / "other", "train", demo_dir=demo)
    assert len(calls) == 1
