"""Anomaly detection with the two-level prior: healing, maps, thresholds, synthetic lesions, metrics, and the
``anomaly`` and ``evaluating`` workflows end to end on a tiny trained model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_average_precision
from PIL import Image

from bundle.anomaly.detection import AnomalyDetector, image_score
from bundle.anomaly.healing import code_nll, heal_codes, heal_level, level_nll, uniforms
from bundle.anomaly.lesions import body_mask, insert_lesion, lesion_weight
from bundle.anomaly.metrics import average_precision, best_dice, image_auroc
from bundle.anomaly.threshold import calibrate, parse_threshold, resolve_thresholds, save_calibration
from bundle.stage2_prior.sampling import pick_codes, sample_fast
from bundle.stage2_prior.two_level import TwoLevelPrior

from conftest import TINY_NETWORK, TINY_PRIOR, copy_models, run_bundle
from two_level_stand_in import SHAPES, TinyTwoLevelVQVAE, tiny_prior


def make_prior(num_classes: int = 0) -> TwoLevelPrior:
    return tiny_prior(num_classes).eval()


def random_codes(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6, (n, *SHAPES[0]), generator=gen), torch.randint(0, 10, (n, *SHAPES[1]), generator=gen)


def naive_heal(model, codes, resample, draws, cond_codes=None, labels=None) -> torch.Tensor:
    """Healing by one full forward pass per position: the reference for the cached healer."""
    codes = codes.clone()
    with torch.no_grad():
        for i in range(codes.shape[1]):
            for j in range(codes.shape[2]):
                logits = model(codes, labels, cond_codes)[:, :, i, j]
                drawn = pick_codes(logits, draws[:, i, j].contiguous(), 1.0)
                codes[:, i, j] = torch.where(resample[:, i, j], drawn, codes[:, i, j])
    return codes


# ------------------------------------------------------------------------------------------------------------------
# healing
# ------------------------------------------------------------------------------------------------------------------


def test_healing_every_code_is_sampling() -> None:
    prior = make_prior()
    top, bottom = random_codes(3)
    draws = torch.rand(3, *SHAPES[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    everything = torch.ones_like(bottom, dtype=torch.bool)
    healed = heal_level(prior.bottom, bottom, everything, draws, cond_codes=top)
    sampled = sample_fast(prior.bottom, SHAPES[1], 3, generator=torch.Generator().manual_seed(5), cond_codes=top)
    assert torch.equal(healed, sampled)


@pytest.mark.parametrize("level", ["top", "bottom"])
def test_healing_keeps_unmarked_codes_and_draws_the_marked_ones_like_the_naive_reference(level: str) -> None:
    prior = make_prior(num_classes=2)
    top, bottom = random_codes(3)
    labels = torch.tensor([0, 1, 1])
    model, codes, cond = (prior.top, top, None) if level == "top" else (prior.bottom, bottom, top)
    gen = torch.Generator().manual_seed(2)
    resample = torch.rand(codes.shape, generator=gen) < 0.3
    resample[1] = False  # a map with nothing to heal in a batch with others
    draws = torch.rand(codes.shape, generator=gen, dtype=torch.float64)
    healed = heal_level(model, codes, resample, draws, labels=labels, cond_codes=cond)
    assert torch.equal(healed[~resample], codes[~resample])
    assert torch.equal(healed, naive_heal(model, codes, resample, draws, cond, labels))
    assert not torch.equal(healed[resample], codes[resample])  # the draws did change codes
    nothing = torch.zeros_like(resample)
    assert torch.equal(heal_level(model, codes, nothing, draws, labels=labels, cond_codes=cond), codes)


def test_heal_codes_resamples_exactly_the_codes_above_the_thresholds() -> None:
    prior = make_prior()
    top, bottom = random_codes(4)
    top_nll, bottom_nll = code_nll(prior, top, bottom)
    thresholds = (float(top_nll.quantile(0.7)), float(bottom_nll.quantile(0.8)))

    only_bottom = heal_codes(prior, top, bottom, thresholds, levels="bottom", seed=3)
    assert torch.equal(only_bottom.healed_top, top) and not only_bottom.top_resampled.any()
    assert torch.equal(only_bottom.bottom_resampled, bottom_nll > thresholds[1])
    changed = only_bottom.healed_bottom != bottom
    assert changed.any() and not (changed & ~only_bottom.bottom_resampled).any()

    both = heal_codes(prior, top, bottom, thresholds, levels="both", seed=3)
    assert torch.equal(both.top_resampled, top_nll > thresholds[0])
    top_changed = both.healed_top != top
    assert top_changed.any() and not (top_changed & ~both.top_resampled).any()
    # the bottom codes are judged again under the healed top codes
    rescored = level_nll(prior.bottom, bottom, None, both.healed_top)
    assert torch.allclose(both.bottom_nll_healed_top, rescored)
    assert torch.equal(both.bottom_resampled, rescored > thresholds[1])
    assert not ((both.healed_bottom != bottom) & ~both.bottom_resampled).any()


def test_an_image_is_healed_alike_in_any_batch() -> None:
    prior = make_prior()
    top, bottom = random_codes(5)
    thresholds = (3.0, 3.0)
    batch = heal_codes(prior, top, bottom, thresholds, levels="both", seed=9)
    alone = heal_codes(prior, top[3:4], bottom[3:4], thresholds, levels="both", seed=9)
    assert torch.equal(batch.healed_top[3:4], alone.healed_top)
    assert torch.equal(batch.healed_bottom[3:4], alone.healed_bottom)
    again = uniforms(torch.Generator().manual_seed(0), (2, 3), 4)
    assert again.shape == (4, 2, 3) and torch.equal(again[0], again[3])


def test_code_nll_is_the_cross_entropy_of_each_code() -> None:
    prior = make_prior()
    top, bottom = random_codes(2)
    top_nll, bottom_nll = code_nll(prior, top, bottom)
    with torch.no_grad():
        top_logits, bottom_logits = prior(top, bottom)
    expected = -torch.log_softmax(bottom_logits, 1).gather(1, bottom[:, None])[:, 0] / math.log(2)
    assert torch.allclose(bottom_nll, expected, atol=1e-5)
    assert torch.allclose(top_nll.mean(), torch.nn.functional.cross_entropy(top_logits, top) / math.log(2))


# ------------------------------------------------------------------------------------------------------------------
# maps and scores
# ------------------------------------------------------------------------------------------------------------------


def make_detector(thresholds=(3.0, 2.0), **kwargs) -> AnomalyDetector:
    torch.manual_seed(0)
    return AnomalyDetector(TinyTwoLevelVQVAE().eval(), make_prior(), thresholds, **kwargs)


def test_gated_map_is_zero_where_nothing_was_resampled() -> None:
    images = torch.rand(3, 1, 32, 16, generator=torch.Generator().manual_seed(0))
    result = make_detector(levels="both", gated=True, sigma=1.0)(images)
    resampled = result.resampled.bool()
    assert resampled.any() and not resampled.all()
    assert torch.all(result.anomaly_map[~resampled] == 0)
    assert torch.equal(result.anomaly_map[resampled], result.residual[resampled])
    assert (result.residual[~resampled] > 0).any()  # the gate, not the residual, made those pixels zero
    # the gate is the upsampled union of the resampled codes of both levels
    top_pixels = result.codes.top_resampled.repeat_interleave(8, 1).repeat_interleave(8, 2)
    bottom_pixels = result.codes.bottom_resampled.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(resampled[:, 0], top_pixels | bottom_pixels)
    ungated = make_detector(levels="both", gated=False, sigma=1.0)(images)
    assert torch.equal(ungated.anomaly_map, ungated.residual) and torch.equal(ungated.residual, result.residual)


def test_with_nothing_above_the_threshold_the_healed_image_is_the_reconstruction() -> None:
    images = torch.rand(2, 1, 32, 16, generator=torch.Generator().manual_seed(1))
    result = make_detector(thresholds=(1e9, 1e9), levels="both", sigma=0.0)(images)
    assert torch.equal(result.healed, result.reconstruction)
    assert torch.all(result.anomaly_map == 0) and not result.resampled.any()
    assert torch.allclose(result.residual, (images - result.reconstruction).abs())
    assert torch.equal(result.reconstruction_error, result.residual)


def test_image_score_and_nll_map() -> None:
    top_nll = torch.tensor([[[1.0, 9.0]]])
    bottom_nll = torch.tensor([[[2.0, 3.0, 7.0, 4.0]]])
    assert image_score(top_nll, bottom_nll, 2).tolist() == [8.0]
    assert image_score(top_nll, bottom_nll, 100).tolist() == [pytest.approx(26.0 / 6)]
    images = torch.rand(1, 1, 32, 16, generator=torch.Generator().manual_seed(2))
    result = make_detector()(images)
    top_nll, bottom_nll = result.codes.top_nll, result.codes.bottom_nll
    assert result.nll_map.shape == (1, 1, 32, 16)
    assert result.nll_map[0, 0, 9, 5] == pytest.approx(float(top_nll[0, 1, 0] + bottom_nll[0, 2, 1]))


# ------------------------------------------------------------------------------------------------------------------
# metrics on hand-made cases
# ------------------------------------------------------------------------------------------------------------------


def test_average_precision_known_answers_and_monai() -> None:
    # thresholds 0.9, 0.8, 0.7: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # a tie admits all three at once: precision 2/3 at recall 1
    assert average_precision(torch.tensor([0.5, 0.5, 0.5, 0.1]), torch.tensor([1, 0, 1, 0])) == pytest.approx(2 / 3)
    assert average_precision(torch.tensor([[0.2, 0.9], [0.8, 0.1]]), torch.tensor([[0, 1], [1, 0]])) == 1.0
    assert math.isnan(average_precision(torch.rand(5), torch.zeros(5)))
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 12, (2000,), generator=gen).float()
    labels = (torch.rand(2000, generator=gen) < 0.1).long()
    assert average_precision(scores, labels) == pytest.approx(compute_average_precision(scores, labels), abs=1e-12)


def test_best_dice_known_answers() -> None:
    # score >= 0.7 predicts 3 pixels, 2 of them right, of 2 positives: Dice 4/5 (better than 0.9's 2/3)
    assert best_dice(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0])) == pytest.approx((0.8, 0.7))
    maps = torch.zeros(2, 1, 4, 4)
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    masks[0, 0, 1:3, 1:3] = True
    maps[0, 0, 1:3, 1:3] = 0.6
    maps[1, 0, 0, 0] = 0.4  # a weaker false positive on the other slice
    assert best_dice(maps, masks) == (1.0, pytest.approx(0.6))
    maps[1, 0, 0, 0] = 0.9  # now above the lesion: the best threshold still admits the lesion, with one error
    assert best_dice(maps, masks)[0] == pytest.approx(2 * 4 / (5 + 4))


def test_image_auroc_known_answers() -> None:
    assert image_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert image_auroc(torch.tensor([0.3, 0.3, 0.3, 0.3]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.5)
    assert image_auroc(torch.tensor([0.0, 1.0]), torch.tensor([0, 1])) == 1.0


# ------------------------------------------------------------------------------------------------------------------
# synthetic lesions
# ------------------------------------------------------------------------------------------------------------------


def body_slice() -> torch.Tensor:
    rows, columns = torch.meshgrid(torch.arange(96.0), torch.arange(64.0), indexing="ij")
    body = ((rows - 48) / 44) ** 2 + ((columns - 32) / 28) ** 2 < 1
    return (body * (0.5 + 0.05 * torch.sin(rows / 5)))[None].float()


def test_lesions_are_deterministic_bright_or_dark_with_soft_edges() -> None:
    image = body_slice()
    first, mask, lesion = insert_lesion(image, seed=4, index=0)
    again, mask_again, _ = insert_lesion(image, seed=4, index=0)
    assert torch.equal(first, again) and torch.equal(mask, mask_again)
    assert not torch.equal(insert_lesion(image, seed=5, index=0)[1], mask)
    assert lesion.bright and mask.any()
    assert first[mask].mean() > image[mask].mean() + 0.2
    dark, dark_mask, dark_lesion = insert_lesion(image, seed=4, index=1)
    assert not dark_lesion.bright and dark[dark_mask].mean() < image[dark_mask].mean() - 0.2
    weight = torch.from_numpy(lesion_weight((96, 64), lesion))
    body = torch.from_numpy(body_mask(image[0].numpy()))
    assert torch.equal(mask[0], (weight >= 0.5) & body)
    for lesioned in (first, dark):  # never in the background
        assert torch.equal(lesioned[0][~body], image[0][~body])
    edge = (weight > 0.05) & (weight < 0.95)
    assert edge.any(), "the edge is soft"
    far = weight < 1e-6
    assert torch.allclose(first[0][far], image[0][far], atol=1e-6)
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0


def test_lesion_sizes_span_a_few_pixels_to_a_large_part_of_an_organ() -> None:
    image = body_slice()
    radii = [max(insert_lesion(image, seed=0, index=i)[2].radii) for i in range(60)]
    areas = [int(insert_lesion(image, seed=0, index=i)[1].sum()) for i in range(0, 60, 6)]
    assert min(radii) < 3.0 and max(radii) > 15.0
    assert all(1.5 <= r <= 24.0 for r in radii)
    assert min(areas) < 30 and max(areas) > 200


# ------------------------------------------------------------------------------------------------------------------
# threshold calibration
# ------------------------------------------------------------------------------------------------------------------


def test_calibrate_takes_the_quantile_of_each_level() -> None:
    prior = make_prior()
    top, bottom = random_codes(7)
    encoded = {"top": top.to(torch.int16), "bottom": bottom.to(torch.int16), "labels": torch.zeros(0)}
    result = calibrate(prior, encoded, quantile=0.9, batch_size=3)
    top_nll, bottom_nll = code_nll(prior, top, bottom)
    assert result["top"] == pytest.approx(float(np.quantile(top_nll.numpy(), 0.9)), rel=1e-6)
    assert result["bottom"] == pytest.approx(float(np.quantile(bottom_nll.numpy(), 0.9)), rel=1e-6)
    assert result["num_images"] == 7 and result["mean_nll"]["bottom"] == pytest.approx(float(bottom_nll.mean()))
    with pytest.raises(ValueError, match="quantile"):
        calibrate(prior, encoded, quantile=1.0)


def test_thresholds_override_stored_and_stale(tmp_path: Path) -> None:
    weights = [tmp_path / "model.pt", tmp_path / "prior.pt"]
    for i, path in enumerate(weights):
        path.write_bytes(bytes([i]) * 10)
    path = tmp_path / "anomaly_threshold.json"
    calls = []

    def calibration() -> dict:
        calls.append(1)
        return {"top": 5.0 + len(calls), "bottom": 4.0, "quantile": 0.99, "num_images": 3}

    assert resolve_thresholds(None, path, calibration, weights) == (6.0, 4.0) and len(calls) == 1
    assert json.loads(path.read_text())["weights"]["prior"]
    assert resolve_thresholds(None, path, calibration, weights) == (6.0, 4.0) and len(calls) == 1  # stored
    assert resolve_thresholds(2.5, path, calibration, weights) == (2.5, 2.5) and len(calls) == 1
    assert resolve_thresholds("[3, 1.5]", path, calibration, weights) == (3.0, 1.5)
    weights[1].write_bytes(b"retrained")
    assert resolve_thresholds(None, path, calibration, weights) == (7.0, 4.0) and len(calls) == 2  # stale
    save_calibration(path, {"top": 1.0, "bottom": 2.0, "quantile": 0.5, "num_images": 1}, weights)
    assert resolve_thresholds(None, path, calibration, weights) == (1.0, 2.0)
    assert resolve_thresholds(None, path, calibration, weights, {"quantile": 0.5}) == (1.0, 2.0)
    assert resolve_thresholds(None, path, calibration, weights, {"quantile": 0.99}) == (8.0, 4.0)  # other settings
    assert len(calls) == 3 and json.loads(path.read_text())["quantile"] == 0.99
    for bad in ("[1, 2, 3]", "high", [1.0]):
        with pytest.raises(ValueError, match="threshold"):
            parse_threshold(bad)


# ------------------------------------------------------------------------------------------------------------------
# a lesion raises the score: a prior fitted to the codes of clean slices
# ------------------------------------------------------------------------------------------------------------------


def clean_slices(count: int, gen: torch.Generator) -> torch.Tensor:
    """32 x 16 slices: an elliptic body of uniform tissue with a little noise, slightly moved from slice to slice."""
    rows, columns = torch.meshgrid(torch.arange(32.0), torch.arange(16.0), indexing="ij")
    slices = []
    for _ in range(count):
        dy, dx = torch.randn(2, generator=gen) * torch.tensor([1.0, 0.5])
        body = ((rows - 16 - dy) / 13) ** 2 + ((columns - 8 - dx) / 6.5) ** 2 < 1
        slices.append((body * (0.4 + 0.02 * torch.randn(32, 16, generator=gen)))[None])
    return torch.stack(slices).clamp(0, 1)


def test_a_slice_with_a_lesion_scores_higher_than_without() -> None:
    from bundle.stage2_prior.two_level import TwoLevelCrossEntropy

    gen = torch.Generator().manual_seed(0)
    train, test = clean_slices(32, gen), clean_slices(6, gen)
    torch.manual_seed(0)
    vqvae = TinyTwoLevelVQVAE().eval()
    with torch.no_grad():
        top, bottom = vqvae.index_quantize(train)
    prior = TwoLevelPrior(
        (6, 10), channels=8, num_layers=(3, 2), kernel_size=3, head_channels=16, cond_channels=6, cond_blocks=1
    )
    optimizer = torch.optim.Adam(prior.parameters(), 1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # maps this small train fastest on one thread, above all on a busy machine
    try:
        for _ in range(150):
            optimizer.zero_grad()
            TwoLevelCrossEntropy()(prior(top, bottom), (top, bottom)).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    detector = AnomalyDetector(vqvae, prior.eval(), (1e9, 1e9), score_codes=4)
    lesioned = torch.stack(
        [insert_lesion(image, seed=0, index=i, min_radius=3, max_radius=4)[0] for i, image in enumerate(test)]
    )  # bright for even indices, dark for odd ones
    clean_scores, lesion_scores = detector(test).score, detector(lesioned).score
    assert torch.all(lesion_scores > clean_scores), (lesion_scores, clean_scores)


# ------------------------------------------------------------------------------------------------------------------
# the workflows end to end, on a tiny model trained for a few epochs
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: dict) -> Path:
    """The shared tiny bundle's weights, copied: the anomaly workflows store their threshold beside them."""
    return copy_models(tiny_bundle, tmp_path_factory.mktemp("anomaly"))


def write_hipmri_folder(root: Path) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
    """A HipMRI-layout data set (validation and test slices) with 256 x 128 and 256 x 144 slices, one stored with
    a trailing axis, under different affines. Returns the test files' shapes and affines."""
    from bundle.data.phantom import phantom_slice

    rotation = 0.4
    affines = [
        np.diag([0.9, 1.1, 3.0, 1.0]),
        np.array(
            [
                [0.8 * np.cos(rotation), -1.2 * np.sin(rotation), 0, 10],
                [0.8 * np.sin(rotation), 1.2 * np.cos(rotation), 0, -20],
                [0, 0, 2.5, 33],
                [0, 0, 0, 1],
            ]
        ),
    ]
    plan = {
        "validate": [(601, 3, 128, False), (601, 9, 144, False)],
        "test": [(801, 4, 128, False), (801, 7, 144, False), (802, 10, 144, True)],
    }
    written = {}
    for split, slices in plan.items():
        (root / f"keras_slices_{split}").mkdir(parents=True)
        for number, (case, index, width, trailing) in enumerate(slices):
            image = phantom_slice(case, index, 16, width, 0)[0] * (1000.0 if number % 2 else 1.0)
            image = image[..., None] if trailing else image
            affine = affines[number % 2]
            path = root / f"keras_slices_{split}" / f"case_{case:03d}_week_0_slice_{index}.nii.gz"
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), path)
            written[path.name] = (image.shape, affine)
    return {name: geometry for name, geometry in written.items() if "case_8" in name}


@pytest.mark.slow
def test_anomaly_workflow_writes_maps_with_each_input_geometry(trained: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    inputs = write_hipmri_folder(data)
    common = [
        "--dataset_dir",
        data,
        "--input_dir",
        data / "keras_slices_test",
        "--ckpt_dir",
        trained / "models",
        "--codes_dir",
        tmp_path / "codes",
        *TINY_NETWORK,
        *TINY_PRIOR,
    ]
    run_bundle("anomaly", "configs/inference.json,configs/anomaly.json", "--output_dir", tmp_path / "out", *common)
    for name, (shape, affine) in inputs.items():
        stem = name[: -len(".nii.gz")]
        for suffix in ("anomaly", "healed", "nll"):
            result = nib.load(tmp_path / "out" / f"{stem}_{suffix}.nii.gz")
            assert result.shape == shape, (name, suffix)
            np.testing.assert_allclose(result.affine, affine, atol=1e-5)
            values = result.get_fdata()
            assert np.isfinite(values).all() and values.min() >= 0.0, (name, suffix)
            if suffix != "nll":
                assert values.max() <= 1.0
        if shape[1] == 144:  # padded back from the network's 256 x 128: nothing was found in the margins
            anomaly = nib.load(tmp_path / "out" / f"{stem}_anomaly.nii.gz").get_fdata().reshape(256, 144)
            assert not anomaly[:, :8].any() and not anomaly[:, -8:].any()
    with open(tmp_path / "out" / "anomaly_scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(row["image"]).name for row in rows) == sorted(inputs)
    assert all(float(row["score_bits"]) > 0 and 0 <= float(row["resampled_fraction"]) <= 1 for row in rows)
    assert Image.open(tmp_path / "out" / "anomaly_grid.png").size[1] >= 3 * 128
    # the threshold was calibrated on the validation split and stored beside the weights it holds for
    stored = json.loads((trained / "models" / "anomaly_threshold.json").read_text())
    assert stored["num_images"] == 2 and stored["split"] == "validate" and stored["quantile"] == 0.95
    assert stored["top"] > 0 and stored["bottom"] > 0
    from bundle.anomaly.threshold import weights_digests

    digests = weights_digests([trained / "models" / "model.pt", trained / "models" / "prior" / "prior.pt"])
    assert [stored["weights"]["vqvae"], stored["weights"]["prior"]] == digests
    # a threshold no code reaches: nothing is resampled, so every gated map is zero; the stored one is kept
    run_bundle(
        "anomaly",
        "configs/inference.json,configs/anomaly.json",
        "--output_dir",
        tmp_path / "none",
        "--threshold",
        "1e9",
        *common,
    )
    for name in inputs:
        assert not nib.load(tmp_path / "none" / name.replace(".nii.gz", "_anomaly.nii.gz")).get_fdata().any()
    assert json.loads((trained / "models" / "anomaly_threshold.json").read_text()) == stored
    # calibrating again on purpose, at another quantile: lower thresholds, stored for the same weights
    calibrate = ["--threshold_quantile", "0.5", "--output_dir", tmp_path / "calibrated", *common]
    run_bundle("calibrating", "configs/inference.json,configs/anomaly.json", *calibrate)
    median = json.loads((trained / "models" / "anomaly_threshold.json").read_text())
    assert median["quantile"] == 0.5 and median["weights"] == stored["weights"]
    assert median["top"] < stored["top"] and median["bottom"] < stored["bottom"]


@pytest.mark.slow
def test_anomaly_benchmark_reports_both_methods(trained: Path, phantom_dir: Path, tmp_path: Path) -> None:
    run_bundle(
        "evaluating",
        "configs/inference.json,configs/anomaly.json,configs/evaluate_anomaly.json",
        "--dataset_dir",
        phantom_dir,
        "--ckpt_dir",
        trained / "models",
        "--output_dir",
        tmp_path,
        "--codes_dir",
        tmp_path / "codes",
        "--latency_slices",
        2,
        *TINY_NETWORK,
        *TINY_PRIOR,
    )
    report = json.loads((tmp_path / "anomaly_metrics.json").read_text())
    for method in ("healing_gated", "healing_ungated", "reconstruction_error"):
        for key in ("pixel_auprc", "best_dice", "image_auroc"):
            assert 0.0 <= report[method][key] <= 1.0, (method, key)
    assert 0.0 <= report["likelihood_score"]["image_auroc"] <= 1.0
    assert report["setup"]["slices"] == 6 and report["setup"]["bright_lesions"] == 3
    assert report["setup"]["heal_levels"] == "bottom" and report["setup"]["gated"] is True
    for timing in ("healing_map", "reconstruction_error_map"):
        assert report["latency"][timing]["threads"] == 2 and report["latency"][timing]["slices"] == 2
        assert report["latency"][timing]["median_ms"] > 0
    # the lesions are those of the seed, whatever the process that draws them
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(["configs/inference.json", "configs/evaluate_anomaly.json"])
    parser.update({"dataset_dir": str(phantom_dir)})
    dataset = parser.get_parsed_content("test_dataset")
    masks = torch.stack([insert_lesion(dataset[i]["image"], 0, i)[1] for i in range(len(dataset))])
    assert report["setup"]["lesion_pixel_fraction"] == pytest.approx(float(masks.float().mean()))
    assert Image.open(tmp_path / "anomaly_examples.png").size == (6 * 256 + 5 * 2, 6 * 128 + 5 * 2)
