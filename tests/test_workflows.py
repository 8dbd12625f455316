"""End to end through MONAI's runner: training (with resume), evaluating and inference on tiny phantoms."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_NETWORK, run_bundle

pytestmark = pytest.mark.slow


def _logs(result) -> str:
    return result.stdout + result.stderr


def test_training_writes_weights_checkpoints_and_logs(tiny_bundle: dict) -> None:
    out = tiny_bundle["out"]
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "model_final.pt").is_file()
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert state["top_quantizer.embedding.weight"].shape == state["bottom_quantizer.embedding.weight"].shape == (64, 16)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    checkpoints = sorted(p.name for p in (out / "outputs" / "checkpoints").glob("*.pt"))
    assert checkpoints == ["checkpoint_epoch=3.pt"], "n_saved=1 keeps only the newest resumable checkpoint"
    log = _logs(tiny_bundle["first"])
    assert re.search(r"Epoch\[2\] Metrics -- .*val_ssim", log)
    ssim = [float(v) for v in re.findall(r"Metrics -- .*val_ssim: (-?[0-9.]+)", log)]
    assert len(ssim) == 2 and all(-1.0 <= v <= 1.0 for v in ssim)
    usage = [float(v) for v in re.findall(r"codebook_(?:top|bottom)_usage=([0-9.]+)", log)]
    assert len(usage) == 2 * 2 and all(0.0 < v <= 1.0 for v in usage)  # two epochs, two codebooks


def test_rerun_resumes_from_the_last_checkpoint(tiny_bundle: dict) -> None:
    log = _logs(tiny_bundle["second"])
    assert "Epoch[3] Metrics" in log and "Epoch[1] Metrics" not in log and "Epoch[2] Metrics" not in log
    checkpoint = torch.load(tiny_bundle["out"] / "outputs" / "checkpoints" / "checkpoint_epoch=3.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 3 * (18 // 4) and checkpoint["trainer"]["epoch_length"] == 18 // 4
    assert "state" in checkpoint["optimizer"] and checkpoint["optimizer"]["state"]


def test_tensorboard_has_losses_metrics_codebook_and_images(tiny_bundle: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for events in (tiny_bundle["out"] / "outputs" / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
        images |= set(accumulator.Tags()["images"])
    assert {
        "train_loss",
        "val_ssim",
        "val_psnr",
        "val_mse",
        "codebook_top_usage",
        "codebook_bottom_perplexity",
    } <= scalars
    assert any(tag.startswith("input_0") for tag in images) and any(tag.startswith("output") for tag in images)


def test_evaluating_writes_metrics_csv_and_grid(tiny_bundle: dict, phantom_dir: Path) -> None:
    out = tiny_bundle["out"]
    run_bundle(
        "evaluating",
        "configs/inference.json,configs/evaluate.json",
        "--dataset_dir",
        phantom_dir,
        "--output_dir",
        out / "eval",
        "--ckpt_dir",
        out / "models",
        *TINY_NETWORK,
    )
    summary = json.loads((out / "eval" / "reconstruction_metrics.json").read_text())
    assert summary["n_images"] == 6
    assert -1.0 <= summary["ssim"] <= 1.0 and -1.0 <= summary["ms_ssim"] <= 1.0
    assert 0.0 < summary["mse"] < 1.0 and summary["psnr"] == pytest.approx(-10 * np.log10(summary["mse"]), abs=3.0)
    rows = (out / "eval" / "reconstruction" / "ssim_raw.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6 and "case_" in rows[1]
    grid = Image.open(out / "eval" / "reconstruction_grid.png")
    assert grid.size[0] > 3 * 256 and grid.size[1] > 6 * 128 * 0.9


def test_inference_keeps_each_input_geometry(tiny_bundle: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    affine = np.array([[0.0, 1.6, 0, -100.0], [-1.6, 0, 0, 120.0], [0, 0, 2.5, 33.0], [0, 0, 0, 1]])
    shapes = {
        "case_900_week_0_slice_1.nii.gz": (256, 128),
        "case_900_week_0_slice_2.nii.gz": (256, 144),
        "case_900_week_0_slice_3.nii": (256, 128),
    }
    for name, shape in shapes.items():
        nib.save(nib.Nifti1Image((rng.random(shape) * 1000).astype(np.float32), affine), inputs / name)
    out = tiny_bundle["out"]
    run_bundle(
        "inference",
        "configs/inference.json",
        "--input_dir",
        inputs,
        "--output_dir",
        tmp_path / "out",
        "--ckpt_dir",
        out / "models",
        *TINY_NETWORK,
    )
    for name, shape in shapes.items():
        stem = name.split(".")[0]
        result = nib.load(tmp_path / "out" / f"{stem}_recon.nii.gz")
        assert result.shape == shape, name
        np.testing.assert_allclose(result.affine, affine, atol=1e-4)
        data = result.get_fdata()
        assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0 and data.std() > 0


def test_a_resumed_run_keeps_the_best_model(tmp_path: Path) -> None:
    from ignite.engine import Engine, Events

    from bundle.engine.checkpoint import AtomicCheckpointSaver

    network = torch.nn.Linear(2, 2)

    def run_once(score: float, resume_best: bool) -> bytes:
        engine = Engine(lambda e, b: None)
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_ssim=score))
        AtomicCheckpointSaver(
            save_dir=str(tmp_path),
            save_dict={"model": network},
            save_key_metric=True,
            key_metric_name="val_ssim",
            key_metric_n_saved=1,
            key_metric_filename="model.pt",
            resume_best=resume_best,
        ).attach(engine)
        engine.run([0], max_epochs=1)
        return (tmp_path / "model.pt").read_bytes()

    best = run_once(0.5, resume_best=False)
    with torch.no_grad():
        network.weight.fill_(7.0)
    assert run_once(0.3, resume_best=True) == best, "a resumed run replaced the best model with a worse one"
    assert run_once(0.6, resume_best=True) != best, "a better score must still replace it"
    assert run_once(0.1, resume_best=False) != best, "a fresh start (resume off) begins a new best"
