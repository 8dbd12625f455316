"""Generation with the two-level prior: sampling and decoding, NLL per level, the report and the grid writer,
with a stand-in two-level VQ-VAE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine

from bundle.evaluation.generation_report import (
    _realism_report,
    generation_report,
    nll_bits_per_code,
    reconstruct,
    training_references,
    vqvae2_feature_maps,
)
from bundle.stage1_vqvae.vqvae2 import VQVAE2
from bundle.stage2_prior import generation
from bundle.stage2_prior.codes import encode_dataset
from bundle.stage2_prior.generation import generate, save_samples
from bundle.stage2_prior.sample_grid import SampleGridWriter
from bundle.stage2_prior.sampling import sample_codes, sample_level
from bundle.stage2_prior.two_level import TwoLevelPrior

from two_level_stand_in import SHAPES, TinyTwoLevelVQVAE, tiny_prior


def make_pair(num_classes: int = 0, latent_shapes: tuple | None = SHAPES) -> tuple[TinyTwoLevelVQVAE, TwoLevelPrior]:
    torch.manual_seed(0)
    vqvae = TinyTwoLevelVQVAE().eval()
    return vqvae, tiny_prior(num_classes, latent_shapes)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: tuple[int, int], seed: int, labels: bool = False) -> None:
        self.data = [{"image": f"img_{seed}_{i}.nii.gz"} for i in range(n)]
        self.images = torch.rand(n, 1, *size, generator=torch.Generator().manual_seed(seed))
        self.labels = labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], **({"label": i % 2} if self.labels else {})}


def test_generate_decodes_the_sampled_codes_and_is_seeded() -> None:
    vqvae, prior = make_pair()
    images, top, bottom = generate(vqvae, prior, 5, seed=3, batch_size=2)
    assert images.shape == (5, 1, 32, 16) and top.shape == (5, 4, 2) and bottom.shape == (5, 8, 4)
    with torch.no_grad():
        assert torch.equal(images, vqvae.decode_samples(top, bottom).clamp(0, 1))
    # the codes are those of the two-level sampler for the seed, whatever the batch size
    expected = sample_codes(prior, *SHAPES, 5, seed=3)
    assert torch.equal(top, expected[0]) and torch.equal(bottom, expected[1])
    again = generate(vqvae, prior, 5, seed=3, batch_size=5)
    assert all(torch.equal(a, b) for a, b in zip(again, (images, top, bottom)))
    assert not torch.equal(generate(vqvae, prior, 5, seed=4)[2], bottom)
    # shapes passed explicitly win over the prior's
    _, unshaped = make_pair(latent_shapes=None)
    with pytest.raises(ValueError, match="latent shapes are unknown"):
        generate(vqvae, unshaped, 1)
    assert generate(vqvae, unshaped, 2, latent_shapes=((2, 3), (4, 6)))[0].shape == (2, 1, 16, 24)


def test_generate_labels() -> None:
    vqvae, prior = make_pair(num_classes=2)
    _, top_a, bottom_a = generate(vqvae, prior, 4, seed=1, label=1)
    _, top_b, bottom_b = generate(vqvae, prior, 4, seed=1)  # cycles 0, 1, 0, 1
    assert torch.equal(top_a[1], top_b[1]) and torch.equal(bottom_a[3], bottom_b[3])
    assert not torch.equal(bottom_a, bottom_b)
    with pytest.raises(ValueError, match="outside"):
        generate(vqvae, prior, 1, label=2)
    with pytest.raises(ValueError, match="not conditioned"):
        generate(*make_pair(), 1, label=0)


def test_nll_bits_per_code_per_level() -> None:
    _, prior = make_pair(num_classes=2)
    gen = torch.Generator().manual_seed(0)
    top, bottom = torch.randint(0, 6, (5, 4, 2), generator=gen), torch.randint(0, 10, (5, 8, 4), generator=gen)
    labels = torch.tensor([0, 1, 1, 0, 1])
    prior.train()
    got = nll_bits_per_code(prior, top.to(torch.int16), bottom.to(torch.int16), labels, batch_size=2)
    assert prior.training  # mode restored
    with torch.no_grad():
        top_logits, bottom_logits = prior(top, bottom, labels)
    assert got[0] == pytest.approx(F.cross_entropy(top_logits, top).item() / math.log(2), rel=1e-6)
    assert got[1] == pytest.approx(F.cross_entropy(bottom_logits, bottom).item() / math.log(2), rel=1e-6)


def test_generation_report(tmp_path: Path) -> None:
    # 128 x 128 images: MS-SSIM needs sides of at least 112; a real tiny VQ-VAE-2 gives the encoder features
    torch.manual_seed(0)
    vqvae = VQVAE2(channels=(8, 16), num_res_channels=8, embedding_dim=8, num_embeddings=(6, 10), return_loss=False)
    vqvae = vqvae.eval()
    _, prior = make_pair(latent_shapes=None)
    shapes = vqvae.latent_shapes((128, 128))
    train, test = _Images(10, (128, 128), seed=1), _Images(8, (128, 128), seed=2)
    torch.save(vqvae.state_dict(), tmp_path / "model.pt")
    test_codes = encode_dataset(vqvae, test, tmp_path / "test.pt", tmp_path / "model.pt", "cpu")
    report = generation_report(vqvae, prior, train, test, test_codes, tmp_path, num_samples=8, latent_shapes=shapes)
    assert report == json.loads((tmp_path / "generation_metrics.json").read_text())
    assert report["num_samples"] == 8
    top, bottom = nll_bits_per_code(prior, test_codes["top"], test_codes["bottom"])
    assert (report["nll_bits_top"], report["nll_bits_bottom"]) == (top, bottom)
    assert report["nll_bits_image"] == pytest.approx(top * 16 * 16 + bottom * 32 * 32)
    for key in ("fid", "fid_real_baseline", "kid", "kid_real_baseline"):
        assert math.isfinite(report[key]), key
    for key in ("diversity_ms_ssim", "memorisation_ssim_mean", "memorisation_ssim_max"):
        assert -1.0 <= report[key] <= 1.0, key
    _, sampled_top, _ = generate(vqvae, prior, 8, seed=0, latent_shapes=shapes)
    assert report["code_histogram_top"]["used_a"] == sampled_top.unique().numel()
    assert report["code_histogram_bottom"]["used_b"] == test_codes["bottom"].unique().numel()
    assert 0.0 <= report["code_histogram_bottom"]["js_divergence"] <= 1.0
    # realism: 4 test slices per class, so the accuracy is a multiple of 1/8; precision/recall are fractions
    for name in ("", "_real_baseline", "_reconstruction_baseline", "_real_top_baseline"):
        assert report[f"c2st_accuracy{name}"] * 8 == pytest.approx(round(report[f"c2st_accuracy{name}"] * 8))
        for key in ("precision", "recall", "coverage"):
            assert 0.0 <= report[f"{key}{name}"] <= 1.0, key + name
    assert report["c2st_test_slices_per_class"] == 4
    assert (tmp_path / "samples_vs_real.png").is_file()


def _tiny_vqvae2_and_blobs() -> tuple[VQVAE2, torch.Tensor, torch.Tensor]:
    """A tiny VQ-VAE-2 (eval mode), 24 Gaussian blob images ``[24, 1, 64, 32]`` and 12 noise images."""
    torch.manual_seed(0)
    vqvae = VQVAE2(channels=(8, 16), num_res_channels=8, embedding_dim=8, num_embeddings=(6, 10), return_loss=False)
    vqvae = vqvae.eval()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 32), indexing="ij")
    centres = torch.rand(24, 2, generator=torch.Generator().manual_seed(3)) * 0.6 - 0.3
    blobs = torch.stack([torch.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / 0.1) for c in centres])[:, None]
    noise = torch.rand(12, 1, 64, 32, generator=torch.Generator().manual_seed(4))
    return vqvae, blobs, noise


def test_realism_report_separates_unlike_sets_and_matches_like_ones() -> None:
    """Samples that are the test slices themselves score like real data; pure noise is told apart and has no
    precision."""
    vqvae, blobs, noise = _tiny_vqvae2_and_blobs()
    real_test, real_train = blobs[:12], blobs[12:]
    with torch.no_grad():
        like = _realism_report(real_test, real_test, real_train, vqvae2_feature_maps(vqvae), torch.device("cpu"), 0)
        unlike = _realism_report(noise, real_test, real_train, vqvae2_feature_maps(vqvae), torch.device("cpu"), 0)
    assert like["precision"] == 1.0 and like["recall"] == 1.0  # the same points: every ball holds its centre
    assert unlike["c2st_accuracy"] >= 0.9 and unlike["precision"] == 0.0
    assert like["c2st_accuracy_real_baseline"] == unlike["c2st_accuracy_real_baseline"]
    assert not any(key.endswith("_reconstruction_baseline") for key in like)


def test_reconstruction_baseline_scores_the_reconstructions_and_leaves_the_rest_alone() -> None:
    vqvae, blobs, noise = _tiny_vqvae2_and_blobs()
    real_test, real_train, samples = blobs[:12], blobs[12:], blobs[12:].flip(-1)
    features, cpu = vqvae2_feature_maps(vqvae), torch.device("cpu")
    with torch.no_grad():
        plain = _realism_report(samples, real_test, real_train, features, cpu, 0)
        perfect = _realism_report(
            samples, real_test, real_train, features, cpu, 0, references={"reconstruction": real_train}
        )
        broken = _realism_report(samples, real_test, real_train, features, cpu, 0, references={"reconstruction": noise})
        reconstructed = reconstruct(vqvae, real_train, batch_size=5)
        expected = vqvae(real_train).clamp(0, 1)
    # the figures of the samples and of real vs real do not change when the reference is added
    assert {k: v for k, v in perfect.items() if not k.endswith("_reconstruction_baseline")} == plain
    # a decoder that gave the slices back exactly scores as the real slices do; one that gave noise fails
    for key in ("c2st_accuracy", "precision", "recall", "density", "coverage"):
        assert perfect[f"{key}_reconstruction_baseline"] == perfect[f"{key}_real_baseline"], key
    assert broken["c2st_accuracy_reconstruction_baseline"] >= 0.9 and broken["precision_reconstruction_baseline"] == 0
    assert reconstructed.shape == real_train.shape and torch.allclose(reconstructed, expected, atol=1e-6)


def test_real_top_reference_keeps_the_top_codes_and_draws_the_bottom_ones() -> None:
    """The real-top reference decodes each slice's own top codes with bottom codes the bottom prior draws given them,
    seeded; it is made for an unlabelled prior only."""
    vqvae, prior = make_pair()
    images = torch.rand(5, 1, 32, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        top, own_bottom = vqvae.index_quantize(images)
        drawn = sample_level(prior.bottom, (8, 4), 5, 0.8, None, torch.Generator().manual_seed(3), cond_codes=top)
        redrawn = reconstruct(vqvae, images, batch_size=5, bottom_prior=prior.bottom, temperature=0.8, seed=3)
        assert torch.equal(redrawn, vqvae.decode_samples(top, drawn).clamp(0, 1))
        assert not torch.equal(drawn, own_bottom)
        references = training_references(vqvae, prior, images, 0.8, 3)
    assert list(references) == ["reconstruction", "real_top"] and torch.equal(references["real_top"], redrawn)
    assert torch.equal(references["reconstruction"], vqvae.decode_samples(top, own_bottom).clamp(0, 1))
    assert list(training_references(vqvae, make_pair(num_classes=2)[1], images, 0.8, 3)) == ["reconstruction"]
    assert list(training_references(vqvae, None, images, 0.8, 3)) == ["reconstruction"]


def test_save_samples_and_grid_writer(tmp_path: Path) -> None:
    vqvae, prior = make_pair()
    images, _, _ = generate(vqvae, prior, 3)
    paths = save_samples(images, tmp_path / "samples")
    assert [Path(p).name for p in paths] == [
        "sample_000.nii.gz",
        "sample_001.nii.gz",
        "sample_002.nii.gz",
        "samples.png",
    ]
    writer = SampleGridWriter(vqvae, torch.nn.DataParallel(prior), None, str(tmp_path / "grid.png"), num_samples=2)
    assert writer.prior is prior
    engine = Engine(lambda e, b: None)
    writer.attach(engine)
    engine.run([0], max_epochs=1)
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("max_epochs, expected_epochs", [(4, [2, 4]), (5, [2, 4, 5])])
def test_grid_writer_draws_each_epoch_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_epochs: int, expected_epochs: list[int]
) -> None:
    """A grid every ``interval`` epochs and at the end, but a run that ends on such an epoch draws it once."""
    vqvae, prior = make_pair()
    engine = Engine(lambda e, b: None)
    drawn = []

    def counting_generate(*args, **kwargs):
        drawn.append(engine.state.epoch)
        return generate(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", counting_generate)
    SampleGridWriter(vqvae, prior, None, str(tmp_path / "grid.png"), num_samples=1, interval=2).attach(engine)
    engine.run([0], max_epochs=max_epochs)
    assert drawn == expected_epochs
    assert (tmp_path / "grid.png").is_file()
