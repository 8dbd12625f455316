"""Both stages end to end through MONAI's runner: training, seeded sampling and generation metrics."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import TINY_NETWORK, TINY_PRIOR, run_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, phantom_dir: Path) -> dict:
    out = tmp_path_factory.mktemp("pipeline")
    # a class-conditioned prior whose top level has a position map: the options the demo leaves off
    sizes = [*TINY_NETWORK, *TINY_PRIOR, "--num_classes", 3, "--prior_top_position_channels", 4]
    common = ["--output_dir", out / "outputs", "--ckpt_dir", out / "models", *sizes]
    train = run_bundle(
        "training",
        "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json",
        "--dataset_dir",
        phantom_dir,
        *common,
        "--batch_size",
        4,
        "--max_epochs",
        2,
        "--prior_max_epochs",
        3,
        "--prior_batch_size",
        4,
        "--prior_sample_interval",
        2,
        "--prior_sample_count",
        4,
    )
    return {"out": out, "common": common, "train": train, "dataset": phantom_dir}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_training_runs_both_stages(pipeline: dict) -> None:
    out, log = pipeline["out"], pipeline["train"].stdout + pipeline["train"].stderr
    assert (out / "models" / "model.pt").is_file()
    prior = torch.load(out / "models" / "prior" / "prior.pt", weights_only=True)
    for level in ("top", "bottom"):  # one embedding row per VQ-VAE code of each level
        assert prior[f"{level}.embedding.weight"].shape[0] == 64, level
    assert prior["bottom.cond_stack.embedding.weight"].shape[0] == 64  # the bottom prior embeds the top codes
    assert not list(
        (out / "models").glob("prior*.pt")
    ), "MONAI Label lists models/*.pt: the prior lives in models/prior/"
    codes = torch.load(out / "outputs" / "codes" / "train.pt", weights_only=True)
    assert codes["bottom"].shape == (18, 64, 32) and int(codes["bottom"].max()) < 64
    assert codes["top"].shape[0] == 18 and 64 % codes["top"].shape[1] == 0 and int(codes["top"].max()) < 64
    assert codes["labels"].tolist() and set(codes["labels"].tolist()) <= {0, 1, 2}
    assert prior["top.position"].shape == (1, 4, *codes["top"].shape[1:])
    for level in ("top", "bottom"):
        nll = [float(v) for v in re.findall(rf"Metrics -- .*?val_nll_bits_{level}: ([0-9.]+)", log)]
        assert len(nll) == 3 and all(0.0 < v < np.log2(64) + 1 for v in nll), level
    assert (out / "outputs" / "prior_samples.png").is_file()
    assert (out / "outputs" / "checkpoints" / "prior").is_dir()


def test_sampling_is_reproducible_for_a_seed(pipeline: dict) -> None:
    out = pipeline["out"]
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_bundle(
            "sampling",
            "configs/inference.json,configs/sample.json",
            *pipeline["common"],
            "--output_dir",
            out / name,
            "--num_samples",
            3,
            "--seed",
            seed,
            "--label",
            1,
        )
        runs[name] = _digest(out / name / "samples")
    assert sorted(runs["a"]) == ["sample_000.nii.gz", "sample_001.nii.gz", "sample_002.nii.gz", "samples.png"]
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    image = nib.load(out / "a" / "samples" / "sample_000.nii.gz")
    data = image.get_fdata()
    assert image.shape == (256, 128) and image.get_data_dtype() == np.float32
    assert 0.0 <= data.min() and data.max() <= 1.0 and np.allclose(image.affine, np.eye(4))


def test_generation_metrics(pipeline: dict) -> None:
    out = pipeline["out"]
    run_bundle(
        "evaluating",
        "configs/inference.json,configs/evaluate_generation.json",
        *pipeline["common"],
        "--dataset_dir",
        pipeline["dataset"],
        "--num_samples",
        6,
    )
    report = json.loads((out / "outputs" / "generation_metrics.json").read_text())
    assert report["num_samples"] == 6
    for level in ("top", "bottom"):
        assert 0.0 < report[f"nll_bits_{level}"] < np.log2(64) + 1, level
    for key in ("fid", "fid_real_baseline"):
        assert np.isfinite(report[key]) and report[key] >= 0.0
    assert np.isfinite(report["kid"]) and np.isfinite(report["kid_real_baseline"])
    for key in ("diversity_ms_ssim", "diversity_ms_ssim_real", "memorisation_ssim_mean", "memorisation_ssim_max"):
        assert -1.0 <= report[key] <= 1.0, key
    assert report["memorisation_ssim_max"] >= report["memorisation_ssim_mean"]
    for level in ("top", "bottom"):
        assert 0.0 <= report[f"code_histogram_{level}"]["js_divergence"] <= 1.0, level
    assert (out / "outputs" / "samples_vs_real.png").is_file()
