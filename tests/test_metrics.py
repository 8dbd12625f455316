"""Tests for bundle/metrics.py: each test checks a property that breaks if the metric's behaviour breaks."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric

from bundle.evaluation.metrics import (
    _sample_pairs,
    code_histogram_distance,
    codebook_usage,
    encoder_features,
    fid,
    kid,
    mean_pairwise_ms_ssim,
    nearest_ssim,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_images(n: int, h: int = 256, w: int = 128, seed: int = 0) -> torch.Tensor:
    """Structured (low-frequency) images in [0, 1], unlike white noise."""
    coarse = torch.rand(n, 1, h // 16, w // 16, generator=_gen(seed))
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------------------
# encoder_features
# ------------------------------------------------------------------------------------------------------------


def _tiny_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3, stride=2, padding=1)
    ).eval()


def test_encoder_features_shape_and_values():
    net = _tiny_encoder()
    images = torch.rand(10, 1, 32, 16, generator=_gen(1))
    feats = encoder_features(net, images, batch_size=4)
    assert feats.shape == (10, 6)  # 2 * C with C = 3 output channels
    assert feats.dtype == torch.float32
    assert not feats.requires_grad
    # First C columns = per-channel spatial mean, last C = per-channel population std.
    fmap = net(images[7:8]).detach()[0].flatten(1).double()
    torch.testing.assert_close(feats[7, :3].double(), fmap.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(feats[7, 3:].double(), fmap.std(1, correction=0), atol=1e-6, rtol=1e-5)


def test_encoder_features_batching_invariant():
    net = _tiny_encoder()
    images = torch.rand(11, 1, 32, 16, generator=_gen(2))
    one_batch = encoder_features(net, images, batch_size=64)
    for bs in (1, 3, 5):
        torch.testing.assert_close(encoder_features(net, images, batch_size=bs), one_batch, atol=1e-5, rtol=1e-5)


def test_encoder_features_rejects_non_spatial_output():
    with pytest.raises(ValueError):
        encoder_features(lambda x: x.flatten(1), torch.rand(2, 1, 8, 8))


# ------------------------------------------------------------------------------------------------------------
# fid
# ------------------------------------------------------------------------------------------------------------


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s_a @ s_b)
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def test_fid_identical_is_zero():
    a = torch.randn(100, 8, generator=_gen(0))
    # The unclamped reference is ~0 too, so the clamp in fid() only removes round-off here.
    assert _reference_fid(a.double().numpy(), a.double().numpy()) == pytest.approx(0.0, abs=1e-6)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_clamps_only_round_off_below_zero(monkeypatch):
    import bundle.evaluation.metrics as metrics_module

    a, b = torch.randn(10, 3, generator=_gen(23)), torch.randn(10, 3, generator=_gen(24))
    monkeypatch.setattr(metrics_module, "get_fid_score", lambda x, y: torch.tensor(-1e-12, dtype=torch.float64))
    assert fid(a, b) == 0.0
    monkeypatch.setattr(metrics_module, "get_fid_score", lambda x, y: torch.tensor(0.25, dtype=torch.float64))
    assert fid(a, b) == 0.25


def test_fid_pure_mean_shift_is_squared_shift_and_grows():
    a = torch.randn(200, 8, generator=_gen(0), dtype=torch.float64)
    values = []
    for shift in (0.25, 0.5, 1.0, 2.0):
        # Same covariance, so the trace terms cancel and FID = ||shift vector||^2 = 8 * shift^2.
        v = fid(a, a + shift)
        assert v == pytest.approx(8 * shift**2, rel=1e-5)
        values.append(v)
    assert values == sorted(values)


def test_fid_grows_with_shift_between_independent_samples():
    a = torch.randn(300, 6, generator=_gen(1))
    b = torch.randn(300, 6, generator=_gen(2))
    v = [fid(a, b + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert v[0] < 0.5
    assert v[0] < v[1] < v[2] < v[3]


def test_fid_symmetric_and_matches_scipy_reference():
    a = torch.randn(60, 5, generator=_gen(3))
    b = torch.randn(50, 5, generator=_gen(4)) * 1.5 + 0.3
    ref = _reference_fid(a.double().numpy(), b.double().numpy())
    assert fid(a, b) == pytest.approx(ref, rel=1e-6)
    assert fid(b, a) == pytest.approx(fid(a, b), rel=1e-6)


def test_fid_rejects_mismatched_features():
    with pytest.raises(ValueError):
        fid(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError):
        fid(torch.randn(1, 4), torch.randn(10, 4))


# ------------------------------------------------------------------------------------------------------------
# kid
# ------------------------------------------------------------------------------------------------------------


def _brute_force_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(u, v) = (u.v/d + 1)^3, by explicit loops."""
    x, y = x.double(), y.double()
    m, d = x.shape
    k = lambda u, v: (float(u @ v) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_same_distribution_near_zero_and_different_clearly_positive():
    a = torch.randn(200, 16, generator=_gen(1))
    b = torch.randn(200, 16, generator=_gen(2))
    c = torch.randn(200, 16, generator=_gen(3)) + 0.5
    same_mean, same_std = kid(a, b)
    diff_mean, diff_std = kid(a, c)
    assert abs(same_mean) < 0.02
    assert diff_mean > 0.3
    assert diff_mean > 20 * abs(same_mean)
    assert diff_mean > 3 * diff_std
    assert same_std > 0 and diff_std > 0  # subsets of 50 of 200 rows differ, so their estimates do


def test_kid_mean_and_std_are_those_of_the_per_subset_estimates():
    a = torch.randn(9, 3, generator=_gen(21))
    b = torch.randn(8, 3, generator=_gen(22)) + 0.4
    # The documented subset draw, replayed: per subset, randperm of a's rows then of b's, from one seeded generator.
    generator = torch.Generator().manual_seed(11)
    estimates = []
    for _ in range(6):
        x = a[torch.randperm(9, generator=generator)[:5]]
        y = b[torch.randperm(8, generator=generator)[:5]]
        estimates.append(_brute_force_mmd2(x, y))
    mean, std = kid(a, b, subset_size=5, num_subsets=6, seed=11)
    assert mean == pytest.approx(float(np.mean(estimates)), rel=1e-9)
    assert std == pytest.approx(float(np.std(estimates)), rel=1e-9)  # population std (ddof=0)
    assert std > 0


def test_kid_deterministic_for_seed():
    a = torch.randn(120, 8, generator=_gen(5))
    b = torch.randn(120, 8, generator=_gen(6)) * 1.2
    assert kid(a, b, subset_size=30, num_subsets=20, seed=7) == kid(a, b, subset_size=30, num_subsets=20, seed=7)
    assert kid(a, b, subset_size=30, num_subsets=20, seed=7) != kid(a, b, subset_size=30, num_subsets=20, seed=8)


def test_kid_full_set_matches_brute_force_and_subset_clipping():
    a = torch.randn(12, 4, generator=_gen(8))
    b = torch.randn(12, 4, generator=_gen(9)) + 0.3
    # subset_size > n: clipped to 12, every subset is the full set -> exact unbiased MMD^2, zero spread.
    mean, std = kid(a, b, subset_size=50, num_subsets=5)
    assert mean == pytest.approx(_brute_force_mmd2(a, b), rel=1e-9, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)
    # Unequal sizes: clipped to min(len(a), len(b)) and still finite.
    mean2, std2 = kid(a, torch.randn(30, 4, generator=_gen(10)), subset_size=50, num_subsets=5)
    assert math.isfinite(mean2) and math.isfinite(std2) and std2 > 0


# ------------------------------------------------------------------------------------------------------------
# mean_pairwise_ms_ssim
# ------------------------------------------------------------------------------------------------------------


def test_ms_ssim_identical_copies_is_one():
    img = _smooth_images(1, seed=3)
    assert mean_pairwise_ms_ssim(img.repeat(5, 1, 1, 1)) == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_noise_much_lower_than_copies():
    noise = torch.rand(6, 1, 256, 128, generator=_gen(4))
    assert mean_pairwise_ms_ssim(noise) < 0.3


def test_ms_ssim_default_monai_kernel_rejects_256x128():
    # Documents why kernel_size defaults to 7 here.
    with pytest.raises(ValueError):
        mean_pairwise_ms_ssim(torch.rand(2, 1, 256, 128), kernel_size=11)


def test_ms_ssim_all_pairs_equals_brute_force():
    images = torch.cat([_smooth_images(3, seed=5), torch.rand(2, 1, 256, 128, generator=_gen(6))])
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=7, reduction="none")
    pair_values = [float(metric(images[i : i + 1], images[j : j + 1])) for i in range(5) for j in range(i + 1, 5)]
    assert len(pair_values) == 10
    assert mean_pairwise_ms_ssim(images, max_pairs=10) == pytest.approx(float(np.mean(pair_values)), rel=1e-5)


def test_ms_ssim_pair_subsampling_deterministic():
    images = torch.cat([_smooth_images(4, seed=7), torch.rand(4, 1, 256, 128, generator=_gen(8))])
    first = mean_pairwise_ms_ssim(images, max_pairs=5, seed=1)
    assert mean_pairwise_ms_ssim(images, max_pairs=5, seed=1) == first
    others = {mean_pairwise_ms_ssim(images, max_pairs=5, seed=s) for s in (2, 3)}
    assert any(abs(o - first) > 1e-6 for o in others)


@pytest.mark.parametrize("n,max_pairs", [(4, 100), (30, 50), (5000, 100)])
def test_sample_pairs_distinct_and_ordered(n, max_pairs):
    i, j = _sample_pairs(n, max_pairs, seed=0)
    expected = min(n * (n - 1) // 2, max_pairs)
    assert i.numel() == j.numel() == expected
    assert bool((i < j).all()) and bool((i >= 0).all()) and bool((j < n).all())
    assert len(set(zip(i.tolist(), j.tolist()))) == expected
    i2, j2 = _sample_pairs(n, max_pairs, seed=0)
    assert torch.equal(i, i2) and torch.equal(j, j2)


# ------------------------------------------------------------------------------------------------------------
# nearest_ssim
# ------------------------------------------------------------------------------------------------------------


def _brute_force_nearest(samples: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")
    return torch.tensor([max(float(metric(s[None], r[None])) for r in refs) for s in samples], dtype=torch.float32)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_nearest_ssim_matches_brute_force(batch_size):
    refs = torch.cat([_smooth_images(5, 64, 48, seed=9), torch.rand(2, 1, 64, 48, generator=_gen(10))])
    samples = torch.cat([_smooth_images(3, 64, 48, seed=11), torch.rand(1, 1, 64, 48, generator=_gen(12))])
    got = nearest_ssim(samples, refs, batch_size=batch_size)
    assert got.shape == (4,)
    torch.testing.assert_close(got, _brute_force_nearest(samples, refs), atol=1e-5, rtol=1e-5)


def test_nearest_ssim_multichannel_matches_brute_force():
    refs = torch.rand(5, 2, 40, 40, generator=_gen(13))
    samples = torch.cat([refs[1:2] * 0.9, torch.rand(2, 2, 40, 40, generator=_gen(14))])
    torch.testing.assert_close(
        nearest_ssim(samples, refs, batch_size=4), _brute_force_nearest(samples, refs), atol=1e-5, rtol=1e-5
    )


def test_nearest_ssim_copies_vs_unrelated():
    refs = _smooth_images(40, seed=15)
    noise = torch.rand(2, 1, 256, 128, generator=_gen(16))
    samples = torch.cat([refs[[3, 27]], noise])
    got = nearest_ssim(samples, refs)
    assert got.shape == (4,)
    assert got[:2].min() > 0.9999
    assert got[2:].max() < 0.5


def test_nearest_ssim_is_vectorised(monkeypatch):
    # Load-independent speed guard: each image is filtered once (mean and second moment), and the pair products are
    # filtered about batch_size at a time, not one pair per call.
    import bundle.evaluation.metrics as metrics_module

    calls = []
    real = metrics_module._gaussian_filter

    def counting(maps, window):
        calls.append(maps.shape[0])
        return real(maps, window)

    monkeypatch.setattr(metrics_module, "_gaussian_filter", counting)
    nearest_ssim(torch.rand(16, 1, 32, 32), torch.rand(100, 1, 32, 32), batch_size=64)
    chunks = math.ceil(100 / (64 // 16))
    assert len(calls) == 2 + 3 * chunks  # samples twice; per chunk of references: the references twice, the pairs
    assert sum(calls) == 2 * 16 + 2 * 100 + 16 * 100  # every image filtered twice, every pair's product once


def test_nearest_ssim_full_resolution_wall_time():
    # Loose absolute bound (the machine may be shared): 16 x 50 at 256x128 takes ~0.3 s on 2 idle cores.
    refs = torch.rand(50, 1, 256, 128, generator=_gen(17))
    samples = torch.rand(16, 1, 256, 128, generator=_gen(18))
    start = time.perf_counter()
    nearest_ssim(samples, refs)
    assert time.perf_counter() - start < 20.0


# ------------------------------------------------------------------------------------------------------------
# code_histogram_distance
# ------------------------------------------------------------------------------------------------------------


def test_code_histogram_identical_is_zero():
    codes = torch.randint(0, 16, (4, 8, 8), generator=_gen(19))
    # Same histogram, different order and shape.
    shuffled = codes.flatten()[torch.randperm(codes.numel(), generator=_gen(20))].reshape(16, 16)
    out = code_histogram_distance(codes, shuffled, num_embeddings=16)
    assert out["js_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert out["total_variation"] == pytest.approx(0.0, abs=1e-12)
    assert out["used_a"] == out["used_b"] == len(set(codes.flatten().tolist()))


def test_code_histogram_disjoint_is_max():
    out = code_histogram_distance(torch.tensor([0, 1, 1, 2]), torch.tensor([[3, 4], [5, 5]]), num_embeddings=8)
    assert out["js_divergence"] == pytest.approx(1.0, abs=1e-12)
    assert out["total_variation"] == pytest.approx(1.0, abs=1e-12)
    assert out["used_a"] == 3 and out["used_b"] == 3


def test_code_histogram_hand_example():
    # p = (3/4, 1/4, 0), q = (1/4, 3/4, 0), m = (1/2, 1/2, 0)
    # KL(p||m) = 3/4 log2(3/2) + 1/4 log2(1/2) = KL(q||m) -> JS = 3/4 log2(1.5) - 1/4 ~= 0.18872
    out = code_histogram_distance(torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 1, 0]), num_embeddings=3)
    assert out["js_divergence"] == pytest.approx(0.75 * math.log2(1.5) - 0.25, rel=1e-12)
    assert out["total_variation"] == pytest.approx(0.5, rel=1e-12)
    assert out["used_a"] == 2 and out["used_b"] == 2


def test_code_histogram_divergence_matches_its_definition():
    codes_a = torch.randint(0, 12, (500,), generator=_gen(25))  # codes 12..15 unused by a
    codes_b = torch.randint(4, 16, (300,), generator=_gen(26))  # codes 0..3 unused by b
    p = np.bincount(codes_a.numpy(), minlength=16) / 500
    q = np.bincount(codes_b.numpy(), minlength=16) / 300
    m = (p + q) / 2

    def kl_bits(x: np.ndarray) -> float:
        used = x > 0
        return float(np.sum(x[used] * np.log2(x[used] / m[used])))

    out = code_histogram_distance(codes_a, codes_b, num_embeddings=16)
    assert out["js_divergence"] == pytest.approx(0.5 * kl_bits(p) + 0.5 * kl_bits(q), rel=1e-9)
    assert out["total_variation"] == pytest.approx(0.5 * np.abs(p - q).sum(), rel=1e-9)


def test_code_histogram_rejects_bad_codes():
    with pytest.raises(ValueError):
        code_histogram_distance(torch.tensor([0, 3]), torch.tensor([0, 1]), num_embeddings=3)
    with pytest.raises(TypeError):
        code_histogram_distance(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), num_embeddings=3)


# ------------------------------------------------------------------------------------------------------------
# codebook_usage
# ------------------------------------------------------------------------------------------------------------


def test_codebook_usage_uniform_over_k_used():
    out = codebook_usage(torch.tensor([5, 0, 5, 5, 0, 5, 0, 0]))
    assert out["usage"] == pytest.approx(0.5)
    assert out["perplexity"] == pytest.approx(4.0, rel=1e-12)
    assert out["dead"] == 4


def test_codebook_usage_known_nonuniform_and_single_code():
    # p = (1/4, 1/4, 1/2): H = 1.5 bits -> perplexity 2^1.5
    out = codebook_usage(torch.tensor([1.0, 1.0, 2.0, 0.0]))
    assert out["perplexity"] == pytest.approx(2**1.5, rel=1e-12)
    assert out["usage"] == pytest.approx(0.75) and out["dead"] == 1
    single = codebook_usage(torch.tensor([0, 9, 0]))
    assert single["perplexity"] == pytest.approx(1.0) and single["dead"] == 2


def test_codebook_usage_all_zero_is_finite():
    out = codebook_usage(torch.zeros(32, dtype=torch.long))
    assert all(math.isfinite(v) for v in out.values())
    assert out == {"usage": 0.0, "perplexity": 0.0, "dead": 32}


def test_codebook_usage_rejects_negative():
    with pytest.raises(ValueError):
        codebook_usage(torch.tensor([1, -1, 2]))
