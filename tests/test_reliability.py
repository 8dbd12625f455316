"""Reliability through the real runner: bad input, bad overrides, mismatched weights, NaN losses, determinism."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_NETWORK, config_list, copy_models, run_bundle

pytestmark = pytest.mark.slow

FAST = ["--batch_size", 4, *TINY_NETWORK]
VQVAE = "configs/inference.json,configs/train_vqvae.json"


def run_failing(run_id: str, config: str, *args) -> str:
    """Runs a workflow in this process (as ``python -m monai.bundle run`` does) that must fail; returns the
    whole exception chain as the user would see it. In-process saves an interpreter start per case."""
    from monai.bundle import run

    overrides = {str(k).lstrip("-"): (str(v) if isinstance(v, Path) else v) for k, v in zip(args[::2], args[1::2])}
    if "output_dir" in overrides:  # never lock or write the checkout's own models/ (a user's weights, another test)
        overrides.setdefault("ckpt_dir", str(Path(overrides["output_dir"]) / "models"))
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
    except BaseException as error:  # noqa: B036 - the point is to see what reaches the user
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
    log = run_failing(
        "training",
        "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json",
        "--dataset_dir",
        tmp_path / "nowhere",
        "--output_dir",
        tmp_path,
    )
    assert f"dataset_dir '{tmp_path / 'nowhere'}' does not exist" in log


def test_empty_split_is_named(tmp_path: Path, phantom_dir: Path) -> None:
    root = _copy_split(phantom_dir, tmp_path)
    for f in (root / "keras_slices_validate").iterdir():
        f.unlink()
    log = run_failing(
        "training",
        "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json",
        "--dataset_dir",
        root,
        "--output_dir",
        tmp_path / "o",
        *FAST,
    )
    assert "split 'validate'" in log and "holds no images" in log


def test_every_broken_file_is_named_in_one_run_before_training(tmp_path: Path, phantom_dir: Path) -> None:
    root = _copy_split(phantom_dir, tmp_path)
    truncated, note, volume = sorted((root / "keras_slices_train").iterdir())[2:5]
    truncated.write_bytes(truncated.read_bytes()[:300])
    note.write_text("this is a note, not an image")
    nib.save(nib.Nifti1Image(np.ones((256, 128, 12), np.float32), np.eye(4)), volume)
    log = run_failing("training", VQVAE, "--dataset_dir", root, "--output_dir", tmp_path / "o", *FAST)
    assert "3 of 18 files of split 'train' cannot be used" in log
    for text in (
        f"{truncated}: ValueError: cannot read '{truncated}'",
        f"{note}: ValueError: cannot read '{note}'",
        f"{volume}: ValueError: '{volume}' has spatial shape (256, 128, 12)",
    ):
        assert text in log, text
    assert not list((tmp_path / "o").rglob("*.pt"))


def test_a_split_smaller_than_a_batch_stops_before_training(tmp_path: Path, phantom_dir: Path) -> None:
    log = run_failing(
        "training",
        VQVAE,
        "--dataset_dir",
        phantom_dir,
        "--output_dir",
        tmp_path,
        "--ckpt_dir",
        tmp_path / "models",
        *TINY_NETWORK,
        "--batch_size",
        32,
    )
    assert "split 'train' has 18 images, fewer than batch_size 32" in log
    assert not list(tmp_path.rglob("*.pt"))


def test_an_unknown_override_stops_the_run_with_the_closest_ids(tmp_path: Path, phantom_dir: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        config_list(VQVAE),
        "--dataset_dir",
        str(phantom_dir),
        "--output_dir",
        str(tmp_path),
        "--max_epoch",
        "3",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--max_epoch (did you mean --max_epochs?)" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("*.pt"))


def test_a_second_training_on_the_same_output_folder_is_refused(tmp_path: Path, phantom_dir: Path) -> None:
    hold = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from bundle.engine.run_lock import lock_folders; "
        f"lock_folders([{str(tmp_path)!r}], 'training'); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        log = run_failing("training", VQVAE, "--dataset_dir", phantom_dir, "--output_dir", tmp_path, *FAST)
    finally:
        holder.kill()
        holder.wait()
    assert f"'{tmp_path}' is in use by another training run: pid {holder.pid}" in log


def _random_weights(directory: Path) -> None:
    """Weights of an untrained tiny network: inference needs weights that fit, not good ones."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json")])
    parser.update(dict(zip((a.lstrip("-") for a in TINY_NETWORK[::2]), map(ast.literal_eval, TINY_NETWORK[1::2]))))
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), directory / "model.pt")


def test_inference_skips_an_unreadable_file_writes_the_rest_and_fails_at_the_end(tmp_path: Path) -> None:
    _random_weights(tmp_path / "models")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(3):
        array = np.random.default_rng(index).random((256, 128)).astype(np.float32) * 100
        nib.save(nib.Nifti1Image(array, np.eye(4)), inputs / f"case_{index}.nii.gz")
    (inputs / "case_1.nii.gz").write_bytes((inputs / "case_1.nii.gz").read_bytes()[:500])
    log = run_failing(
        "inference",
        "configs/inference.json",
        "--input_dir",
        inputs,
        "--output_dir",
        tmp_path / "out",
        "--ckpt_dir",
        tmp_path / "models",
        *TINY_NETWORK,
    )
    assert "inference skipped 1 of 3 files (the others were processed)" in log
    assert f"{inputs / 'case_1.nii.gz'}: ValueError: cannot read" in log
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["case_0_recon.nii.gz", "case_2_recon.nii.gz"]


def test_inference_refuses_inputs_that_would_share_an_output_and_damaged_weights(tmp_path: Path) -> None:
    _random_weights(tmp_path / "models")
    inputs = tmp_path / "in"
    inputs.mkdir()
    array = np.ones((256, 128), np.float32)
    nib.save(nib.Nifti1Image(array, np.eye(4)), inputs / "a.nii.gz")
    nib.save(nib.Nifti1Image(array, np.eye(4)), inputs / "a.nii")
    args = ["--input_dir", inputs, "--output_dir", tmp_path / "out", "--ckpt_dir", tmp_path / "models", *TINY_NETWORK]
    log = run_failing("inference", "configs/inference.json", *args)
    assert f"'{inputs / 'a.nii'}' and '{inputs / 'a.nii.gz'}' -> '{tmp_path / 'out' / 'a_recon.nii.gz'}'" in log
    (inputs / "a.nii").unlink()
    weights = tmp_path / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    log = run_failing("inference", "configs/inference.json", *args)
    assert f"weights file '{weights}' is truncated" in log


def test_evaluation_skips_an_unreadable_file_and_counts_what_it_averages(tmp_path: Path, phantom_dir: Path) -> None:
    _random_weights(tmp_path / "models")
    root = _copy_split(phantom_dir, tmp_path)
    victim = sorted((root / "keras_slices_test").iterdir())[0]
    victim.write_text("not an image")
    log = run_failing(
        "evaluating",
        "configs/inference.json,configs/evaluate.json",
        "--dataset_dir",
        root,
        "--output_dir",
        tmp_path / "out",
        "--ckpt_dir",
        tmp_path / "models",
        *TINY_NETWORK,
    )
    assert "evaluation skipped 1 of 6 files (the others were processed)" in log and str(victim) in log
    summary = json.loads((tmp_path / "out" / "reconstruction_metrics.json").read_text())
    assert summary["n_images"] == 5 and list(summary["skipped"]) == [str(victim)]
    rows = (tmp_path / "out" / "reconstruction" / "ssim_raw.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 5


def test_wrong_override_type_is_named(tmp_path: Path, phantom_dir: Path) -> None:
    log = run_failing(
        "training",
        "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json",
        "--dataset_dir",
        phantom_dir,
        "--output_dir",
        tmp_path,
        "--max_epochs",
        "abc",
    )
    assert "max_epochs must be int, got 'abc'" in log


def test_weights_from_another_configuration_are_refused(tmp_path: Path, phantom_dir: Path, tiny_bundle: dict) -> None:
    out = copy_models(tiny_bundle, tmp_path / "o")  # weights and resumable checkpoints of TINY_NETWORK
    shutil.copytree(tiny_bundle["out"] / "outputs" / "checkpoints", out / "checkpoints")
    other = [a if a != "64" else "32" for a in map(str, TINY_NETWORK)]  # another codebook size
    log = run_failing(
        "evaluating",
        "configs/inference.json,configs/evaluate.json",
        "--dataset_dir",
        phantom_dir,
        "--output_dir",
        out,
        "--ckpt_dir",
        out / "models",
        *other,
    )
    assert "size mismatch for top_quantizer.embedding.weight" in log
    assert f"checkpoint '{out / 'models' / 'model.pt'}' does not fit" in log
    # Resuming training with another width is refused too, never a silent partial load.
    wider = [a if a != "[16, 32]" else "[16, 48]" for a in map(str, TINY_NETWORK)]
    log = run_failing(
        "training",
        "configs/inference.json,configs/train_vqvae.json",
        "--dataset_dir",
        phantom_dir,
        "--output_dir",
        out,
        "--ckpt_dir",
        out / "models",
        "--max_epochs",
        2,
        "--batch_size",
        4,
        *wider,
    )
    assert "size mismatch" in log


def test_nan_loss_stops_before_the_step_and_keeps_checkpoints_finite(tmp_path: Path, phantom_dir: Path) -> None:
    # A good first epoch (4 iterations), then NaN from the first iteration of epoch 2.
    nan_later = (
        "$lambda p, t, calls=[0]: (calls.__setitem__(0, calls[0] + 1), torch.nn.functional.l1_loss(p, t)"
        " * (float('nan') if calls[0] > 4 else 1.0))[1]"
    )
    log = run_failing(
        "training",
        "configs/inference.json,configs/train_vqvae.json",
        "--dataset_dir",
        phantom_dir,
        "--output_dir",
        tmp_path,
        "--ckpt_dir",
        tmp_path / "models",
        "--max_epochs",
        2,
        *FAST,
        "--recon_loss",
        nan_later,
    )
    assert "Non-finite loss or gradient at epoch 2, iteration 5" in log and "FloatingPointError" in log
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["checkpoint_epoch=1.pt"]
    for path in (tmp_path / "checkpoints" / "checkpoint_epoch=1.pt", tmp_path / "models" / "model.pt"):
        state = torch.load(path, weights_only=True)
        state = state.get("model", state)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def test_nan_batch_is_skipped_and_counted_in_skip_mode(tmp_path: Path, phantom_dir: Path) -> None:
    # NaN on the second batch only.
    nan_once = (
        "$lambda p, t, calls=[0]: (calls.__setitem__(0, calls[0] + 1), torch.nn.functional.l1_loss(p, t)"
        " * (float('nan') if calls[0] == 2 else 1.0))[1]"
    )
    result = run_bundle(
        "training",
        "configs/inference.json,configs/train_vqvae.json",
        "--dataset_dir",
        phantom_dir,
        "--output_dir",
        tmp_path,
        "--ckpt_dir",
        tmp_path / "models",
        "--max_epochs",
        2,
        *FAST,
        "--recon_loss",
        nan_once,
        "--nonfinite_mode",
        "skip",
    )
    log = result.stdout + result.stderr
    assert "batch skipped (1 so far)" in log and "nonfinite_skipped: 1" in log
    state = torch.load(tmp_path / "models" / "model_final.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_same_seed_same_weights_and_run_record(tmp_path: Path, phantom_dir: Path) -> None:
    states = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_bundle(
            "training",
            "configs/inference.json,configs/train_vqvae.json",
            "--dataset_dir",
            phantom_dir,
            "--output_dir",
            out,
            "--ckpt_dir",
            out / "models",
            "--max_epochs",
            1,
            *FAST,
        )
        states.append(torch.load(out / "models" / "model_final.pt", weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

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
