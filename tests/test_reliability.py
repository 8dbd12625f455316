"""Reliability through the real runner: bad input, bad overrides, mismatched weights, NaN losses, determinism."""

from __future__ import annotations

import ast
import os
import shutil
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_NETWORK, run_bundle

pytestmark = pytest.mark.slow

FAST = ["--batch_size", 4, *TINY_NETWORK]


def run_failing(run_id: str, config: str, *args) -> str:
    """Runs a workflow in this process (as ``python -m monai.bundle run`` does) that must fail; returns the
    whole exception chain as the user would see it. In-process saves an interpreter start per case."""
    from monai.bundle import run

    overrides = {str(k).lstrip("-"): (str(v) if isinstance(v, Path) else v) for k, v in zip(args[::2], args[1::2])}
    for key, value in overrides.items():
        if isinstance(value, str) and not value.startswith("$"):
            try:  # what fire does with "64" or "[16, 32]" on a command line
                overrides[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        run(run_id=run_id, config_file=config.split(","), **overrides)
    except BaseException as error:  # noqa: BLE001 - the point is to see what reaches the user
        return "".join(traceback.format_exception(error))
    finally:
        os.chdir(cwd)
    raise AssertionError(f"{run_id} with {overrides} did not fail")


def _copy_split(phantom_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for split in ("train", "validate", "test"):
        shutil.copytree(phantom_dir / f"keras_slices_{split}", root / f"keras_slices_{split}")
    return root


def test_missing_dataset_dir_is_named(tmp_path: Path) -> None:
    log = run_failing("training", "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json", "--dataset_dir", tmp_path / "nowhere", "--output_dir", tmp_path)
    assert f"dataset_dir '{tmp_path / 'nowhere'}' does not exist" in log


def test_empty_split_is_named(tmp_path: Path, phantom_dir: Path) -> None:
    root = _copy_split(phantom_dir, tmp_path)
    for f in (root / "keras_slices_validate").iterdir():
        f.unlink()
    log = run_failing("training", "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json", "--dataset_dir", root, "--output_dir", tmp_path / "o", *FAST)
    assert "split 'validate'" in log and "holds no images" in log


@pytest.mark.parametrize("problem", ["truncated", "not_an_image", "volume"])
def test_broken_files_are_named(tmp_path: Path, phantom_dir: Path, problem: str) -> None:
    root = _copy_split(phantom_dir, tmp_path)
    victim = sorted((root / "keras_slices_train").iterdir())[2]
    if problem == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
        expected = [f"cannot read '{victim}'", "EOFError"]
    elif problem == "not_an_image":
        victim.write_text("this is a note, not an image")
        expected = [f"cannot read '{victim}'"]
    else:
        nib.save(nib.Nifti1Image(np.ones((256, 128, 12), np.float32), np.eye(4)), victim)
        expected = [str(victim), "spatial shape (256, 128, 12)", "2D slices"]
    log = run_failing("training", "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json", "--dataset_dir", root, "--output_dir", tmp_path / "o", *FAST)
    for text in expected:
        assert text in log, text


def test_wrong_override_type_is_named(tmp_path: Path, phantom_dir: Path) -> None:
    log = run_failing("training", "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json", "--dataset_dir", phantom_dir, "--output_dir", tmp_path,
                      "--max_epochs", "abc")
    assert "max_epochs must be int, got 'abc'" in log


def test_weights_from_another_configuration_are_refused(tmp_path: Path, phantom_dir: Path) -> None:
    out = tmp_path / "o"
    run_bundle("training", "configs/inference.json,configs/train_vqvae.json", "--dataset_dir", phantom_dir, "--output_dir", out,
               "--ckpt_dir", out / "models", "--max_epochs", 1, *FAST)
    other = [a if a != "64" else "32" for a in map(str, TINY_NETWORK)]  # another codebook size
    log = run_failing("evaluating", "configs/inference.json,configs/evaluate.json", "--dataset_dir", phantom_dir, "--output_dir", out,
                      "--ckpt_dir", out / "models", *other)
    assert "size mismatch for top_quantizer.embedding.weight" in log
    # Resuming training with another width is refused too, never a silent partial load.
    wider = [a if a != "[16, 32]" else "[16, 48]" for a in map(str, TINY_NETWORK)]
    log = run_failing("training", "configs/inference.json,configs/train_vqvae.json", "--dataset_dir", phantom_dir, "--output_dir", out,
                      "--ckpt_dir", out / "models", "--max_epochs", 2, "--batch_size", 4, *wider)
    assert "size mismatch" in log


def test_nan_loss_stops_before_the_step_and_keeps_checkpoints_finite(tmp_path: Path, phantom_dir: Path) -> None:
    # A good first epoch (4 iterations), then NaN from the first iteration of epoch 2.
    nan_later = ("$lambda p, t, calls=[0]: (calls.__setitem__(0, calls[0] + 1), torch.nn.functional.l1_loss(p, t)"
                 " * (float('nan') if calls[0] > 4 else 1.0))[1]")
    log = run_failing("training", "configs/inference.json,configs/train_vqvae.json", "--dataset_dir", phantom_dir, "--output_dir", tmp_path,
                      "--ckpt_dir", tmp_path / "models", "--max_epochs", 2, *FAST, "--recon_loss", nan_later)
    assert "Non-finite loss or gradient at epoch 2, iteration 5" in log and "FloatingPointError" in log
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["checkpoint_epoch=1.pt"]
    for path in (tmp_path / "checkpoints" / "checkpoint_epoch=1.pt", tmp_path / "models" / "model.pt"):
        state = torch.load(path, weights_only=True)
        state = state.get("model", state)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def test_nan_batch_is_skipped_and_counted_in_skip_mode(tmp_path: Path, phantom_dir: Path) -> None:
    # NaN on the second batch only.
    nan_once = ("$lambda p, t, calls=[0]: (calls.__setitem__(0, calls[0] + 1), torch.nn.functional.l1_loss(p, t)"
                " * (float('nan') if calls[0] == 2 else 1.0))[1]")
    result = run_bundle("training", "configs/inference.json,configs/train_vqvae.json", "--dataset_dir", phantom_dir, "--output_dir", tmp_path,
                        "--ckpt_dir", tmp_path / "models", "--max_epochs", 2, *FAST, "--recon_loss", nan_once,
                        "--nonfinite_mode", "skip")
    log = result.stdout + result.stderr
    assert "batch skipped (1 so far)" in log and "nonfinite_skipped: 1" in log
    state = torch.load(tmp_path / "models" / "model_final.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_same_seed_same_weights_and_run_record(tmp_path: Path, phantom_dir: Path) -> None:
    states = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_bundle("training", "configs/inference.json,configs/train_vqvae.json", "--dataset_dir", phantom_dir, "--output_dir", out,
                   "--ckpt_dir", out / "models", "--max_epochs", 1, *FAST)
        states.append(torch.load(out / "models" / "model_final.pt", weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    import json

    record = json.loads((tmp_path / "a" / "checkpoints" / "run_config.json").read_text())
    versions = json.loads((tmp_path / "a" / "checkpoints" / "versions.json").read_text())
    assert record["config"]["max_epochs"] == 1 and record["config"]["channels"] == [16, 32]
    assert record["config"]["network_def"]["_target_"] == "bundle.stage1_vqvae.vqvae2.VQVAE2"  # macros expanded
    assert versions["torch"] == torch.__version__ and versions["monai"]


def test_every_torch_load_is_weights_only() -> None:
    offenders = []
    for path in [*ROOT.glob("bundle/**/*.py"), *ROOT.glob("scripts/**/*.py"), *ROOT.glob("apps/**/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders
