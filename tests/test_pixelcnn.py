"""Tests for the Gated PixelCNN prior and its naive / fast (cached) samplers."""

from __future__ import annotations

import pytest
import torch

from bundle.stage2_prior.pixelcnn import GatedPixelCNN
from bundle.stage2_prior.sampling import sample_codes, sample_fast, sample_naive


def make_model(
    num_embeddings: int = 16,
    channels: int = 8,
    num_layers: int = 3,
    kernel_size: int = 5,
    num_classes: int = 0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    sharpen: bool = True,
) -> GatedPixelCNN:
    """Small random model. ``sharpen`` scales the head up so logits depend strongly on context
    (at default init they are almost flat, and a wrong context could go unnoticed in samples);
    the gates are left alone so they do not saturate."""
    torch.manual_seed(seed)
    model = GatedPixelCNN(num_embeddings, channels, num_layers, kernel_size, num_classes, head_channels=16)
    if sharpen:
        with torch.no_grad():
            model.head[1].weight.mul_(4.0)
            model.head[3].weight.mul_(10.0)
    return model.to(dtype)


def dependency_map(model: GatedPixelCNN, height: int, width: int, i: int, j: int) -> torch.Tensor:
    """Bool ``[H, W]``: inputs with a non-zero gradient of (a random projection of) the logits at (i, j)."""
    gen = torch.Generator().manual_seed(1234)
    codes = torch.randint(0, model.num_embeddings, (2, height, width), generator=gen)
    labels = torch.tensor([0, 1]) if model.num_classes else None
    x = model.embed(codes).detach().clone().requires_grad_(True)
    logits = model.forward_embedded(x, labels)
    # a random projection so that no exact cancellation can hide a dependency
    proj = torch.randn(model.num_embeddings, generator=gen, dtype=logits.dtype)
    (logits[0, :, i, j] * proj).sum().backward()
    assert x.grad[1].abs().sum() == 0  # samples in a batch are independent
    return x.grad[0].abs().sum(0) > 0


def expected_map(height: int, width: int, i: int, j: int, num_layers: int, kernel_size: int) -> torch.Tensor:
    """Receptive field of the architecture, written out independently of the network code."""
    span = num_layers * (kernel_size // 2)
    exp = torch.zeros(height, width, dtype=torch.bool)
    for r in range(height):
        for c in range(width):
            above = i - 1 - span <= r <= i - 1 and j - span <= c <= j + span
            left = r == i and j - 1 - span <= c <= j - 1
            exp[r, c] = above or left
    return exp


def raster_before(height: int, width: int, i: int, j: int) -> torch.Tensor:
    """Bool ``[H, W]``, True strictly before (i, j) in raster order."""
    return (torch.arange(height * width) < i * width + j).view(height, width)


# ---------------------------------------------------------------- causality / receptive field

POSITIONS = [(0, 0), (0, 1), (0, 7), (1, 0), (1, 7), (3, 2), (4, 6), (5, 0), (7, 0), (7, 3), (7, 7)]


@pytest.mark.parametrize("num_layers,kernel_size,num_classes", [(4, 5, 0), (2, 3, 0), (3, 3, 2), (1, 5, 0)])
def test_causality_and_no_blind_spot(num_layers: int, kernel_size: int, num_classes: int) -> None:
    model = make_model(num_layers=num_layers, kernel_size=kernel_size, num_classes=num_classes)
    height = width = 8
    for i, j in POSITIONS:
        dep = dependency_map(model, height, width, i, j)
        # causal: nothing at or after (i, j) in raster order
        assert not dep[~raster_before(height, width, i, j)].any(), (i, j)
        # no blind spot: exactly the documented receptive field
        exp = expected_map(height, width, i, j, num_layers, kernel_size)
        assert torch.equal(dep, exp), (i, j, dep.int(), exp.int())
    span = model.receptive_field[1]
    assert model.receptive_field == (span + 1, span) and span == num_layers * (kernel_size // 2)


def test_receptive_field_covers_all_past_and_up_right() -> None:
    # 4 layers x (5 // 2) = 8 >= 7: every earlier position of an 8x8 map is seen
    model = make_model(num_layers=4, kernel_size=5)
    for i, j in POSITIONS:
        dep = dependency_map(model, 8, 8, i, j)
        assert torch.equal(dep, raster_before(8, 8, i, j)), (i, j)
    # the up-right region of the row above, missed by a plain masked PixelCNN (blind spot)
    dep = dependency_map(model, 8, 8, 4, 2)
    assert dep[3, 3:].all() and dep[:4, 7].all()


def test_changing_future_codes_does_not_change_logits() -> None:
    model = make_model(num_layers=3, kernel_size=3)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (1, 6, 5), generator=gen)
    base = model(codes)
    for i, j in [(0, 0), (2, 4), (3, 0), (5, 2)]:
        changed = codes.clone().view(-1)
        changed[i * 5 + j :] = (changed[i * 5 + j :] + 1) % 16  # every position >= (i, j)
        out = model(changed.view(1, 6, 5))
        torch.testing.assert_close(out[..., i, j], base[..., i, j], rtol=0, atol=1e-12)
        # while the neighbours to the left and above do matter
        for r, c in [(i, j - 1), (i - 1, j)]:
            if r >= 0 and c >= 0:
                prev = codes.clone()
                prev[0, r, c] = (prev[0, r, c] + 1) % 16
                assert (model(prev)[..., i, j] - base[..., i, j]).abs().max() > 1e-6, (i, j, r, c)


# ---------------------------------------------------------------- fast == naive


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fast_sampling_equals_naive(dtype: torch.dtype, num_classes: int, temperature: float) -> None:
    model = make_model(num_layers=3, kernel_size=5, num_classes=num_classes, dtype=dtype)
    labels = torch.tensor([0, 2, 1]) if num_classes else None
    kwargs = dict(shape=(8, 6), num_samples=3, temperature=temperature, labels=labels, return_logits=True)
    naive, naive_logits = sample_naive(model, generator=torch.Generator().manual_seed(7), **kwargs)
    fast, fast_logits = sample_fast(model, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(naive, fast)
    assert naive.unique().numel() >= 3  # the maps are not degenerate
    # the cached logits are those of a full forward pass on the final maps
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fast_logits, model(fast, labels), rtol=0, atol=tol)
    torch.testing.assert_close(naive_logits, fast_logits, rtol=0, atol=tol)


@pytest.mark.parametrize(
    "shape,num_layers,kernel_size,temperature",
    [((5, 2), 2, 7, 1.0), ((1, 9), 3, 3, 1.0), ((7, 1), 2, 5, 0.8), ((4, 5), 4, 3, 0.0)],
)
def test_fast_sampling_equals_naive_edge_shapes(shape, num_layers, kernel_size, temperature) -> None:
    # kernels wider than the map, single row / column, argmax (temperature 0)
    model = make_model(num_layers=num_layers, kernel_size=kernel_size, num_classes=2)
    labels = torch.tensor([1, 0])
    naive = sample_naive(model, shape, 2, temperature, labels, torch.Generator().manual_seed(3))
    fast = sample_fast(model, shape, 2, temperature, labels, torch.Generator().manual_seed(3))
    assert torch.equal(naive, fast)


# ---------------------------------------------------------------- conditioning


def test_conditioning_changes_logits_and_samples() -> None:
    model = make_model(num_classes=3)
    codes = torch.randint(0, 16, (2, 6, 5), generator=torch.Generator().manual_seed(0))
    out0 = model(codes, torch.tensor([0, 0]))
    out1 = model(codes, torch.tensor([1, 1]))
    assert (out0 - out1).abs().mean() > 0.1
    assert ((out0 - out1).abs().amax(dim=1) > 1e-3).all()  # at every position, including (0, 0)

    def draw(labels: list[int]) -> torch.Tensor:
        return sample_fast(model, (6, 5), 2, labels=torch.tensor(labels), generator=torch.Generator().manual_seed(5))

    a, b = draw([0, 1]), draw([0, 2])
    assert torch.equal(a[0], b[0])  # same label and draws -> same map: no leakage across the batch
    assert not torch.equal(a[1], b[1])
    assert not torch.equal(draw([2, 2]), draw([1, 1]))


# ---------------------------------------------------------------- shapes, determinism, errors


def test_forward_shape_and_training_step() -> None:
    model = make_model(num_embeddings=12, channels=8, num_layers=2, num_classes=2, dtype=torch.float32, sharpen=False)
    codes = torch.randint(0, 12, (3, 7, 4))
    labels = torch.tensor([0, 1, 1])
    logits = model(codes, labels)
    assert logits.shape == (3, 12, 7, 4) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits, codes)
    loss.backward()
    for name, param in model.named_parameters():  # every module takes part
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_samples_shape_range_determinism_and_mode() -> None:
    model = make_model(num_embeddings=10, dtype=torch.float32)
    model.train()
    for method in ("fast", "naive"):
        s1 = sample_codes(model, (4, 3), 2, generator=torch.Generator().manual_seed(0), method=method)
        s2 = sample_codes(model, (4, 3), 2, generator=torch.Generator().manual_seed(0), method=method)
        s3 = sample_codes(model, (4, 3), 2, generator=torch.Generator().manual_seed(1), method=method)
        assert s1.shape == (2, 4, 3) and s1.dtype == torch.int64
        assert s1.min() >= 0 and s1.max() < 10
        assert torch.equal(s1, s2) and not torch.equal(s1, s3)
        assert model.training  # mode restored
    model.eval()
    sample_fast(model, (2, 2), 1)
    sample_naive(model, (2, 2), 1)
    assert not model.training
    # the global RNG is used when no generator is given
    torch.manual_seed(3)
    a = sample_fast(model, (3, 3), 2)
    torch.manual_seed(3)
    assert torch.equal(a, sample_naive(model, (3, 3), 2))


def test_errors() -> None:
    uncond = make_model()
    cond = make_model(num_classes=3)
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="unconditioned"):
        uncond(codes, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="required"):
        cond(codes)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cond(codes, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        cond(codes, torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        cond(codes, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        uncond(torch.full((1, 2, 2), 16))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        uncond(torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match="B, H, W"):
        uncond(torch.zeros(4, 4, dtype=torch.long))
    for sampler in (sample_fast, sample_naive):
        with pytest.raises(ValueError, match="unconditioned"):
            sampler(uncond, (2, 2), 2, labels=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="required"):
            sampler(cond, (2, 2), 2)
        with pytest.raises(ValueError, match="shape"):
            sampler(cond, (2, 2), 2, labels=torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match="temperature"):
            sampler(uncond, (2, 2), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="method"):
        sample_codes(uncond, (2, 2), 1, method="beam")
    with pytest.raises(ValueError, match="kernel_size"):
        GatedPixelCNN(16, kernel_size=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model = make_model(num_classes=2, dtype=torch.float64)
    labels = torch.tensor([1, 0])
    cpu = sample_fast(model, (6, 5), 2, labels=labels, generator=torch.Generator().manual_seed(0))
    gpu = sample_fast(model, (6, 5), 2, labels=labels, generator=torch.Generator().manual_seed(0), device="cuda")
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    model.cuda()
    naive = sample_naive(model, (6, 5), 2, labels=labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(naive.cpu(), cpu)
