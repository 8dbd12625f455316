"""The training-time budget (bundle/engine/time_budget.py): whole epochs, timed from the run's start, in both stages."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.engine.checkpoint import latest_checkpoint
from bundle.engine.time_budget import EpochTimeBudget

from conftest import TINY_NETWORK, TINY_PRIOR, run_bundle


class _Clock:
    """A stand-in for ``time.time``; the stand-in trainer's step (:func:`_trainer`) advances it by one second."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _trainer(clock: _Clock) -> tuple[Engine, list[int]]:
    def step(engine: Engine, batch: int) -> None:
        clock.now += 1.0

    trainer, completed = Engine(step), []
    trainer.add_event_handler(Events.COMPLETED, lambda engine: completed.append(engine.state.epoch))
    return trainer, completed


def test_training_stops_before_an_epoch_that_would_end_past_the_budget(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "time", clock)
    trainer, completed = _trainer(clock)
    EpochTimeBudget(12).attach(trainer)
    clock.now += 100.0  # time before the run starts (e.g. code extraction) does not count
    trainer.run(range(5), max_epochs=10)  # epochs of 5 s end at 5 and 10 s; a third would end at 15 > 12
    assert trainer.state.epoch == 2 and trainer.state.iteration == 10
    assert completed == [2], "a stopped run still ends through COMPLETED (final weights, reports)"


def test_a_budget_that_holds_every_epoch_changes_nothing(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "time", clock)
    trainer, completed = _trainer(clock)
    EpochTimeBudget(45).attach(trainer)  # the last epoch ends at 45 s: within, however long the next would be
    trainer.run(range(5), max_epochs=9)
    assert trainer.state.epoch == 9 and completed == [9]


def test_one_stalled_epoch_does_not_end_the_run(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "time", clock)
    trainer, _ = _trainer(clock)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=3), lambda engine: setattr(clock, "now", clock.now + 30.0))
    EpochTimeBudget(70).attach(trainer)  # epochs of 5 s, the third 35 s (it ends at 45 s)
    trainer.run(range(5), max_epochs=10)
    assert trainer.state.epoch == 8, "judged by the median epoch (5 s) it runs on to 70 s; by the last, 45 + 35 > 70"


@pytest.mark.parametrize("seconds, error", [("60", TypeError), (1.5, TypeError), (True, TypeError), (0, ValueError)])
def test_bad_budgets_are_refused_with_the_config_id(seconds, error) -> None:
    with pytest.raises(error, match="prior_max_train_seconds"):
        EpochTimeBudget(seconds, "prior_max_train_seconds")


def test_a_distributed_run_refuses_a_budget(tmp_path: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="max_train_seconds is for single-process runs"):
            EpochTimeBudget(60).attach(Engine(lambda engine, batch: None))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_both_stages_stop_at_their_time_limits_through_the_runner(tmp_path: Path, phantom_dir: Path) -> None:
    out = tmp_path / "run"
    result = run_bundle(
        "training",
        "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json",
        *("--dataset_dir", phantom_dir, "--output_dir", out / "outputs", "--ckpt_dir", out / "models"),
        *("--batch_size", 4, "--prior_batch_size", 4, "--prior_sample_interval", 0),
        *("--max_epochs", 500, "--max_train_seconds", 4, "--prior_max_epochs", 500, "--prior_max_train_seconds", 4),
        *TINY_NETWORK,
        *TINY_PRIOR,
    )
    log = result.stdout + result.stderr
    assert len(re.findall(r"Training stops after epoch \d+ of 500: .* (prior_)?max_train_seconds = 4 s", log)) == 2, log
    for directory in (out / "outputs" / "checkpoints", out / "outputs" / "checkpoints" / "prior"):
        trainer = torch.load(latest_checkpoint(directory), weights_only=True)["trainer"]
        epoch = trainer["iteration"] // trainer["epoch_length"]
        assert 1 <= epoch < 500, f"{directory}: stopped after epoch {epoch}"
    assert (out / "models" / "model_final.pt").is_file() and (out / "models" / "prior" / "prior_final.pt").is_file()
