"""The preprocessing declared in configs/inference.json and the EnsureSlice2D transform."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from PIL import Image

from bundle.data.transforms import EnsureSlice2D

from conftest import ROOT


@pytest.fixture(scope="module")
def preprocessing():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    return parser.get_parsed_content("preprocessing")


def _save(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return str(path)


@pytest.mark.parametrize("shape", [(256, 128), (256, 144), (256, 128, 1), (512, 512), (64, 64)])
def test_any_slice_becomes_unit_range_256x128(tmp_path: Path, preprocessing, shape) -> None:
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "case_001_week_0_slice_3.nii.gz", (rng.random(shape) * 3000).astype(np.float32))
    image = preprocessing({"image": path})["image"]
    assert tuple(image.shape) == (1, 256, 128) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.max()) > 0.9


def test_phantom_files_load(phantom_dir: Path, preprocessing) -> None:
    for path in sorted((phantom_dir / "keras_slices_train").iterdir())[:6]:
        image = preprocessing({"image": str(path)})["image"]
        assert tuple(image.shape) == (1, 256, 128) and torch.isfinite(image).all()


def test_constant_and_integer_images_give_no_nan(tmp_path: Path, preprocessing) -> None:
    for name, array in {
        "const": np.full((256, 128), 7.0, np.float32),
        "int": np.arange(256 * 128, dtype=np.int16).reshape(256, 128),
    }.items():
        image = preprocessing({"image": _save(tmp_path / f"{name}.nii.gz", array)})["image"]
        assert torch.isfinite(image).all() and image.dtype == torch.float32


def test_nan_and_inf_voxels_are_zeroed_and_logged(tmp_path: Path, preprocessing, caplog) -> None:
    array = np.ones((256, 128), np.float32)
    array[0, :3] = np.nan
    array[1, 0] = np.inf
    with caplog.at_level(logging.WARNING):
        image = preprocessing({"image": _save(tmp_path / "nan.nii.gz", array)})["image"]
    assert torch.isfinite(image).all()
    assert "replaced 4 NaN/Inf voxels" in caplog.text and "nan.nii.gz" in caplog.text
    with pytest.raises(ValueError, match="4 NaN/Inf voxels"):
        EnsureSlice2D(nonfinite="error")(MetaTensor(torch.from_numpy(array)[None]))


def test_volume_is_refused_with_file_name(tmp_path: Path, preprocessing) -> None:
    path = _save(tmp_path / "volume.nii.gz", np.ones((256, 128, 20), np.float32))
    with pytest.raises(RuntimeError) as info:
        preprocessing({"image": path})
    # MONAI wraps transform errors; ours is the cause, and it names the file and the shape.
    assert isinstance(info.value.__cause__, ValueError)
    assert "volume.nii.gz" in str(info.value.__cause__) and "(256, 128, 20)" in str(info.value.__cause__)


def test_rgba_png_becomes_grey(tmp_path: Path) -> None:
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    from monai.transforms import LoadImage

    image = EnsureSlice2D()(LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "a.png")))
    assert image.shape[0] == 1 and sorted(image.shape[1:]) == [30, 40]
    assert torch.allclose(image, torch.full_like(image, 200 * 0.299), atol=1e-3)


def test_bad_channel_count_is_refused() -> None:
    with pytest.raises(ValueError, match="2 channels"):
        EnsureSlice2D()(torch.zeros(2, 8, 8))


def _train_dataset(phantom_dir: Path, tmp_path: Path, **overrides):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "train_vqvae.json")])
    parser.update({"bundle_root": str(ROOT), "dataset_dir": str(phantom_dir), "output_dir": str(tmp_path), **overrides})
    return parser.get_parsed_content("train::dataset")


def test_data_on_device_caches_on_the_device_and_augments_there(phantom_dir: Path, tmp_path: Path) -> None:
    from monai.transforms import RandAffined, ToDeviced

    plain = _train_dataset(phantom_dir, tmp_path)
    on_device = _train_dataset(phantom_dir, tmp_path, data_on_device=True, device="$torch.device('cpu')")
    names = [type(t).__name__ for t in on_device.transform.transforms]
    assert not any(isinstance(t, ToDeviced) for t in plain.transform.transforms)
    # right before the first random transform, so CacheDataset keeps the moved copy and augments it in place
    position = names.index("ToDeviced")
    assert isinstance(on_device.transform.transforms[position + 1], RandAffined)
    assert on_device.cache_num == len(on_device) == len(plain)
    cached = on_device._cache[0]["image"]
    assert cached.device == torch.device("cpu") and cached.shape == (1, 256, 128)
    item = on_device[0]["image"]
    assert (
        item.shape == (1, 256, 128)
        and torch.isfinite(item).all()
        and 0.0 <= float(item.min()) <= float(item.max()) <= 1.0
    )
    # the CPU path is unchanged: the same cached slice either way
    assert torch.equal(torch.as_tensor(cached), torch.as_tensor(plain._cache[0]["image"]))


def test_data_on_a_gpu_refuses_worker_processes() -> None:
    from bundle.data.transforms import to_device_when_cached

    with pytest.raises(ValueError, match="set num_workers to 0"):
        to_device_when_cached("image", "cuda:0", True, 2)
    assert to_device_when_cached("image", "cuda:0", False, 2) == []


def _load(path: str) -> torch.Tensor:
    from monai.transforms import LoadImage

    return LoadImage(image_only=True, ensure_channel_first=True)(path)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((256, 128, 1, 3), "4D array of shape (256, 128, 1, 3)"),
        ((1, 1, 256, 128), "4D array of shape (1, 1, 256, 128)"),
        ((256, 128, 1, 1, 2), "5D array of shape (256, 128, 1, 1, 2)"),
    ],
)
def test_nifti_with_more_than_three_axes_is_refused_with_its_shape(tmp_path: Path, shape, expected) -> None:
    path = _save(tmp_path / "frames.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(ValueError) as error:
        EnsureSlice2D()(_load(path))
    assert path in str(error.value) and expected in str(error.value)


def test_a_slice_with_many_singleton_axes_is_accepted(tmp_path: Path) -> None:
    array = np.arange(256 * 128, dtype=np.float32).reshape(256, 128)
    image = EnsureSlice2D()(_load(_save(tmp_path / "s.nii.gz", array.reshape(256, 128, 1, 1, 1, 1))))
    assert tuple(image.shape) == (1, 256, 128) and torch.equal(image[0], torch.from_numpy(array))


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_nifti_is_refused(tmp_path: Path, dtype) -> None:
    path = _save(tmp_path / "c.nii.gz", (np.ones((16, 8)) + 1j).astype(dtype))
    with pytest.raises(ValueError, match=r"c\.nii\.gz' holds complex pixels"):
        EnsureSlice2D()(_load(path))


@pytest.mark.parametrize(
    "tensor, kind",
    [(torch.ones(1, 8, 8, dtype=torch.complex64), "complex"), (torch.ones(1, 8, 8, dtype=torch.bool), "boolean")],
)
def test_complex_and_boolean_tensors_are_refused(tensor: torch.Tensor, kind: str) -> None:
    with pytest.raises(ValueError, match=f"holds {kind}"):
        EnsureSlice2D()(tensor)


def test_one_bit_and_palette_pngs_are_refused_grey_alpha_is_grey(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 30), bool)).save(tmp_path / "mask.png")
    Image.fromarray(np.full((40, 30), 9, np.uint8)).convert("P").save(tmp_path / "palette.png")
    with pytest.raises(ValueError, match="mask.png' holds 1-bit"):
        EnsureSlice2D()(_load(str(tmp_path / "mask.png")))
    with pytest.raises(ValueError, match="palette.png' holds palette"):
        EnsureSlice2D()(_load(str(tmp_path / "palette.png")))
    grey_alpha = np.stack([np.full((40, 30), 70, np.uint8), np.full((40, 30), 255, np.uint8)], axis=-1)
    Image.fromarray(grey_alpha, "LA").save(tmp_path / "la.png")
    image = EnsureSlice2D()(_load(str(tmp_path / "la.png")))
    assert image.shape[0] == 1 and torch.all(image == 70)


def test_values_beyond_float32_are_refused_not_zeroed(tmp_path: Path) -> None:
    path = _save(tmp_path / "f64.nii.gz", np.full((16, 8), 1e300))
    with pytest.raises(ValueError, match=r"f64\.nii\.gz' has no finite voxel"):
        EnsureSlice2D()(_load(path))


def test_intensities_spanning_more_than_float32_are_refused_before_scaling_gives_nan(tmp_path: Path, preprocessing):
    array = ((np.random.default_rng(0).random((256, 128)) - 0.5) * 6.6e38).astype(np.float32)
    assert np.isfinite(array).all()
    with pytest.raises(RuntimeError) as info:
        preprocessing({"image": _save(tmp_path / "huge.nii.gz", array)})
    assert isinstance(info.value.__cause__, ValueError)
    assert "huge.nii.gz' has intensities from -3.3e+38 to 3.3e+38" in str(info.value.__cause__)


def test_a_non_finite_result_is_an_error_naming_the_input() -> None:
    from bundle.data.transforms import RequireFinited

    source = MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": "/data/case_7.nii.gz"})
    good = {"image": source, "pred": torch.ones(1, 4, 4)}
    assert RequireFinited("pred")(good)["pred"] is good["pred"]
    pred = torch.ones(1, 4, 4)
    pred[0, 0, :3] = float("nan")
    pred[0, 1, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"the pred of '/data/case_7.nii.gz' has 4 of 16 values NaN or Inf"):
        RequireFinited("pred")({"image": source, "pred": pred})
