"""Sampling runs: bad arguments are named, large runs are written batch by batch, non-finite samples are errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bundle.stage2_prior.generation import generate, sample_to_files, save_samples
from bundle.stage2_prior.two_level import TwoLevelPrior

from two_level_stand_in import TinyTwoLevelVQVAE, tiny_prior


@pytest.fixture(scope="module")
def pair() -> tuple[TinyTwoLevelVQVAE, TwoLevelPrior]:
    return TinyTwoLevelVQVAE().eval(), tiny_prior(head_scales=(1.0, 1.0)).eval()


@pytest.mark.parametrize(
    "argument, value, expected",
    [
        ("num_samples", 0, "num_samples must be a whole number >= 1, got 0"),
        ("num_samples", -3, "num_samples must be a whole number >= 1, got -3"),
        ("num_samples", 2.5, "num_samples must be a whole number >= 1, got 2.5"),
        ("num_samples", True, "num_samples must be a whole number >= 1, got True"),
        ("temperature", math.nan, "temperature must be finite, got nan"),
        ("temperature", math.inf, "temperature must be finite, got inf"),
        ("temperature", -0.5, "temperature must be >= 0 (0 means argmax), got -0.5"),
        ("temperature", 1e-320, "temperature 1e-320 is too small to divide the logits by; use 0 for argmax"),
        ("temperature", "hot", "temperature must be a number, got 'hot'"),
        ("seed", -1, "seed must be a whole number from 0 to 2**64 - 1, got -1"),
        ("seed", 1.5, "seed must be a whole number from 0 to 2**64 - 1, got 1.5"),
        ("seed", 2**64, "seed must be a whole number from 0 to 2**64 - 1, got 18446744073709551616"),
        ("batch_size", 0, "batch_size must be a whole number >= 1, got 0"),
    ],
)
def test_bad_sampling_arguments_are_named(pair, argument: str, value, expected: str) -> None:
    arguments = {"num_samples": 2, "temperature": 1.0, "seed": 0, "batch_size": 2, argument: value}
    with pytest.raises(ValueError) as error:
        generate(*pair, **arguments)
    assert expected in str(error.value)


def test_several_bad_arguments_are_named_together(pair) -> None:
    with pytest.raises(ValueError, match=r"num_samples .* got 0; temperature must be finite, got inf; seed .* got -2"):
        generate(*pair, num_samples=0, temperature=math.inf, seed=-2)


def test_a_large_run_is_written_batch_by_batch(pair, tmp_path: Path, monkeypatch) -> None:
    vqvae, prior = pair
    on_disk_at_each_decode = []
    decode = vqvae.decode_samples

    def counting_decode(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        on_disk_at_each_decode.append(len(list(tmp_path.glob("sample_*.nii.gz"))))
        return decode(top, bottom)

    monkeypatch.setattr(vqvae, "decode_samples", counting_decode)
    paths = sample_to_files(vqvae, prior, tmp_path, num_samples=10, seed=3, batch_size=4, grid_count=6, progress=False)
    assert on_disk_at_each_decode == [0, 4, 8], "each batch is written before the next is sampled"
    assert [Path(p).name for p in paths] == [f"sample_{i:03d}.nii.gz" for i in range(10)] + ["samples.png"]
    monkeypatch.undo()
    # the same files as sampling everything in memory, and a grid of the first six slices
    images, _, _ = generate(vqvae, prior, 10, seed=3, batch_size=4)
    reference = save_samples(images[:6], tmp_path / "reference")
    for index in range(6):
        assert Path(paths[index]).read_bytes() == Path(reference[index]).read_bytes()
    assert Path(paths[-1]).read_bytes() == Path(reference[-1]).read_bytes()
    import bundle.stage2_prior.generation as generation

    monkeypatch.setattr(generation, "atomic_write_bytes", lambda path, data, durable=True: None)  # names only
    wide = sample_to_files(
        vqvae, prior, tmp_path / "wide", num_samples=1001, seed=3, batch_size=1001, grid_count=0, progress=False
    )
    assert Path(wide[0]).name == "sample_0000.nii.gz" and Path(wide[-1]).name == "sample_1000.nii.gz"


def test_samples_that_decode_to_nan_are_an_error_naming_them(pair, tmp_path: Path, monkeypatch) -> None:
    vqvae, prior = pair
    monkeypatch.setattr(vqvae, "decode_samples", lambda top, bottom: torch.full((len(top), 1, 32, 16), math.nan))
    with pytest.raises(FloatingPointError, match="samples 0 to 2 of seed 5 decode to NaN or Inf values"):
        sample_to_files(vqvae, prior, tmp_path, num_samples=5, seed=5, batch_size=3, progress=False)
    assert list(tmp_path.iterdir()) == []
