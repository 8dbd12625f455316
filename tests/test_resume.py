"""Kill training with SIGKILL at random moments, re-run the same command, and lose at most one epoch."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bundle.utils import latest_checkpoint
from conftest import ROOT, TINY_NETWORK

pytestmark = pytest.mark.slow

KILLS = 3


def _every_weight_file_loads(root: Path) -> None:
    for path in root.rglob("*.pt"):
        torch.load(path, weights_only=True)  # a truncated file raises here


def _saved_epoch(directory: Path) -> int:
    path = latest_checkpoint(directory)
    return int(re.search(r"=(\d+)\.pt$", path).group(1)) if path else 0


def test_killed_training_resumes_and_finishes(tmp_path: Path, phantom_dir: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
               "--dataset_dir", str(phantom_dir), "--output_dir", str(out / "outputs"), "--ckpt_dir", str(out / "models"),
               "--batch_size", "4", "--max_epochs", "5", "--prior_max_epochs", "3", "--prior_batch_size", "4",
               "--prior_channels", "16", "--prior_layers", "3", "--prior_head_channels", "32",
               "--prior_sample_interval", "0", "--prior_sample_count", "2", *map(str, TINY_NETWORK)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    rng = random.Random(1234)
    checkpoints = out / "outputs" / "checkpoints"
    history = []
    for _ in range(KILLS):
        before = (_saved_epoch(checkpoints), _saved_epoch(checkpoints / "prior"))
        log_path = tmp_path / f"log_{len(history)}.txt"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            # Start the clock once training runs (interpreter start-up time varies a lot on a loaded machine).
            deadline = time.time() + 120
            while "Epoch [" not in log_path.read_text() and process.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 8.0))
            process.kill()  # SIGKILL: no handler, no cleanup
            process.wait()
        after = (_saved_epoch(checkpoints), _saved_epoch(checkpoints / "prior"))
        text = log_path.read_text()
        first_epoch = re.search(r"Epoch\[(\d+)\] Metrics -- val_(?:mse|nll)", text)
        history.append((before, after, first_epoch.group(0) if first_epoch else None))
        _every_weight_file_loads(out)
        # Each run starts from the last saved epoch of its stage: nothing saved is retrained.
        if before[0] and first_epoch and "val_mse" in first_epoch.group(0):
            assert int(first_epoch.group(1)) == before[0] + 1, history
        assert after >= before, history
    final = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    _every_weight_file_loads(out)
    vqvae = torch.load(latest_checkpoint(checkpoints), weights_only=True)
    prior = torch.load(latest_checkpoint(checkpoints / "prior"), weights_only=True)
    assert vqvae["trainer"]["iteration"] == 5 * (18 // 4), "the VQ-VAE ran exactly max_epochs epochs in all"
    assert prior["trainer"]["iteration"] == 3 * (18 // 4), "the prior ran exactly prior_max_epochs epochs in all"
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "prior" / "prior.pt").is_file()
    print("kill history (saved epochs before, after, first epoch the run finished):", history)
