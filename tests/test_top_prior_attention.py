"""``scripts/top_prior_attention.py``: the attention variant of the top prior is causal and reaches past the gated
stack's receptive field, and the script trains both variants end to end and writes a complete record."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import top_prior_attention  # noqa: E402

SMALL = {
    "num_embeddings": [8],
    "prior_channels": [8],
    "prior_layers": [1],
    "prior_kernel_size": 3,
    "prior_head_channels": 8,
}


def _small_prior(heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return top_prior_attention.top_prior(SMALL, (4, 5), heads).eval()


@torch.no_grad()
def test_attention_variant_sees_only_earlier_codes() -> None:
    prior = _small_prior(heads=2)
    codes = torch.randint(0, 8, (2, 4, 5))
    logits = prior(codes).flatten(2)
    for position in range(20):
        changed = codes.clone().flatten(1)
        changed[:, position:] = (changed[:, position:] + 1 + torch.randint(0, 7, changed[:, position:].shape)) % 8
        moved = (prior(changed.view(2, 4, 5)).flatten(2) - logits).abs().amax(dim=(0, 1))
        assert moved[: position + 1].max() < 1e-5, f"a logit at or before {position} saw a later code"
        if position < 19:
            assert moved[position + 1 :].max() > 1e-4, f"no later logit saw the code at {position}"


@torch.no_grad()
def test_attention_reaches_codes_the_gated_stack_does_not_see() -> None:
    codes = torch.randint(0, 8, (1, 4, 5))
    first_changed = codes.clone()
    first_changed[0, 0, 0] = (codes[0, 0, 0] + 1) % 8
    for heads, reaches in ((0, False), (2, True)):
        prior = _small_prior(heads)
        # one gated layer of kernel 3 sees two rows up: the last position cannot see the first one without attention
        moved = (prior(first_changed) - prior(codes))[0, :, 3, 4].abs().max().item()
        assert (moved > 1e-4) is reaches, (heads, moved)


def test_both_variants_train_end_to_end(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    # each map repeats one of four rows: learnable, so the validation NLL falls below uniform (6 bits for 64 codes)
    rows = torch.randint(0, 64, (4, 1, 4), generator=generator)
    for split, count in (("train", 48), ("validate", 16), ("test", 16)):
        top = rows[torch.randint(0, 4, (count,), generator=generator)].expand(count, 4, 4).clone()
        torch.save({"top": top, "bottom": torch.zeros(count, 8, 8, dtype=torch.long)}, tmp_path / f"{split}.pt")
    out = tmp_path / "attention.json"
    args = ["--codes_dir", str(tmp_path), "--seeds", "0", "1", "--epochs", "3", "--heads", "2", "--json", str(out)]
    result = top_prior_attention.main(args)

    text = out.read_text()
    assert text == json.dumps(json.loads(text), indent=4) + "\n" and json.loads(text) == result
    assert result["train_maps"] == 48 and result["config"]["num_embeddings"][0] == 64
    assert result["command"].endswith(" ".join(args)) and result["machine"]["cpu_cores"] >= 1
    gated, attention = (result["runs"][variant] for variant in top_prior_attention.VARIANTS)
    assert [r["seed"] for r in gated] == [r["seed"] for r in attention] == [0, 1]
    for run in gated + attention:
        history = run["validation_nll_bits"]
        assert 1 <= len(history) <= 3 and all(math.isfinite(v) and v > 0 for v in history)
        assert history[run["best_epoch"] - 1] == min(history) < 6.0
        assert 0 < run["test_nll_bits"] < 12 and run["seconds"] > 0
    assert attention[0]["parameters"] > gated[0]["parameters"]
    for variant, runs in result["runs"].items():
        assert result["mean_test_nll_bits"][variant] == pytest.approx(sum(r["test_nll_bits"] for r in runs) / 2, 1e-3)


def test_an_overlay_sets_the_sizes_and_schedule(tmp_path: Path) -> None:
    overlay = tmp_path / "gpu.json"
    overlay.write_text(json.dumps({"prior_channels": [128, 96], "prior_batch_size": 64}))
    default, overlaid = top_prior_attention.read_config(), top_prior_attention.read_config([str(overlay)])
    assert overlaid == {**default, "prior_channels": [128, 96], "prior_batch_size": 64} != default
    gpu = top_prior_attention.read_config([str(ROOT / "configs" / "hipmri_gpu.json")])
    assert gpu["num_embeddings"] == [512, 512] and gpu["prior_layers"] == [16, 12]
