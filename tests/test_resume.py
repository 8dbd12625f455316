"""Resuming: the best key-metric score survives a restart, and training killed with SIGKILL at random moments
finishes when the same command is re-run, losing at most one epoch."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.engine.checkpoint import (
    AtomicCheckpointSaver,
    EngineCheckpointLoader,
    EngineCheckpointSaver,
    latest_checkpoint,
)

from conftest import ROOT, TINY_NETWORK, TINY_PRIOR

KILLS = 3
EPOCHS, PRIOR_EPOCHS = 6, 6


def _every_weight_file_loads(root: Path) -> None:
    for path in root.rglob("*.pt"):
        torch.load(path, weights_only=True)  # a truncated file raises here


def _saved_epoch(directory: Path) -> int:
    path = latest_checkpoint(directory)
    return int(re.search(r"=(\d+)\.pt$", path).group(1)) if path else 0


def _validate(save_dir: Path, run: int, scores: list[float], resume_best: bool) -> None:
    """Runs one validation per score; the saved weight is ``10 * run + epoch``, to tell the saves apart."""
    net = torch.nn.Linear(1, 1, bias=False)
    saver = AtomicCheckpointSaver(
        save_dir=str(save_dir),
        save_dict={"net": net},
        save_key_metric=True,
        key_metric_name="val",
        key_metric_filename="model.pt",
        resume_best=resume_best,
    )
    engine = Engine(lambda engine, batch: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _score(engine: Engine) -> None:  # registered before the saver's handler, so it runs first
        engine.state.metrics["val"] = scores[engine.state.epoch - 1]
        net.weight.data.fill_(10 * run + engine.state.epoch)

    saver.attach(engine)
    engine.run([0], max_epochs=len(scores))


def _saved(save_dir: Path) -> tuple[float, float]:
    """The weight in ``model.pt`` and the best score kept beside it."""
    weight = float(torch.load(save_dir / "model.pt", weights_only=True)["weight"])
    return weight, json.loads((save_dir / ".model.pt.best.json").read_text())["priority"]


def test_best_score_survives_a_restart(tmp_path: Path) -> None:
    _validate(tmp_path, 1, [0.5, 0.9, 0.7], resume_best=False)
    assert _saved(tmp_path) == (12, 0.9)
    _validate(tmp_path, 2, [0.6, 0.8], resume_best=True)
    assert _saved(tmp_path) == (12, 0.9), "a worse model replaced the best"
    _validate(tmp_path, 3, [0.6, 0.95, 0.92], resume_best=True)
    assert _saved(tmp_path) == (32, 0.95)
    _validate(tmp_path, 4, [0.1], resume_best=False)  # a fresh start forgets the old best
    assert _saved(tmp_path) == (41, 0.1)


def _train(directory: Path, learning_rate: float, batch_size: int, max_epochs: int, resume: bool) -> list[tuple]:
    """Trains a linear model on 16 samples; returns ``(epoch, iteration, lr)`` of every iteration run."""
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=1e-4 if resume else 0.0)
    data = [{"image": torch.randn(2), "label": torch.randn(1)} for _ in range(16)]
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, drop_last=True)
    objects = {"model": network, "optimizer": optimizer}
    handlers = [
        EngineCheckpointSaver(save_dir=str(directory), save_dict=objects, save_interval=1, n_saved=1, epoch_level=True)
    ]
    if resume:
        handlers.insert(0, EngineCheckpointLoader(load_path=latest_checkpoint(directory), load_dict=dict(objects)))
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=torch.nn.MSELoss(),
        train_handlers=handlers,
    )
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.append(
            (e.state.epoch, e.state.iteration, *(optimizer.param_groups[0][k] for k in ("lr", "weight_decay")))
        ),
    )
    trainer.run()
    return seen


def test_a_resume_runs_with_the_configured_learning_rate_and_batch_size(tmp_path: Path, caplog) -> None:
    first = _train(tmp_path, 3e-4, batch_size=4, max_epochs=2, resume=False)
    assert first[-1] == (2, 8, 3e-4, 0.0)
    with caplog.at_level(logging.WARNING):
        resumed = _train(tmp_path, 0.1, batch_size=2, max_epochs=3, resume=True)
    # epoch 3 only, with 16 / 2 = 8 iterations, the new learning rate and weight decay
    assert resumed == [(3, 16 + i, 0.1, 1e-4) for i in range(1, 9)]
    for change in (
        "optimizer lr 0.0003 -> 0.1",
        "optimizer weight_decay 0.0 -> 0.0001",
        "iterations per epoch 4 -> 8 (batch size or data changed): continuing after epoch 2 at iteration 16",
    ):
        assert change in caplog.text
    saved = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    assert saved["trainer"]["epoch_length"] == 8 and saved["trainer"]["iteration"] == 24
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_a_resume_with_unchanged_settings_changes_nothing(tmp_path: Path, caplog) -> None:
    _train(tmp_path, 3e-4, batch_size=4, max_epochs=1, resume=False)
    with caplog.at_level(logging.WARNING):
        resumed = _train(tmp_path, 3e-4, batch_size=4, max_epochs=2, resume=True)
    assert [step[:3] for step in resumed] == [(2, 4 + i, 3e-4) for i in range(1, 5)]
    assert "optimizer lr" not in caplog.text and "iterations per epoch" not in caplog.text


class _Counter:
    """A stateful object that a checkpoint saves and loads besides the model."""

    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_an_entry_that_an_older_checkpoint_lacks_is_left_as_it_is_when_optional(tmp_path: Path, caplog) -> None:
    from monai.engines import SupervisedTrainer

    _train(tmp_path, 3e-4, batch_size=4, max_epochs=1, resume=False)  # its checkpoint has no "counter"
    path = latest_checkpoint(tmp_path)

    def resume(optional: tuple) -> _Counter:
        network = torch.nn.Linear(2, 1)
        counter = _Counter(7)
        objects = {"model": network, "optimizer": torch.optim.Adam(network.parameters()), "counter": counter}
        loader = EngineCheckpointLoader(load_path=path, load_dict=objects, optional=optional)
        trainer = SupervisedTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=[{"image": torch.randn(2), "label": torch.randn(1)}],
            network=network,
            optimizer=objects["optimizer"],
            loss_function=torch.nn.MSELoss(),
            train_handlers=[loader],
        )
        trainer.run()  # already at epoch 1: loads and stops
        assert set(loader.load_dict) == {"model", "optimizer", "counter", "trainer"}  # the entry is put back
        return counter

    with caplog.at_level(logging.INFO):
        assert resume(optional=("counter",)).value == 7
    assert f"'{path}' has no 'counter' (an older version wrote it)" in caplog.text
    with pytest.raises(RuntimeError, match="does not fit what it is loaded into"):
        resume(optional=())


def test_the_run_record_of_a_resume_names_the_checkpoint_and_keeps_earlier_runs(tmp_path: Path) -> None:
    from bundle.engine.run_record import record_run

    files = str(["configs/inference.json", "configs/train_vqvae.json"])
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        record_run(tmp_path, ["run", "training", "--config_file", files, "--learning_rate", "0.0003"])
        record_run(
            tmp_path,
            ["run", "training", "--config_file", files, "--learning_rate", "0.1"],
            resumed_from=str(tmp_path / "checkpoint_epoch=2.pt"),
        )
        second = json.loads((tmp_path / "run_config.json").read_text())
        record_run(tmp_path, ["run", "training", "--config_file", files], resumed_from={"vqvae": "", "prior": ""})
        fresh = json.loads((tmp_path / "run_config.json").read_text())
    finally:
        os.chdir(cwd)
    assert second["config"]["learning_rate"] == 0.1 and second["resumed_from"].endswith("checkpoint_epoch=2.pt")
    assert [run["config"]["learning_rate"] for run in second["earlier_runs"]] == [0.0003]
    assert fresh["resumed_from"] is None and "earlier_runs" not in fresh


@pytest.mark.slow
def test_killed_training_resumes_and_finishes(tmp_path: Path, phantom_dir: Path) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(["configs/inference.json", "configs/train_vqvae.json", "configs/train_prior.json"]),
        "--dataset_dir",
        str(phantom_dir),
        "--output_dir",
        str(out / "outputs"),
        "--ckpt_dir",
        str(out / "models"),
        "--batch_size",
        "4",
        "--max_epochs",
        str(EPOCHS),
        "--prior_max_epochs",
        str(PRIOR_EPOCHS),
        "--prior_batch_size",
        "4",
        *TINY_PRIOR,
        "--prior_sample_interval",
        "0",
        "--prior_sample_count",
        "2",
        *map(str, TINY_NETWORK),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    rng = random.Random(1234)
    checkpoints = out / "outputs" / "checkpoints"
    history = []
    for _ in range(KILLS):
        before = (_saved_epoch(checkpoints), _saved_epoch(checkpoints / "prior"))
        log_path = tmp_path / f"log_{len(history)}.txt"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            # Kill a random moment after a random number of validations of this run: start-up time varies a
            # lot with the machine's load, progress does not. The extra delay lands the kill anywhere in an
            # epoch, a validation or a checkpoint save, in either stage.
            target, deadline = rng.randint(1, 6), time.time() + 180
            while (
                log_path.read_text().count("Metrics -- val") < target
                and process.poll() is None
                and time.time() < deadline
            ):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
            process.kill()  # SIGKILL: no handler, no cleanup
            process.wait()
        after = (_saved_epoch(checkpoints), _saved_epoch(checkpoints / "prior"))
        text = log_path.read_text()
        finished = [int(e) for e in re.findall(r"Epoch\[(\d+)\] Metrics -- val_mse", text)]
        lost = (max(finished) - after[0]) if finished else 0  # epochs validated but not in a checkpoint
        history.append({"saved_before": before, "saved_after": after, "vqvae_epochs_finished": finished, "lost": lost})
        assert lost <= 1, history
        _every_weight_file_loads(out)
        # Each run starts from the last saved epoch of its stage: nothing saved is retrained.
        if before[0] and finished:
            assert finished[0] == before[0] + 1, history
        assert after >= before, history
    final = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    _every_weight_file_loads(out)
    vqvae = torch.load(latest_checkpoint(checkpoints), weights_only=True)
    prior = torch.load(latest_checkpoint(checkpoints / "prior"), weights_only=True)
    assert vqvae["trainer"]["iteration"] == EPOCHS * (18 // 4), "the VQ-VAE ran exactly max_epochs epochs in all"
    assert prior["trainer"]["iteration"] == PRIOR_EPOCHS * (18 // 4), "the prior ran exactly prior_max_epochs in all"
    assert any(
        h["saved_after"] != h["saved_before"] for h in history[1:]
    ), f"no kill landed while training ran: {history}"
    assert history[-1]["saved_after"][1] > 0, f"no kill landed in stage 2 (the prior's training): {history}"
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "prior" / "prior.pt").is_file()
    print("kill history:", history)
