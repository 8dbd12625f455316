"""Tests for the synthetic HipMRI pelvis phantoms (bundle/phantom.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import bundle.data.phantom as phantom
from bundle.data.phantom import LABELS, case_layout, phantom_slice, write_hipmri_phantoms

IMAGE_RE = re.compile(r"case_(\d{3})_week_(\d+)_slice_(\d+)\.nii\.gz")
SPLITS = ("train", "validate", "test")


def _volume(case_id: int, n: int = 16, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    width, _ = case_layout(case_id, seed)
    pairs = [phantom_slice(case_id, z, n, width, seed) for z in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.mark.parametrize("width", [128, 144])
def test_shapes_dtypes_and_labels(width: int) -> None:
    for z in (0, 7, 15):
        image, mask = phantom_slice(4, z, 16, width)
        assert image.shape == (256, width) and image.dtype == np.float32
        assert mask.shape == (256, width) and mask.dtype == np.uint8
        assert np.isfinite(image).all() and image.min() >= 0
        assert set(np.unique(mask)) <= set(LABELS.values())
        assert {0, 1, 2, 4} <= set(np.unique(mask))  # background, body, bone, rectum everywhere


def test_intensities_look_like_raw_mr() -> None:
    for case_id in (1, 2, 3):
        images, masks = _volume(case_id, n=8)
        for image, mask in zip(images, masks):
            body, bg = np.median(image[mask > 0]), np.median(image[mask == 0])
            assert 150 < body < 5000, body
            assert bg < 0.15 * body, (bg, body)
            assert bg > 1  # Rician noise floor, not exact zeros
            assert image.max() < 20000


def test_anatomy_follows_slice_position() -> None:
    for case_id in range(1, 7):
        images, masks = _volume(case_id)
        present = [set(np.unique(m)) for m in masks]
        # Inferior slices: prostate, no bladder; superior slices: bladder, no prostate.
        assert 3 not in present[0] and 3 in present[15]
        assert any(5 in p for p in present[:6]) and 5 not in present[15]
        assert all({1, 2, 4} <= p for p in present)
        # Bladder grows towards the dome.
        areas = [int((m == 3).sum()) for m in masks]
        assert areas[15] >= max(areas[:8])
        # Orientation: axis 1 runs anterior -> posterior, axis 0 is left-right.
        top = masks[15]
        ys = np.nonzero(top)[1]
        assert np.nonzero(top == 3)[1].mean() < np.nonzero(top == 4)[1].mean()
        assert ys.min() < np.nonzero(top == 3)[1].mean()
        bone_x = np.nonzero(masks[8] == 2)[0]
        assert (bone_x < 88).any() and (bone_x > 168).any()  # bones on both sides
        # Anatomy changes smoothly: neighbouring body outlines overlap strongly.
        for a, b in zip(masks[:-1], masks[1:]):
            inter = np.logical_and(a > 0, b > 0).sum()
            assert 2 * inter / ((a > 0).sum() + (b > 0).sum()) > 0.95


def test_prostate_sits_between_bladder_and_rectum() -> None:
    found = 0
    for case_id in range(1, 9):
        _, masks = _volume(case_id)
        for mask in masks:
            if 5 in mask:
                found += 1
                py = np.nonzero(mask == 5)[1].mean()
                assert py < np.nonzero(mask == 4)[1].mean()
                px = np.nonzero(mask == 5)[0].mean()
                assert abs(px - 128) < 20
    assert found > 8


def test_deterministic_and_case_specific() -> None:
    a_img, a_mask = phantom_slice(3, 5, 16, 128, seed=0)
    phantom_slice(8, 2, 16, 144, seed=0)  # other cases in between must not matter
    phantom._case_anatomy.cache_clear()
    phantom._case_fields.cache_clear()
    b_img, b_mask = phantom_slice(3, 5, 16, 128, seed=0)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.allclose(a_img, phantom_slice(4, 5, 16, 128, seed=0)[0])
    assert not np.allclose(a_img, phantom_slice(3, 5, 16, 128, seed=1)[0])
    assert not np.array_equal(a_mask, phantom_slice(4, 5, 16, 128, seed=0)[1])


def test_widths_are_mixed_across_cases() -> None:
    widths = [case_layout(c)[0] for c in range(1, 61)]
    assert set(widths) == {128, 144}
    assert 0.15 < widths.count(144) / len(widths) < 0.55
    assert case_layout(7) == case_layout(7)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        phantom_slice(1, 16, 16)
    with pytest.raises(ValueError):
        phantom_slice(1, -1, 16)


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_layout_and_files(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    counts = write_hipmri_phantoms(
        out, train_cases=2, val_cases=1, test_cases=1, slices_per_case=3, seed=0, trailing_axis_every=5
    )
    assert counts == {"train": 6, "validate": 3, "test": 3}
    ids = {}
    n_trailing = 0
    for split in SPLITS:
        images = sorted((out / f"keras_slices_{split}").iterdir())
        segs = sorted((out / f"keras_slices_seg_{split}").iterdir())
        assert len(images) == len(segs) == counts[split]
        assert all(IMAGE_RE.fullmatch(p.name) for p in images)
        assert {p.name for p in segs} == {"seg_" + p.name[len("case_") :] for p in images}
        ids[split] = {int(IMAGE_RE.fullmatch(p.name).group(1)) for p in images}
        for img_path in images:
            seg_path = out / f"keras_slices_seg_{split}" / ("seg_" + img_path.name[len("case_") :])
            img, seg = nib.load(img_path), nib.load(seg_path)
            data, labels = np.asarray(img.dataobj), np.asarray(seg.dataobj)
            assert data.dtype == np.float32 and labels.dtype == np.uint8
            assert labels.ndim == 2 and labels.shape[0] == 256 and labels.shape[1] in (128, 144)
            if data.ndim == 3:
                n_trailing += 1
                assert data.shape == (*labels.shape, 1)
            else:
                assert data.shape == labels.shape
            assert labels.max() <= 5
    assert n_trailing == 12 // 5
    assert not ids["train"] & ids["validate"] and not ids["train"] & ids["test"]
    assert not ids["validate"] & ids["test"]
    assert [len(ids[s]) for s in SPLITS] == [2, 1, 1]
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["seed"] == 0 and meta["counts"] == counts
    assert not [p for p in tmp_path.iterdir() if p.name != "ds"]  # no temp dirs left behind


def test_write_is_reproducible_idempotent_and_stable(tmp_path: Path) -> None:
    kw = dict(val_cases=1, test_cases=1, slices_per_case=2, seed=3)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_hipmri_phantoms(a, train_cases=2, **kw)
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    assert write_hipmri_phantoms(a, train_cases=2, **kw) == {"train": 4, "validate": 2, "test": 2}
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == mtimes  # second call is a no-op

    write_hipmri_phantoms(b, train_cases=2, **kw)
    assert _listing(a) == _listing(b)  # byte-identical across runs
    # Runs seconds apart must match too: no timestamp in the gzip header.
    assert all(v[4:8] == b"\0\0\0\0" for k, v in _listing(a).items() if k.endswith(".gz"))

    # More training cases leave every existing file unchanged.
    write_hipmri_phantoms(c, train_cases=3, **kw)
    la, lc = _listing(a), _listing(c)
    assert len(lc) > len(la)
    assert all(lc[k] == v for k, v in la.items() if k != "phantom.json")

    # Our own set with other parameters is regenerated in place.
    assert write_hipmri_phantoms(a, train_cases=1, **kw)["train"] == 2
    assert len(list((a / "keras_slices_train").iterdir())) == 2


def test_write_refuses_foreign_dir_and_is_atomic(tmp_path: Path, monkeypatch) -> None:
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        write_hipmri_phantoms(foreign, 1, 1, 1, 2)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]

    calls = {"n": 0}
    real = phantom.phantom_slice

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom, "phantom_slice", flaky)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        write_hipmri_phantoms(out, 2, 1, 1, 2)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real"]


def test_figure_shows_each_slice_anterior_up_in_rows_of_four(tmp_path: Path) -> None:
    from PIL import Image

    path = phantom.save_phantom_figure(tmp_path / "fig" / "preview.png", n=5)
    widths = [phantom.case_layout(case_id)[0] for case_id in range(1, 6)]
    with Image.open(path) as figure:
        # two rows (four panels, then one), each panel 256 px wide (patient right-left) and as tall as its slice
        assert figure.size == (4 * 256 + 3 * 2, max(widths[:4]) + 2 + widths[4])
        first = np.asarray(figure)[: widths[0], :256]
    image, _ = phantom.phantom_slice(1, 0, 16, widths[0])
    assert first.max() == 255 and np.corrcoef(first.ravel(), image.T.ravel())[0, 1] > 0.99


def test_make_phantoms_script_defaults_to_the_demo_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_phantoms", root / "scripts" / "make_phantoms.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert Path(script.parse_args([]).out_dir) == root / "data" / "phantom" == phantom.demo_data_dir(root)
    out = tmp_path / "set"
    args = [
        "--out_dir",
        str(out),
        "--train_cases",
        "1",
        "--val_cases",
        "1",
        "--test_cases",
        "0",
        "--slices_per_case",
        "2",
    ]
    assert script.main(args) == 0
    assert "train=2 validate=2 test=0" in capsys.readouterr().out
    assert json.loads((out / "phantom.json").read_text())["counts"] == {"train": 2, "validate": 2, "test": 0}
