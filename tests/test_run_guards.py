"""Guards a run sets up before it starts: a lock on the folders it writes, and overrides that match no config ID."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundle.engine.run_lock import FolderInUseError, lock_folders, release_folders
from bundle.engine.run_record import check_overrides

from conftest import ROOT

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from bundle.engine.run_lock import lock_folders
lock_folders([{folder!r}], "training")
print("locked", flush=True)
time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(root=str(ROOT), folder=str(folder))], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_on_the_same_folder_is_stopped_naming_the_holder(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUseError) as error:
            lock_folders([tmp_path], "training")
        message = str(error.value)
        assert f"'{tmp_path}' is in use by another training run: pid {holder.pid} on {socket.gethostname()}" in message
        assert f", started {time.strftime('%Y-%m-%d')}" in message
        lock_folders([tmp_path], "evaluation")  # another workflow may share the folder
    finally:
        holder.kill()
        holder.wait()
        release_folders([tmp_path], "evaluation")


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING):
        lock_folders([tmp_path, tmp_path / "models"], "training")
    assert f"Taking over the stale training lock of '{tmp_path}' from pid {holder.pid}" in caplog.text
    assert "which no longer runs" in caplog.text
    assert lock_folders([tmp_path], "training")  # the same process may lock again (workflows run in-process)
    release_folders([tmp_path, tmp_path / "models"], "training")
    assert not (tmp_path / ".training.lock").exists() and not (tmp_path / "models" / ".training.lock").exists()
    lock_folders([tmp_path], "training")  # a released lock is free without a warning
    release_folders([tmp_path], "training")


FILES = str(["configs/inference.json", "configs/train_vqvae.json"])


@pytest.fixture()
def in_root():
    cwd = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(cwd)


def test_an_override_that_matches_no_config_id_stops_with_the_closest_ids(in_root) -> None:
    with pytest.raises(ValueError) as error:
        check_overrides(["run", "training", "--config_file", FILES, "--max_epoch", "3", "--learning_rte=0.1"])
    message = str(error.value)
    assert "--max_epoch (did you mean --max_epochs?)" in message
    assert "--learning_rte (did you mean --learning_rate?)" in message


def test_known_ids_component_arguments_and_runner_arguments_pass(in_root) -> None:
    check_overrides(
        [
            "run",
            "training",
            "--config_file",
            FILES,
            "--max_epochs",
            "3",
            "--train#dataloader#batch_size",
            "2",
            "--train::trainer::epoch_length=2",
            "--meta_file",
            "configs/metadata.json",
            "--amp",
        ]
    )


def test_only_a_bundle_command_line_is_checked(in_root, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["pytest", "--config_file", FILES, "--max_epoch", "3"])
    check_overrides()  # pytest's own command line: nothing to check
    monkeypatch.setattr(sys, "argv", ["/x/monai/bundle/__main__.py", "run", "--config_file", FILES, "--max_epoch", "3"])
    with pytest.raises(ValueError, match="--max_epoch"):
        check_overrides()


def test_an_id_of_another_workflow_is_only_warned_about(in_root, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        check_overrides(["run", "inference", "--config_file", "configs/inference.json", "--compile", "False"])
    assert "IDs that only other workflows of the bundle use: --compile (configs/" in caplog.text
    with pytest.raises(ValueError, match=r"would change nothing: --compil\. Config files"):
        check_overrides(["run", "inference", "--config_file", "configs/inference.json", "--compil", "False"])
