"""Tests for bundle/evaluation/realism.py: known answers for the two-sample test, precision/recall and features."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import VQVAE

from bundle.evaluation.realism import (
    MIN_IMAGES_PER_SET,
    _split_halves,
    classifier_two_sample_test,
    encoder_block_outputs,
    multiscale_pooled_features,
    precision_recall,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(n: int, h: int = 32, w: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1]: bilinear upsampling of a coarse random grid."""
    coarse = torch.rand(n, 1, h // 8, w // 8, generator=_gen(seed))
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def _anatomy(n: int, h: int = 32, w: int = 16, seed: int = 0) -> torch.Tensor:
    """Images with a fixed layout: a bright disc in the upper half on a dark ramp, with jitter and noise."""
    g = _gen(seed)
    rows = torch.arange(h).view(1, 1, h, 1).float()
    cols = torch.arange(w).view(1, 1, 1, w).float()
    centre_r = h / 3 + 2 * torch.rand(n, 1, 1, 1, generator=g)
    centre_c = w / 2 + 2 * torch.rand(n, 1, 1, 1, generator=g) - 1
    disc = (((rows - centre_r) ** 2 + (cols - centre_c) ** 2) < (w / 3) ** 2).float()
    ramp = 0.3 * rows / h
    return (0.6 * disc + ramp + 0.05 * torch.rand(n, 1, h, w, generator=g)).clamp(0, 1)


def _shuffle_patches(images: torch.Tensor, patch: int, seed: int) -> torch.Tensor:
    """Each image's non-overlapping ``patch`` x ``patch`` tiles in a random order: same pixels, new layout."""
    n, c, h, w = images.shape
    rows, cols = h // patch, w // patch
    tiles = images.reshape(n, c, rows, patch, cols, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, rows * cols, -1)
    g = _gen(seed)
    shuffled = torch.stack([tiles[i][:, torch.randperm(rows * cols, generator=g)] for i in range(n)])
    return shuffled.reshape(n, c, rows, cols, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


# ------------------------------------------------------------------------------------------------------------
# classifier_two_sample_test
# ------------------------------------------------------------------------------------------------------------

# 64 images per set give 32 + 32 held-out calls. If the classifier cannot tell the sets apart each call is a fair
# coin, and |accuracy - 0.5| > 0.2 (<= 19 or >= 45 of 64 correct) has probability 0.0016 (two-sided binomial).
_N = 64
_CHANCE_TOLERANCE = 0.2


def test_c2st_same_distribution_is_near_chance():
    pool = _anatomy(2 * _N, seed=1)
    result = classifier_two_sample_test(pool[:_N], pool[_N:], seed=0, downsample=1)
    assert abs(result["accuracy"] - 0.5) <= _CHANCE_TOLERANCE
    assert result["p_value"] > 0.01
    assert result["n_train_per_class"] == result["n_test_per_class"] == _N // 2


def test_c2st_separates_blobs_from_noise_with_equal_pixel_statistics():
    blobs = _blobs(_N, seed=2)
    noise = torch.rand(blobs.shape, generator=_gen(3))
    # Same per-image mean and std, so only spatial structure separates the sets.
    flat_b, flat_n = blobs.flatten(1), noise.flatten(1)
    noise = ((flat_n - flat_n.mean(1, keepdim=True)) / flat_n.std(1, keepdim=True)) * flat_b.std(
        1, keepdim=True
    ) + flat_b.mean(1, keepdim=True)
    result = classifier_two_sample_test(noise.view_as(blobs), blobs, seed=0, downsample=1)
    assert result["accuracy"] >= 0.95
    assert result["accuracy_generated"] >= 0.9 and result["accuracy_real"] >= 0.9
    assert result["p_value"] < 1e-6


def test_c2st_detects_right_texture_in_wrong_layout():
    real = _anatomy(_N, seed=4)
    fake = _shuffle_patches(_anatomy(_N, seed=5), patch=8, seed=6)
    # Premise: every fake image holds exactly the pixels of an image from the real distribution.
    reference = _anatomy(_N, seed=5)
    assert torch.equal(fake.flatten(1).sort(dim=1).values, reference.flatten(1).sort(dim=1).values)
    result = classifier_two_sample_test(fake, real, seed=0, downsample=1)
    assert result["accuracy"] >= 0.9


def test_c2st_is_deterministic_by_seed_and_leaves_global_rng_alone():
    fake, real = _blobs(16, seed=7), _anatomy(16, seed=8)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = classifier_two_sample_test(fake, real, seed=5, epochs=5)
    assert torch.equal(torch.rand(3), expected_next)
    assert classifier_two_sample_test(fake, real, seed=5, epochs=5) == first


def test_c2st_balances_unequal_sets():
    result = classifier_two_sample_test(_blobs(20, seed=9), _anatomy(13, seed=10), seed=0, epochs=3)
    assert result["n_train_per_class"] == 6 and result["n_test_per_class"] == 7
    for key in ("accuracy_generated", "accuracy_real"):
        assert (result[key] * 7) == pytest.approx(round(result[key] * 7))
    assert result["accuracy"] == pytest.approx((result["accuracy_generated"] + result["accuracy_real"]) / 2)


def test_c2st_rejects_small_or_mismatched_sets():
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGES_PER_SET} images"):
        classifier_two_sample_test(_blobs(MIN_IMAGES_PER_SET - 1), _blobs(30))
    with pytest.raises(ValueError, match="shapes differ"):
        classifier_two_sample_test(_blobs(10, h=32), _blobs(10, h=48))
    with pytest.raises(ValueError, match="smaller than downsample"):
        classifier_two_sample_test(_blobs(10), _blobs(10), downsample=32)


# ------------------------------------------------------------------------------------------------------------
# precision_recall
# ------------------------------------------------------------------------------------------------------------


def _on_x_axis(*xs: float) -> torch.Tensor:
    return torch.tensor([[x, 0.0] for x in xs])


def test_precision_recall_hand_computed_k1():
    # Real {0, 2, 4, 20, 21}: nearest-neighbour radii 2, 2, 2, 1, 1. Fake {1, 3, 9, 10}: radii 2, 2, 1, 1.
    # Fake 1 lies in the real balls at 0 and 2, fake 3 in those at 2 and 4, fakes 9 and 10 in none:
    # precision 2/4, density (2 + 2) / 4 / k = 1. Real balls hit: 0, 2, 4 -> coverage 3/5.
    # Reals 0, 2 (ball at 1) and 4 (ball at 3) lie in fake balls, 20 and 21 do not: recall 3/5.
    real, fake = _on_x_axis(0, 2, 4, 20, 21), _on_x_axis(1, 3, 9, 10)
    result = precision_recall(real, fake, k=1)
    assert result == pytest.approx({"precision": 0.5, "recall": 0.6, "density": 1.0, "coverage": 0.6})


def test_precision_recall_hand_computed_k2_outliers_inflate_balls():
    # Same points, k = 2. Real radii: 4, 2, 4, 16, 17 (the outlying pair reaches back to 4).
    # Fake radii: 8, 6, 6, 7. Fakes 1 and 3 lie in the balls at 0, 2, 4; fakes 9 and 10 in those at 20 and 21:
    # precision 1, density (3 + 3 + 2 + 2) / 4 / 2 = 1.25, coverage 1. The fake balls reach no further than
    # 10 + 7 = 17 < 20, so recall stays 3/5.
    real, fake = _on_x_axis(0, 2, 4, 20, 21), _on_x_axis(1, 3, 9, 10)
    result = precision_recall(real, fake, k=2)
    assert result == pytest.approx({"precision": 1.0, "recall": 0.6, "density": 1.25, "coverage": 1.0})


def test_precision_recall_balls_are_closed():
    # Real {0, 2}: both radii 2. Fake 4 is exactly on the boundary of the ball at 2; fake 6 is outside.
    result = precision_recall(_on_x_axis(0, 2), _on_x_axis(4, 6), k=1)
    assert result["precision"] == 0.5


def test_precision_recall_identical_sets_score_one():
    features = torch.randn(200, 16, generator=_gen(11))
    result = precision_recall(features, features.clone(), k=3)
    assert result["precision"] == result["recall"] == result["coverage"] == 1.0


def test_precision_recall_far_shift_scores_zero():
    real = torch.randn(200, 16, generator=_gen(12))
    shifted = torch.randn(200, 16, generator=_gen(13)) + 100.0
    assert precision_recall(real, shifted, k=3) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_precision_recall_one_mode_of_two_gives_half_recall():
    g = _gen(14)
    mode_a = torch.randn(150, 8, generator=g)
    mode_b = torch.randn(150, 8, generator=g) + 50.0
    fake = torch.randn(150, 8, generator=g)  # a fresh draw from mode a only
    bimodal = precision_recall(torch.cat([mode_a, mode_b]), fake, k=3)
    one_mode = precision_recall(mode_a, fake, k=3)
    # Mode b is too far away to change any radius or membership in mode a: the reals of mode b are simply never
    # covered, which halves recall and coverage exactly and leaves precision and density as they are.
    assert bimodal["recall"] == pytest.approx(one_mode["recall"] / 2)
    assert bimodal["coverage"] == pytest.approx(one_mode["coverage"] / 2)
    assert bimodal["precision"] == one_mode["precision"] and bimodal["density"] == one_mode["density"]
    # Within mode a, two finite draws of one distribution cover each other well but not completely.
    assert 0.4 <= bimodal["recall"] <= 0.5
    assert 0.8 <= one_mode["precision"] < 1.0


def test_precision_recall_rejects_bad_k_and_shapes():
    features = torch.randn(4, 3, generator=_gen(15))
    with pytest.raises(ValueError, match="at least 5 samples"):
        precision_recall(features, features, k=3 + 1)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(features, features, k=0)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(features, features[:, :2], k=1)


# ------------------------------------------------------------------------------------------------------------
# multiscale_pooled_features / encoder_block_outputs
# ------------------------------------------------------------------------------------------------------------


def test_pooled_features_values_for_identity_extractor():
    images = torch.rand(3, 2, 8, 4, generator=_gen(16))
    features = multiscale_pooled_features(lambda x: [x], images, grid=(4, 2))
    assert features.shape == (3, 2 * (4 * 2 + 2)) and features.dtype == torch.float32
    # Grid cells: means of the 2x2 tiles, channel-major; then per-channel mean and population std.
    tile_means = images.reshape(3, 2, 4, 2, 2, 2).mean(dim=(3, 5)).flatten(1)
    torch.testing.assert_close(features[:, :16], tile_means)
    torch.testing.assert_close(features[:, 16:18], images.mean(dim=(2, 3)))
    torch.testing.assert_close(features[:, 18:], images.flatten(2).std(dim=2, correction=0))


def test_pooled_features_see_layout_that_mean_and_std_miss():
    images = _anatomy(4, seed=17)
    shuffled = _shuffle_patches(images, patch=8, seed=18)
    original, moved = (multiscale_pooled_features(lambda x: [x], batch) for batch in (images, shuffled))
    torch.testing.assert_close(original[:, 8:], moved[:, 8:])  # global mean and std agree
    assert (original[:, :8] - moved[:, :8]).abs().max() > 0.1  # the grid cells do not


def test_pooled_features_concatenate_maps_and_ignore_batching():
    def extractor(x: torch.Tensor) -> list[torch.Tensor]:
        return [x.repeat(1, 3, 1, 1), torch.nn.functional.avg_pool2d(x, 4).repeat(1, 5, 1, 1) ** 2]

    images = torch.rand(7, 1, 16, 8, generator=_gen(19))
    features = multiscale_pooled_features(extractor, images, grid=(2, 2), batch_size=7)
    assert features.shape == (7, 3 * 6 + 5 * 6)
    torch.testing.assert_close(multiscale_pooled_features(extractor, images, grid=(2, 2), batch_size=3), features)


def test_pooled_features_reject_bad_extractor_output():
    images = torch.rand(2, 1, 8, 8, generator=_gen(20))
    with pytest.raises(ValueError, match=r"\[B, C, h, w\] maps"):
        multiscale_pooled_features(lambda x: [x.flatten(1)], images)
    with pytest.raises(ValueError, match=r"\[B, C, h, w\] maps"):
        multiscale_pooled_features(lambda x: [], images)
    with pytest.raises(ValueError, match="non-empty"):
        multiscale_pooled_features(lambda x: [x], images[:0])


def _tiny_vqvae() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 16),
        num_res_layers=1,
        num_res_channels=(8, 8),
        downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings=16,
        embedding_dim=4,
    ).eval()


def test_encoder_block_outputs_on_monai_vqvae():
    net = _tiny_vqvae()
    images = torch.rand(2, 1, 32, 16, generator=_gen(21))
    with torch.no_grad():
        maps = encoder_block_outputs(net)(images)
        # Default: last block at 1/2 resolution (residual unit, 8 channels) and the latents at 1/4 (4 channels).
        assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 8), (2, 4, 8, 4)]
        assert torch.equal(maps[-1], net.encode(images))
        chosen = encoder_block_outputs(net.encoder, indices=[0, -1])(images)
        assert torch.equal(chosen[0], net.encoder.blocks[0](images)) and torch.equal(chosen[1], maps[-1])
    features = multiscale_pooled_features(encoder_block_outputs(net), images)
    assert features.shape == (2, (8 + 4) * (4 * 2 + 2))
    assert torch.equal(multiscale_pooled_features(encoder_block_outputs(net), images), features)


def test_encoder_block_outputs_on_sequential_and_errors():
    stack = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Conv2d(2, 3, 3, stride=2, padding=1))
    images = torch.rand(1, 1, 8, 8, generator=_gen(22))
    with torch.no_grad():
        maps = encoder_block_outputs(stack)(images)
        assert [tuple(m.shape) for m in maps] == [(1, 2, 8, 8), (1, 3, 4, 4)]
        assert torch.equal(maps[1], stack(images))
    with pytest.raises(TypeError, match="nn.Sequential"):
        encoder_block_outputs(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="indices"):
        encoder_block_outputs(stack, indices=[2])
    with pytest.raises(ValueError, match="indices"):
        encoder_block_outputs(stack, indices=[])


def test_grouped_halves_keep_each_scan_on_one_side():
    images = torch.arange(40.0).view(40, 1, 1, 1)
    scans = [i // 5 for i in range(40)]  # 8 scans of 5 slices
    train, test = _split_halves(images, 30, _gen(1), scans)
    train_scans = {scans[int(v)] for v in train.flatten()}
    test_scans = {scans[int(v)] for v in test.flatten()}
    assert len(train) == 15 and len(test) == 15
    assert len(train_scans & test_scans) <= 1  # only the scan at the cut may straddle it
    ungrouped = _split_halves(images, 30, _gen(1))
    assert len({scans[int(v)] for v in ungrouped[0].flatten()} & {scans[int(v)] for v in ungrouped[1].flatten()}) > 1
    with pytest.raises(ValueError, match="3 group labels for 40 images"):
        _split_halves(images, 30, _gen(1), [0, 1, 2])


def test_c2st_with_scan_groups_does_not_score_scan_recognition():
    """Real slices come in scans of near-copies; generated ones are fresh draws of the same process. Split by
    slice, the classifier recognises held-out slices of scans it has seen; split by scan, it cannot."""
    scans = _blobs(8, seed=20)
    real = scans.repeat_interleave(6, 0) + 0.01 * torch.rand(48, 1, 32, 16, generator=_gen(21))
    generated = _blobs(48, seed=22)
    groups = [i // 6 for i in range(48)]
    by_slice = classifier_two_sample_test(generated, real, seed=0, downsample=1)
    by_scan = classifier_two_sample_test(generated, real, seed=0, downsample=1, real_groups=groups)
    assert by_slice["accuracy"] >= 0.75
    assert by_scan["accuracy"] <= by_slice["accuracy"] - 0.15
