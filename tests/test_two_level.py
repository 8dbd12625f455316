"""Tests for the two-level prior: coverage, conditioning, loss / metrics / prepare_batch inside MONAI's engines,
two-level sampling and the export forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from bundle.engine.inferers import AutocastInferer
from bundle.engine.weights import load_weights
from bundle.evaluation.generation_report import nll_bits_per_code
from bundle.stage2_prior.codes import CodeDataset
from bundle.stage2_prior.export import BottomPriorLogits, TopPriorLogits
from bundle.stage2_prior.sampling import level_generators, sample_codes, sample_fast, sample_naive
from bundle.stage2_prior.two_level import NLLBits, TwoLevelCrossEntropy, TwoLevelPrior, prepare_code_batch

from two_level_stand_in import tiny_prior


def make_prior(num_classes: int = 0, dtype: torch.dtype = torch.float64, sharpen: bool = True) -> TwoLevelPrior:
    """A tiny prior; ``sharpen`` scales the heads up so that a wrong context shows in the samples."""
    return tiny_prior(num_classes, None, (4.0, 10.0) if sharpen else (1.0, 1.0)).to(dtype)


def random_codes(n: int, top_shape: tuple, bottom_shape: tuple, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6, (n, *top_shape), generator=gen), torch.randint(0, 10, (n, *bottom_shape), generator=gen)


# ---------------------------------------------------------------- construction


def test_arguments_per_level_and_shape_checks() -> None:
    prior = TwoLevelPrior((6, 10), channels=(8, 4), num_layers=(4, 2), kernel_size=(5, 3), head_channels=(16, 8))
    assert (prior.top.num_embeddings, prior.bottom.num_embeddings, prior.bottom.cond_embeddings) == (6, 10, 6)
    assert (prior.top.channels, prior.bottom.channels) == (8, 4)
    assert (prior.top.num_layers, prior.bottom.num_layers) == (4, 2)
    assert (prior.top.kernel_size, prior.bottom.kernel_size) == (5, 3)
    assert prior.top.cond_stack is None and prior.bottom.cond_stack is not None
    assert prior.num_embeddings == (6, 10) and prior.latent_shapes is None
    same = TwoLevelPrior(12, channels=4, num_layers=2, head_channels=4)
    assert same.num_embeddings == (12, 12) and same.top.channels == same.bottom.channels == 4
    shaped = TwoLevelPrior(12, channels=4, num_layers=(16, 2), head_channels=4, latent_shapes=[[32, 16], [64, 32]])
    assert shaped.latent_shapes == ((32, 16), (64, 32))
    with pytest.raises(ValueError, match="at least 15 layers"):
        TwoLevelPrior(12, channels=4, num_layers=(14, 2), head_channels=4, latent_shapes=((32, 16), (64, 32)))
    with pytest.raises(ValueError, match="divide"):
        TwoLevelPrior(12, channels=4, num_layers=(16, 2), head_channels=4, latent_shapes=((32, 16), (64, 24)))
    with pytest.raises(TypeError, match="pair"):
        TwoLevelPrior(12, channels=(4.0, 4))
    positioned = TwoLevelPrior(
        12, channels=4, num_layers=(16, 2), latent_shapes=((32, 16), (64, 32)), top_position_channels=3
    )
    assert positioned.top.position.shape == (1, 3, 32, 16) and positioned.top.cond_stack is None
    assert positioned.bottom.position is None and positioned.bottom.cond_channels == 32
    with pytest.raises(ValueError, match="needs latent_shapes"):
        TwoLevelPrior(12, channels=4, num_layers=(16, 2), top_position_channels=3)


def test_dropout_per_level_only_in_training() -> None:
    """Dropout is drawn in training only: in eval mode the logits equal those of the same weights without it, so
    the samplers and the NLL are unchanged; the state dict is the same, so weights load either way."""
    torch.manual_seed(0)
    plain = TwoLevelPrior((6, 10), channels=(8, 4), num_layers=(4, 2), head_channels=(16, 8)).double()
    dropped = TwoLevelPrior((6, 10), channels=(8, 4), num_layers=(4, 2), head_channels=(16, 8), dropout=(0.5, 0.0))
    dropped.double().load_state_dict(plain.state_dict())
    assert isinstance(dropped.top.layers[0].dropout, torch.nn.Dropout) and dropped.top.layers[0].dropout.p == 0.5
    assert isinstance(dropped.bottom.layers[0].dropout, torch.nn.Identity)
    top, bottom = random_codes(3, (4, 2), (8, 4))
    dropped.eval()
    for mine, reference in zip(dropped(top, bottom), plain.eval()(top, bottom)):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    dropped.train()
    first, second = dropped(top, bottom), dropped(top, bottom)
    assert not torch.equal(first[0], second[0])  # the top level drops units at random
    torch.testing.assert_close(first[1], plain(top, bottom)[1], rtol=0, atol=0)  # the bottom level has none
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            TwoLevelPrior(6, channels=4, num_layers=2, head_channels=4, dropout=bad)
    with pytest.raises(TypeError, match="dropout"):
        TwoLevelPrior(6, channels=4, num_layers=2, head_channels=4, dropout="0.1")


def test_default_top_prior_sees_the_whole_top_map() -> None:
    # the default depth at the 1/8 top map: the last position's logits depend on every earlier code. Seeded: with
    # a random initialisation, 4 of 40 seeds gave a head whose ReLUs are all off at that position (no gradient).
    torch.manual_seed(0)
    prior = TwoLevelPrior(8, channels=4, head_channels=16, latent_shapes=((32, 16), (64, 32))).double()
    assert prior.top.num_layers == 16 and prior.top.covers((32, 16))
    codes = torch.randint(0, 8, (1, 32, 16), generator=torch.Generator().manual_seed(0))
    x = prior.top.embed(codes).detach().requires_grad_(True)
    prior.top.forward_embedded(x)[0, :, -1, -1].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert seen.view(-1)[:-1].all() and not seen[-1, -1]
    changed = codes.clone()
    changed[0, 0, 0] = (changed[0, 0, 0] + 1) % 8
    assert (prior.top(changed)[..., -1, -1] - prior.top(codes)[..., -1, -1]).abs().max() > 0


# ---------------------------------------------------------------- dependencies through TwoLevelPrior.forward


@pytest.mark.parametrize("top_shape,bottom_shape", [((3, 2), (6, 4)), ((2, 2), (8, 8))])
def test_each_level_is_causal_and_the_bottom_sees_every_top_code(top_shape: tuple, bottom_shape: tuple) -> None:
    prior = make_prior()
    top, bottom = random_codes(1, top_shape, bottom_shape)
    base_top, base_bottom = prior(top, bottom)
    for level, codes in enumerate((top, bottom)):
        flat_size = codes[0].numel()
        for p in range(flat_size):
            changed = codes.clone().view(1, -1)
            changed[:, p:] = (changed[:, p:] + 1) % (6 if level == 0 else 10)  # every position >= p
            inputs = [top, bottom]
            inputs[level] = changed.view_as(codes)
            logits = prior(*inputs)
            before = slice(0, p + 1)  # positions <= p keep their logits exactly
            assert torch.equal(
                logits[level].flatten(2)[..., before], (base_top, base_bottom)[level].flatten(2)[..., before]
            )
            if level == 1:  # bottom codes never reach the top logits
                assert torch.equal(logits[0], base_top)
    # every single top code changes the bottom logits
    for p in range(top[0].numel()):
        changed = top.clone().view(1, -1)
        changed[0, p] = (changed[0, p] + 1) % 6
        assert (prior(changed.view_as(top), bottom)[1] - base_bottom).abs().max() > 1e-6, p


# ---------------------------------------------------------------- loss, prepare_batch, metrics and engines


def structured_codes(n: int, labels: bool) -> dict:
    """Code maps with learnable structure: the bottom map repeats the top map (x2) plus a label offset."""
    gen = torch.Generator().manual_seed(5)
    top = torch.randint(0, 3, (n, 4, 2), generator=gen)
    bottom = top.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2) * 3
    label = torch.arange(n) % 2
    return {
        "top": top.to(torch.int16),
        "bottom": (bottom + label.view(n, 1, 1)).to(torch.int16),
        "labels": label if labels else torch.zeros(0, dtype=torch.long),
    }


def test_prepare_batch_and_loss() -> None:
    dataset = CodeDataset(structured_codes(4, labels=True))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    inputs, targets, args, kwargs = prepare_code_batch(batch, "cpu")
    assert inputs.dtype == torch.int64 and torch.equal(inputs, batch["top"])
    assert torch.equal(targets[0], batch["top"]) and torch.equal(targets[1], batch["bottom"])
    assert torch.equal(args[0], batch["bottom"]) and kwargs["labels"].tolist() == [0, 1, 0, 1]
    unlabelled = CodeDataset(structured_codes(2, labels=False))
    assert prepare_code_batch(torch.utils.data.default_collate([unlabelled[0]]), "cpu")[3] == {}
    prior = make_prior(num_classes=2, dtype=torch.float32)
    pred = prior(inputs, *args, **kwargs)
    expected = F.cross_entropy(pred[0], targets[0]) + F.cross_entropy(pred[1], targets[1])
    assert torch.equal(TwoLevelCrossEntropy()(pred, targets), expected)


@pytest.mark.parametrize("labels", [False, True])
def test_trainer_and_evaluator(labels: bool) -> None:
    encoded = structured_codes(8, labels)
    loader = torch.utils.data.DataLoader(CodeDataset(encoded), batch_size=4, shuffle=False)
    prior = make_prior(num_classes=2 if labels else 0, dtype=torch.float32, sharpen=False)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=10,
        train_data_loader=loader,
        network=prior,
        optimizer=torch.optim.Adam(prior.parameters(), lr=1e-2),
        loss_function=TwoLevelCrossEntropy(),
        inferer=AutocastInferer(),
        prepare_batch=prepare_code_batch,
        decollate=False,
    )
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert len(losses) == 20 and losses[-1] < 0.7 * losses[0], losses
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=loader,
        network=prior,
        inferer=AutocastInferer(),
        prepare_batch=prepare_code_batch,
        key_val_metric={"nll_bits_image": NLLBits("image")},
        additional_metrics={"nll_bits_top": NLLBits("top"), "nll_bits_bottom": NLLBits("bottom")},
        decollate=False,
    )
    evaluator.run()
    got = evaluator.state.metrics
    top, bottom = nll_bits_per_code(prior, encoded["top"], encoded["bottom"], encoded["labels"] if labels else None)
    assert got["nll_bits_top"] == pytest.approx(top, rel=1e-5)
    assert got["nll_bits_bottom"] == pytest.approx(bottom, rel=1e-5)
    assert got["nll_bits_image"] == pytest.approx(top * 8 + bottom * 32, rel=1e-5)
    # better than uniform codes on both levels: it learnt
    assert 0 < bottom < math.log2(10) and 0 < top < math.log2(6)
    # the training loss is the sum of the per-code means, in nats
    codes = (encoded["top"].long(), encoded["bottom"].long())
    with torch.no_grad():
        loss = TwoLevelCrossEntropy()(prior.eval()(*codes, encoded["labels"] if labels else None), codes)
    assert loss.item() == pytest.approx((top + bottom) * math.log(2), rel=1e-5)


def test_metric_level_names() -> None:
    with pytest.raises(ValueError, match="level"):
        NLLBits("middle")


# ---------------------------------------------------------------- two-level sampling


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_fast_equals_naive_for_both_levels(num_classes: int, temperature: float) -> None:
    prior = make_prior(num_classes=num_classes)
    labels = torch.tensor([2, 0]) if num_classes else None
    fast = sample_codes(prior, (3, 2), (6, 4), 2, temperature, seed=4, labels=labels, sampler="fast")
    naive = sample_codes(prior, (3, 2), (6, 4), 2, temperature, seed=4, labels=labels, sampler="naive")
    assert torch.equal(fast[0], naive[0]) and torch.equal(fast[1], naive[1])
    assert fast[0].shape == (2, 3, 2) and fast[1].shape == (2, 6, 4)
    assert fast[0].max() < 6 and fast[1].max() < 10
    if temperature > 0:
        assert fast[1].unique().numel() >= 3
    # each level draws from its own generator, the bottom one conditioned on the sampled top map
    top_gen, bottom_gen = level_generators(4)
    assert torch.equal(sample_fast(prior.top, (3, 2), 2, temperature, labels, top_gen), fast[0])
    bottom, logits = sample_naive(
        prior.bottom, (6, 4), 2, temperature, labels, bottom_gen, return_logits=True, cond_codes=fast[0]
    )
    assert torch.equal(bottom, fast[1])
    torch.testing.assert_close(logits, prior(fast[0], fast[1], labels)[1], rtol=0, atol=1e-10)


def test_a_top_position_map_samples_fast_as_naive_and_traces() -> None:
    torch.manual_seed(0)
    kwargs = dict(channels=8, num_layers=(3, 2), kernel_size=3, head_channels=16, cond_channels=6, cond_blocks=1)
    kwargs.update(latent_shapes=((3, 2), (6, 4)), top_position_channels=5)
    prior = TwoLevelPrior((6, 10), **kwargs).double().eval()
    with torch.no_grad():
        prior.top.head[3].weight.mul_(10.0)
    fast = sample_codes(prior, (3, 2), (6, 4), 3, 1.0, seed=4, sampler="fast")
    naive = sample_codes(prior, (3, 2), (6, 4), 3, 1.0, seed=4, sampler="naive")
    assert torch.equal(fast[0], naive[0]) and torch.equal(fast[1], naive[1])
    top_form = TopPriorLogits((6, 10), **kwargs).double().eval()
    top_form.load_state_dict(prior.state_dict(), strict=True)
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):
        traced_top = torch.jit.trace(top_form, (fast[0].double(),))
    other_top = random_codes(3, (3, 2), (6, 4), seed=1)[0]  # the trace is a function of its input
    torch.testing.assert_close(traced_top(other_top.double()), prior.top(other_top))


@pytest.mark.parametrize("saved, configured", [(0, 3), (3, 0)])
def test_a_prior_of_other_position_channels_is_refused_with_the_override_that_loads_it(
    tmp_path, saved: int, configured: int
) -> None:
    kwargs = dict(channels=4, num_layers=(3, 2), kernel_size=3, head_channels=4, latent_shapes=((3, 2), (6, 4)))
    trained = TwoLevelPrior((6, 10), **kwargs, top_position_channels=saved)
    torch.save(trained.state_dict(), tmp_path / "prior.pt")
    with pytest.raises(RuntimeError, match=f"pass --prior_top_position_channels {saved}"):
        load_weights(TwoLevelPrior((6, 10), **kwargs, top_position_channels=configured), tmp_path / "prior.pt", "cpu")
    loaded = load_weights(TwoLevelPrior((6, 10), **kwargs, top_position_channels=saved), tmp_path / "prior.pt", "cpu")
    assert torch.equal(loaded.top.head[3].weight, trained.top.head[3].weight)


def test_seeds_and_batches() -> None:
    prior = make_prior()
    a = sample_codes(prior, (3, 2), (6, 4), 4, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, sample_codes(prior, (3, 2), (6, 4), 4, seed=1)))
    assert not torch.equal(a[1], sample_codes(prior, (3, 2), (6, 4), 4, seed=2)[1])
    # drawn in two batches from continued generators: the same maps
    generators = level_generators(1)
    first = sample_codes(prior, (3, 2), (6, 4), 3, generators=generators)
    second = sample_codes(prior, (3, 2), (6, 4), 1, generators=generators)
    assert torch.equal(torch.cat([first[0], second[0]]), a[0]) and torch.equal(torch.cat([first[1], second[1]]), a[1])


# ---------------------------------------------------------------- export forms


def test_logits_forms_trace_and_load_the_prior_weights() -> None:
    prior = make_prior(num_classes=2, dtype=torch.float32).eval()
    kwargs = dict(channels=8, num_layers=(3, 2), kernel_size=3, head_channels=16, cond_channels=6, cond_blocks=1)
    top_form = TopPriorLogits((6, 10), num_classes=2, **kwargs).eval()
    bottom_form = BottomPriorLogits((6, 10), num_classes=2, **kwargs).eval()
    for form in (top_form, bottom_form):
        form.load_state_dict(prior.state_dict(), strict=True)
    top, bottom = random_codes(2, (3, 2), (6, 4))
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        expected = prior(top, bottom, labels)
        with pytest.warns(torch.jit.TracerWarning):  # the range checks are baked out of the graph
            traced_top = torch.jit.trace(top_form, (top.float(), labels))
        with pytest.warns(torch.jit.TracerWarning):
            traced_bottom = torch.jit.trace(bottom_form, (bottom.float(), top.float(), labels))
        other_top, other_bottom = random_codes(2, (3, 2), (6, 4), seed=1)
        torch.testing.assert_close(traced_top(top.float(), labels), expected[0])
        torch.testing.assert_close(traced_bottom(bottom.float(), top.float(), labels), expected[1])
        # the traces are functions of their inputs, not constants
        torch.testing.assert_close(traced_top(other_top, labels), prior.top(other_top, labels))
        torch.testing.assert_close(
            traced_bottom(other_bottom, other_top, labels), prior.bottom(other_bottom, labels, other_top)
        )
