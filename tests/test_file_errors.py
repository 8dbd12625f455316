"""Many files: the data check names every unreadable file at once; inference and evaluation skip a file that
cannot be read or whose result is not finite, process the rest and fail at the end; metrics count what they
average."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import IgniteMetricHandler, MeanSquaredError
from monai.metrics import PSNRMetric, SSIMMetric
from monai.transforms import Compose, Lambdad

from bundle.data.transforms import RequireFinited
from bundle.engine.file_errors import CheckedCacheDataset, FileErrors, UnreadableFilesError
from bundle.evaluation.writers import MetricsJSONWriter

from conftest import ROOT


@pytest.fixture(scope="module")
def preprocessing():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    return parser.get_parsed_content("preprocessing")


def _broken_copy(phantom_dir: Path, tmp_path: Path) -> tuple[list[dict], list[Path]]:
    """The phantom training split with three broken files: truncated, not an image, a volume."""
    folder = tmp_path / "train"
    shutil.copytree(phantom_dir / "keras_slices_train", folder)
    files = sorted(folder.iterdir())
    truncated, note, volume = files[1], files[5], files[9]
    truncated.write_bytes(truncated.read_bytes()[:200])
    note.write_text("not an image")
    nib.save(nib.Nifti1Image(np.ones((256, 128, 4), np.float32), np.eye(4)), volume)
    return [{"image": str(f)} for f in files], [truncated, note, volume]


@pytest.mark.parametrize("cache_rate", [1.0, 0.5])
def test_the_data_check_names_every_unreadable_file_at_once(
    phantom_dir: Path, tmp_path: Path, preprocessing, cache_rate: float
) -> None:
    items, broken = _broken_copy(phantom_dir, tmp_path)
    with pytest.raises(UnreadableFilesError) as error:
        CheckedCacheDataset(items, preprocessing, cache_rate=cache_rate, progress=False, split="train")
    message = str(error.value)
    assert message.startswith(f"3 of {len(items)} files of split 'train' cannot be used")
    assert set(error.value.failures) == {str(p) for p in broken}
    assert f"cannot read '{broken[0]}'" in message and "spatial shape (256, 128, 4)" in message


def test_a_checked_dataset_of_good_files_caches_like_monai(phantom_dir: Path, preprocessing) -> None:
    from monai.data import CacheDataset

    items = [{"image": str(p)} for p in sorted((phantom_dir / "keras_slices_validate").iterdir())]
    checked = CheckedCacheDataset(items, preprocessing, progress=False, split="validate")
    plain = CacheDataset(items, preprocessing, progress=False)
    assert len(checked) == len(plain) == 6
    assert all(torch.equal(checked[i]["image"], plain[i]["image"]) for i in range(6))


def test_unreadable_files_are_skipped_named_and_summarised(phantom_dir: Path, tmp_path: Path, preprocessing) -> None:
    items, broken = _broken_copy(phantom_dir, tmp_path)
    errors = FileErrors()
    readable = errors.readable(items, preprocessing)
    assert [i["image"] for i in readable] == [i["image"] for i in items if Path(i["image"]) not in broken]
    with pytest.raises(UnreadableFilesError) as error:
        errors.raise_if_any("inference")
    assert str(error.value).startswith(f"inference skipped 3 of {len(items)} files (the others were processed)")
    assert set(error.value.failures) == {str(p) for p in broken}
    FileErrors().raise_if_any("inference")  # nothing skipped: no error


class _NaNFor(torch.nn.Module):
    """Returns ``0.9 x``, except NaN for images whose maximum is 1 (the "bad" ones)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = x.amax(dim=(1, 2, 3), keepdim=True) >= 1.0
        return torch.where(bad, torch.full_like(x, float("nan")), 0.9 * x)


def _images(n: int, bad: set[int]) -> list[dict]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        array = rng.random((1, 32, 32)).astype(np.float32) * 0.5 + 0.2
        array[0, 0, 0] = 1.0 if i in bad else 0.0
        items.append(
            {
                "image": MetaTensor(torch.from_numpy(array), meta={"filename_or_obj": f"/in/case_{i}.nii.gz"}),
                "label": torch.from_numpy(array),
            }
        )
    return items


def test_inference_skips_an_input_whose_result_is_not_finite_and_processes_the_rest() -> None:
    errors, written = FileErrors(), []
    postprocessing = Compose(
        [RequireFinited("pred"), Lambdad("pred", lambda p: written.append(p.meta["filename_or_obj"]) or p)]
    )
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(Dataset(_images(4, {1})), batch_size=1),
        network=_NaNFor(),
        postprocessing=postprocessing,
        iteration_update=errors.evaluator_iteration,
    )
    evaluator.run()
    assert written == ["/in/case_0.nii.gz", "/in/case_2.nii.gz", "/in/case_3.nii.gz"]
    with pytest.raises(UnreadableFilesError) as error:
        errors.raise_if_any("inference")
    assert list(error.value.failures) == ["/in/case_1.nii.gz"]
    assert "the pred of '/in/case_1.nii.gz' has 1024 of 1024 values NaN or Inf" in str(error.value)


def _evaluate(tmp_path: Path, bad: set[int], errors: FileErrors | None) -> dict:
    metrics = {
        "ssim": IgniteMetricHandler(
            SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7),
            output_transform=lambda o: ([i["pred"] for i in o], [i["label"] for i in o]),
        ),
        "psnr": IgniteMetricHandler(
            PSNRMetric(max_val=1.0), output_transform=lambda o: ([i["pred"] for i in o], [i["label"] for i in o])
        ),
        "mse": MeanSquaredError(output_transform=lambda o: ([i["pred"] for i in o], [i["label"] for i in o])),
    }
    writer = MetricsJSONWriter(str(tmp_path / "metrics.json"), {k: k for k in metrics}, file_errors=errors)
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(Dataset(_images(6, bad)), batch_size=4),
        network=_NaNFor(),
        key_val_metric={"ssim": metrics.pop("ssim")},
        additional_metrics=metrics,
        val_handlers=[writer],
    )
    evaluator.run()
    return json.loads((tmp_path / "metrics.json").read_text()), evaluator.state.metric_details


def test_evaluation_metrics_count_exactly_the_images_they_average(tmp_path: Path) -> None:
    errors = FileErrors()
    summary, details = _evaluate(tmp_path, {2, 5}, errors)
    assert summary["n_images"] == 4
    assert sorted(summary["skipped"]) == ["/in/case_2.nii.gz", "/in/case_5.nii.gz"]
    assert all("left out of every mean" in reason for reason in summary["skipped"].values())
    kept = [0, 1, 3, 4]
    for name in ("ssim", "psnr", "mse"):
        assert summary[name] == pytest.approx(float(details[name][kept].mean()), rel=1e-6)
    assert list(errors.skipped) == ["/in/case_2.nii.gz", "/in/case_5.nii.gz"]
    clean, _ = _evaluate(tmp_path, set(), None)
    assert clean["n_images"] == 6 and "skipped" not in clean
