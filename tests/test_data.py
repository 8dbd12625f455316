"""Data discovery: layouts, masks ignored, labels, no data created as a side effect, and clear errors."""

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
    (tmp_path / "sub").mkdir()
    elsewhere = tmp_path.parent / "elsewhere.nii.gz"
    content = {
        "training": [{"image": "sub/a.nii.gz", "label": 2}, {"image": str(elsewhere), "label": 0}],
        "validation": [{"image": "b.nii.gz"}],
        "test": ["c.nii.gz"],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(content))
    assert detect_layout(tmp_path) == "datalist"
    items = datalist(tmp_path, "train", num_classes=4)
    assert items == [{"image": str(tmp_path / "sub" / "a.nii.gz"), "label": 2}, {"image": str(elsewhere), "label": 0}]
    assert datalist(tmp_path / "datalist.json", "validate") == [{"image": str(tmp_path / "b.nii.gz")}]
    assert datalist(tmp_path, "test") == [{"image": str(tmp_path / "c.nii.gz")}]  # bare paths are allowed in "test"


def test_datalist_json_errors(tmp_path: Path) -> None:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"label": 1}], "validation": ["b.nii.gz"], "test": []}))
    with pytest.raises(ValueError, match=r"training\[0\] has no 'image'"):
        datalist(path, "train")
    with pytest.raises(ValueError, match="'validation'.*must be a dict"):
        datalist(path, "validate")
    with pytest.raises(ValueError, match="holds no images"):
        datalist(path, "test")
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(ValueError, match="validation"):
        datalist(path, "validate")


def test_slice_position_labels_are_bucketed(phantom_dir: Path) -> None:
    items = datalist(phantom_dir, "train", num_classes=3, max_slice=5)
    labels = {slice_index(i["image"]): i["label"] for i in items}
    assert labels == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    assert [i["label"] for i in datalist(phantom_dir, "train", num_classes=3)] == [i["label"] for i in items]


def _touch_scan(folder: Path, case: int, num_slices: int) -> None:
    folder.mkdir(exist_ok=True)
    for z in range(num_slices):
        (folder / f"case_{case:03d}_week_0_slice_{z}.nii.gz").touch()


def test_slice_labels_mean_the_same_in_every_split(tmp_path: Path) -> None:
    # Train also holds a longer scan; the test split does not. A label must still mean the same slice range.
    _touch_scan(tmp_path / "keras_slices_train", 1, 6)
    _touch_scan(tmp_path / "keras_slices_train", 2, 12)
    _touch_scan(tmp_path / "keras_slices_test", 801, 6)

    def labels(split: str, case: int, **kwargs) -> list[int]:
        items = datalist(tmp_path, split, num_classes=3, **kwargs)
        by_slice = {slice_index(i["image"]): i["label"] for i in items if f"case_{case:03d}_" in i["image"]}
        return [by_slice[z] for z in sorted(by_slice)]

    # Relative to each scan's own slice count: thirds of the scan.
    assert labels("train", 1) == labels("test", 801) == [0, 0, 1, 1, 2, 2]
    assert labels("train", 2) == [0] * 4 + [1] * 4 + [2] * 4
    # A fixed largest slice index, given once, applies to every split alike.
    assert labels("train", 1, max_slice=11) == labels("test", 801, max_slice=11) == [0, 0, 0, 0, 1, 1]


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


def test_missing_data_is_not_generated_and_the_error_says_how(tmp_path: Path) -> None:
    missing = tmp_path / "data" / "phantom"
    with pytest.raises(FileNotFoundError) as error:
        datalist(missing, "train")
    message = str(error.value)
    assert f"dataset_dir '{missing}' does not exist" in message
    assert f"python scripts/make_phantoms.py --out_dir '{missing}'" in message
    assert not missing.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="holds no known layout.*scripts/make_phantoms.py"):
        datalist(tmp_path, "train")


def test_demo_phantoms_are_written_where_the_configs_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bundle.data.phantom as phantom

    calls = []
    monkeypatch.setattr(phantom, "write_hipmri_phantoms", lambda out_dir, **kwargs: calls.append((out_dir, kwargs)))
    assert phantom.write_demo_phantoms(tmp_path) == tmp_path / "data" / "phantom"
    assert calls == [(tmp_path / "data" / "phantom", {})]  # the writer's defaults: the documented demo set


def test_a_split_smaller_than_one_batch_is_refused_before_training() -> None:
    from bundle.data.discovery import require_batches

    with pytest.raises(ValueError) as error:
        require_batches("train", 12, 16)
    message = str(error.value)
    assert "split 'train'" in message and "12 images" in message and "batch_size 16" in message
    assert require_batches("train", 18, 4) == 4
    assert require_batches("validate", 12, 16, drop_last=False) == 1  # a validation loader keeps the last batch
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        require_batches("train", 12, 0)


def test_inputs_that_would_share_an_output_file_are_refused(tmp_path: Path) -> None:
    from bundle.data.discovery import require_distinct_outputs

    items = [{"image": str(tmp_path / name)} for name in ("a.nii", "a.nii.gz", "x/b.nii.gz", "y/b.nii.gz", "c.nii")]
    with pytest.raises(ValueError) as error:
        require_distinct_outputs(items, tmp_path / "out")
    message = str(error.value)
    assert "2 output file(s)" in message
    assert f"'{tmp_path / 'a.nii'}' and '{tmp_path / 'a.nii.gz'}' -> '{tmp_path / 'out' / 'a_recon.nii.gz'}'" in message
    assert str(tmp_path / "x" / "b.nii.gz") in message and "c.nii" not in message
    distinct = [items[0], items[2], items[4]]
    assert require_distinct_outputs(distinct, tmp_path / "out") is distinct
