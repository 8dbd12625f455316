"""Weights and checkpoint files: every load of a damaged or wrong file names it and says what is wrong, a resume
falls back to the newest checkpoint that loads, and failed atomic writes leave no temporary file."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from bundle.engine.checkpoint import AtomicCheckpointSaver, NamedCheckpointLoader, resume_checkpoint
from bundle.engine.io import atomic_write_bytes
from bundle.engine.weights import WeightsFileError, load_weights


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))


def _damaged(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A file of ``kind`` and the words the error must use."""
    path = tmp_path / "model.pt"
    if kind == "truncated":
        torch.save(_network().state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "is truncated"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
        return path, "is not a PyTorch weights file"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "is empty (0 bytes)"
    if kind == "whole model":
        torch.save(_network(), path)
        return path, "cannot be read safely: it holds a torch.nn.modules.container.Sequential"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    (tmp_path / "slice.nii.gz").rename(path)
    return path, "is a gzip file (a .nii.gz image?)"


KINDS = ["truncated", "random bytes", "empty", "whole model", "an image"]


@pytest.mark.parametrize("kind", KINDS)
def test_loading_a_damaged_or_wrong_weights_file_names_it_and_the_problem(tmp_path: Path, kind: str) -> None:
    path, problem = _damaged(tmp_path, kind)
    with pytest.raises(WeightsFileError) as error:
        load_weights(_network(), path, "cpu")
    assert f"weights file '{path}' {problem}" in str(error.value)
    assert "weights_only=False" not in str(error.value)


@pytest.mark.parametrize("kind", KINDS)
def test_the_checkpoint_loader_names_the_file_and_the_problem(tmp_path: Path, kind: str) -> None:
    path, problem = _damaged(tmp_path, kind)
    engine = Engine(lambda e, b: None)
    NamedCheckpointLoader(load_path=str(path), load_dict={"model": _network()}).attach(engine)
    with pytest.raises(WeightsFileError) as error:
        engine.run([0])
    assert f"weights file '{path}' {problem}" in str(error.value)


def test_the_checkpoint_loader_names_the_file_when_weights_do_not_fit(tmp_path: Path) -> None:
    torch.save({"model": torch.nn.Linear(3, 3).state_dict()}, tmp_path / "model.pt")
    engine = Engine(lambda e, b: None)
    NamedCheckpointLoader(load_path=str(tmp_path / "model.pt"), load_dict={"model": _network()}).attach(engine)
    with pytest.raises(RuntimeError, match=f"checkpoint '{tmp_path / 'model.pt'}' does not fit"):
        engine.run([0])


def test_another_networks_weights_are_named_as_such(tmp_path: Path) -> None:
    torch.save(torch.nn.Conv2d(1, 1, 1).state_dict(), tmp_path / "prior.pt")
    with pytest.raises(RuntimeError, match="none of its 2 entries is a Sequential parameter: is it another network"):
        load_weights(_network(), tmp_path / "prior.pt", "cpu")


def _checkpoint(directory: Path, epoch: int) -> Path:
    path = directory / f"checkpoint_epoch={epoch}.pt"
    torch.save({"model": _network().state_dict(), "trainer": {"epoch": epoch}}, path)
    return path


def test_a_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path: Path, caplog) -> None:
    assert resume_checkpoint(tmp_path) == ""
    good = _checkpoint(tmp_path, 3)
    assert resume_checkpoint(tmp_path) == str(good)
    bad = _checkpoint(tmp_path, 4)
    bad.write_bytes(bad.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(tmp_path) == str(good)
    assert f"weights file '{bad}' is truncated" in caplog.text
    assert f"Resuming from '{good}', the newest checkpoint that loads" in caplog.text
    good.write_bytes(b"")
    with pytest.raises(WeightsFileError) as error:
        resume_checkpoint(tmp_path)
    assert str(bad) in str(error.value) and str(good) in str(error.value) and "--resume False" in str(error.value)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["os.fsync", "os.replace"])
def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch, failing: str) -> None:
    (tmp_path / "a.json").write_text("old")
    monkeypatch.setattr(failing, _disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(tmp_path / "a.json", b"new")
    assert os.listdir(tmp_path) == ["a.json"] and (tmp_path / "a.json").read_text() == "old"


@pytest.mark.parametrize("failing", ["os.fsync", "os.replace"])
def test_a_failed_checkpoint_save_leaves_no_temporary_file(tmp_path: Path, monkeypatch, failing: str) -> None:
    network = _network()
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": network}, save_final=True, final_filename="model_final.pt"
    )
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    monkeypatch.setattr(failing, _disk_full)
    with pytest.raises(OSError, match="No space left"):
        engine.run([0])
    assert os.listdir(tmp_path) == []


def test_saved_files_get_ordinary_permissions_and_leftovers_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    leftover = tmp_path / ".model.pt.k1ll3d_x.tmp"
    leftover.write_bytes(b"partial")
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": _network()}, save_final=True, final_filename="model_final.pt"
    )
    assert not leftover.exists()
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0])
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model_final.pt").stat().st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["model_final.pt"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import bundle.engine.io as io
    from bundle.engine.checkpoint import EngineCheckpointSaver, latest_checkpoint

    saver = EngineCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": _network()}, save_interval=1, n_saved=1, epoch_level=True
    )
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    write = io.atomic_write_bytes

    def full_from_epoch_3(path, data, durable=True):
        if "epoch=3" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data, durable)

    monkeypatch.setattr("bundle.engine.checkpoint.atomic_write_bytes", full_from_epoch_3)
    with pytest.raises(OSError, match="No space left"):
        engine.run([0], max_epochs=4)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=2.pt")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch=2.pt"]
    assert torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)["trainer"]["iteration"] == 2
