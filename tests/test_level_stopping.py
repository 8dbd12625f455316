"""Early stopping per level of the two-level prior (bundle/stage2_prior/level_stopping.py)."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.stage2_prior.level_stopping import EndWhenLevelsStopped, LevelEarlyStopping, level_param_groups

from conftest import ROOT
from two_level_stand_in import SHAPES, tiny_prior


def _validate(handler: LevelEarlyStopping, top: float, bottom: float) -> None:
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.metrics = {"val_nll_bits_top": top, "val_nll_bits_bottom": bottom}
    handler(evaluator)


def _train_step(prior, optimizer) -> None:
    generator = torch.Generator().manual_seed(0)
    top = torch.randint(0, 6, (4, *SHAPES[0]), generator=generator)
    bottom = torch.randint(0, 10, (4, *SHAPES[1]), generator=generator)
    top_logits, bottom_logits = prior(top, bottom)
    loss = torch.nn.functional.cross_entropy(top_logits, top) + torch.nn.functional.cross_entropy(bottom_logits, bottom)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_level_that_stops_improving_gets_its_best_weights_back_and_stops_training() -> None:
    prior = tiny_prior()
    optimizer = torch.optim.Adam(level_param_groups(prior), lr=1e-2, fused=True)  # as configs/train_prior.json
    handler = LevelEarlyStopping(prior, optimizer, patience=2)
    _validate(handler, top=3.0, bottom=5.0)  # epoch 1: the best top so far
    best_top = _weights(prior.top)
    _train_step(prior, optimizer)
    _validate(handler, top=3.2, bottom=4.0)  # top worse once: waits
    assert not handler.stopped("top")
    _train_step(prior, optimizer)
    assert any(not torch.equal(best_top[k], v) for k, v in prior.top.state_dict().items())  # premise: it moved
    _validate(handler, top=3.4, bottom=3.5)  # top worse twice: back to its best and frozen
    assert handler.stopped("top") and not handler.stopped("bottom")
    for key, value in prior.top.state_dict().items():
        assert torch.equal(value, best_top[key]), key
    bottom_before = _weights(prior.bottom)
    _train_step(prior, optimizer)
    for key, value in prior.top.state_dict().items():
        assert torch.equal(value, best_top[key]), f"{key} changed after the top prior stopped"
    assert any(not torch.equal(bottom_before[k], v) for k, v in prior.bottom.state_dict().items())


def _gradients(prior: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    optimizer = torch.optim.SGD(prior.parameters(), lr=0.0)
    optimizer.zero_grad(set_to_none=True)
    _train_step(prior, optimizer)
    return {name: p.grad for name, p in prior.named_parameters()}


def test_a_stopped_level_runs_without_gradients_and_the_other_level_gets_the_same_ones() -> None:
    prior = tiny_prior()
    handler = LevelEarlyStopping(prior, torch.optim.Adam(level_param_groups(prior)), patience=1)
    reference = _gradients(prior)
    _validate(handler, top=3.0, bottom=5.0)
    _validate(handler, top=3.5, bottom=4.0)  # the top stops
    assert prior.frozen_levels == {"top"}
    frozen = _gradients(prior)
    for name, grad in frozen.items():
        if name.startswith("top."):
            assert grad is None, f"{name} got a gradient after the top prior stopped"
        else:
            assert torch.equal(grad, reference[name]), name
    _validate(handler, top=3.6, bottom=4.5)  # the bottom stops too: both keep gradients so backward still runs
    assert prior.frozen_levels == {"top", "bottom"}
    assert all(grad is not None for grad in _gradients(prior).values())


def test_the_optimizer_must_have_a_group_per_level() -> None:
    prior = tiny_prior()
    groups = level_param_groups(prior)
    assert [g["name"] for g in groups] == ["top", "bottom"]
    assert sum(len(g["params"]) for g in groups) == len(list(prior.parameters()))
    with pytest.raises(ValueError, match="no parameter group named"):
        LevelEarlyStopping(prior, torch.optim.Adam(prior.parameters()))
    with pytest.raises(ValueError, match="patience"):
        LevelEarlyStopping(prior, torch.optim.Adam(groups), patience=-1)


def test_patience_0_never_stops_a_level() -> None:
    prior = tiny_prior()
    handler = LevelEarlyStopping(prior, torch.optim.Adam(level_param_groups(prior)), patience=0)
    for top in (3.0, 3.5, 4.0, 4.5):
        _validate(handler, top=top, bottom=5.0)
    assert not handler.stopped("top") and handler.waited["top"] == 3


def test_a_resumed_run_keeps_the_best_of_the_whole_run() -> None:
    """The state goes into the checkpoint: after a resume (configured learning rates back, so the stopped level
    trains again) the level stops at the first validation that does not beat its best before the resume, and gets
    back the weights of that best."""
    prior = tiny_prior()
    optimizer = torch.optim.Adam(level_param_groups(prior), lr=1e-2)
    handler = LevelEarlyStopping(prior, optimizer, patience=2)
    _validate(handler, top=3.0, bottom=5.0)
    best_top = _weights(prior.top)
    for top, bottom in ((3.2, 4.0), (3.4, 3.5)):
        _train_step(prior, optimizer)
        _validate(handler, top=top, bottom=bottom)
    assert handler.stopped("top")
    checkpoint = {"model": _weights(prior), "optimizer": optimizer.state_dict(), "state": handler.state_dict()}

    # as a resume does: the handler is built first, then the checkpoint loader loads the model, the optimizer (which
    # replaces its parameter groups) and the handler's state, and puts the configured learning rates back
    resumed_prior = tiny_prior()
    resumed_optimizer = torch.optim.Adam(level_param_groups(resumed_prior), lr=1e-2)
    resumed = LevelEarlyStopping(resumed_prior, resumed_optimizer, patience=2)
    resumed_prior.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert resumed.stopped("top")
    resumed.load_state_dict(checkpoint["state"])
    for group in resumed_optimizer.param_groups:
        group["lr"] = 1e-2
    assert resumed.best == {"top": 3.0, "bottom": 3.5} and not resumed.stopped("top")
    _train_step(resumed_prior, resumed_optimizer)  # the top trains again after the resume ...
    assert any(not torch.equal(best_top[k], v) for k, v in resumed_prior.top.state_dict().items())
    _validate(resumed, top=3.1, bottom=3.4)  # ... is no better than before the resume: back to the run's best
    assert resumed.stopped("top") and not resumed.stopped("bottom")
    for key, value in resumed_prior.top.state_dict().items():
        assert torch.equal(value, best_top[key]), key
    _train_step(resumed_prior, resumed_optimizer)  # and it stays there: its learning rate in the optimizer is 0
    for key, value in resumed_prior.top.state_dict().items():
        assert torch.equal(value, best_top[key]), f"{key} changed after the top prior stopped again"


def _train_with_validations(validations: list[tuple[float, float]], max_epochs: int) -> tuple[Engine, list[str]]:
    """A stand-in trainer whose epoch ``e`` ends with the validation ``validations[e - 1]`` (top, bottom NLL), then
    :class:`EndWhenLevelsStopped`, then a handler that records what ran; patience 1."""
    prior = tiny_prior()
    handler = LevelEarlyStopping(prior, torch.optim.Adam(level_param_groups(prior)), patience=1)
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: _validate(handler, *validations[e.state.epoch - 1]))
    EndWhenLevelsStopped(handler).attach(trainer)
    ran: list[str] = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ran.append(f"epoch {e.state.epoch}"))
    trainer.add_event_handler(Events.COMPLETED, lambda e: ran.append("completed"))
    trainer.run([0], max_epochs=max_epochs)
    return trainer, ran


def test_the_trainer_ends_after_the_epoch_in_which_the_last_level_stopped() -> None:
    # the top stops after epoch 2, the bottom after epoch 3; epochs 4 to 6 would change no weight
    validations = [(3.0, 5.0), (3.5, 4.0), (3.6, 4.5), (3.7, 3.0), (3.8, 2.0), (3.9, 1.0)]
    trainer, ran = _train_with_validations(validations, max_epochs=6)
    assert trainer.state.epoch == 3
    assert ran == ["epoch 1", "epoch 2", "epoch 3", "completed"]  # the later handlers of epoch 3 and COMPLETED ran


def test_the_trainer_goes_on_while_a_level_still_trains() -> None:
    validations = [(3.0, 5.0), (3.5, 4.0), (3.6, 3.5), (3.7, 3.0), (3.8, 2.5), (3.9, 2.0)]  # only the top stops
    trainer, ran = _train_with_validations(validations, max_epochs=6)
    assert trainer.state.epoch == 6 and ran[-2:] == ["epoch 6", "completed"]


def test_stage_2_ends_when_both_levels_have_stopped_after_its_validation() -> None:
    handlers = json.loads((ROOT / "configs" / "train_prior.json").read_text())["prior_train"]["handlers"]
    targets = [handler["_target_"] for handler in handlers]
    end = targets.index("bundle.stage2_prior.level_stopping.EndWhenLevelsStopped")
    assert end > targets.index("ValidationHandler")  # so it sees the stops of the epoch's own validation
    assert handlers[end]["level_stopping"] == "@prior_level_stopping" and "_disabled_" not in handlers[end]
