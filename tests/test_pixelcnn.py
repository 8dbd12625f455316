"""Tests for the Gated PixelCNN prior (class and spatial conditioning) and its naive / fast (cached) samplers."""

from __future__ import annotations

import logging

import pytest
import torch

from bundle.stage2_prior import sampling
from bundle.stage2_prior.pixelcnn import GatedPixelCNN, layers_to_cover, span_to_cover, upsampling_ratio
from bundle.stage2_prior.sampling import sample_fast, sample_level, sample_naive


def make_model(
    num_embeddings: int = 16,
    channels: int = 8,
    num_layers: int = 3,
    kernel_size: int = 5,
    num_classes: int = 0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    sharpen: bool = True,
    cond_embeddings: int = 0,
    position_shape: tuple[int, int] | None = None,
) -> GatedPixelCNN:
    """Small random model. ``sharpen`` scales the head up so logits depend strongly on context
    (at default init they are almost flat, and a wrong context could go unnoticed in samples);
    the gates are left alone so they do not saturate."""
    torch.manual_seed(seed)
    model = GatedPixelCNN(
        num_embeddings,
        channels,
        num_layers,
        kernel_size,
        num_classes,
        head_channels=16,
        cond_embeddings=cond_embeddings,
        cond_channels=6,
        cond_blocks=1,
        position_shape=position_shape,
    )
    if sharpen:
        with torch.no_grad():
            model.head[1].weight.mul_(4.0)
            model.head[3].weight.mul_(10.0)
    return model.to(dtype)


def cond_codes_for(model: GatedPixelCNN, batch: int, height: int, width: int, ratio: int = 2) -> torch.Tensor | None:
    """Random conditioning codes ``[batch, height // ratio, width // ratio]`` for a spatially conditioned model."""
    if not model.cond_embeddings:
        return None
    gen = torch.Generator().manual_seed(99)
    return torch.randint(0, model.cond_embeddings, (batch, height // ratio, width // ratio), generator=gen)


def dependency_map(model: GatedPixelCNN, height: int, width: int, i: int, j: int) -> torch.Tensor:
    """Bool ``[H, W]``: inputs with a non-zero gradient of (a random projection of) the logits at (i, j)."""
    gen = torch.Generator().manual_seed(1234)
    codes = torch.randint(0, model.num_embeddings, (2, height, width), generator=gen)
    labels = torch.tensor([0, 1]) if model.num_classes else None
    cond = model.condition(cond_codes_for(model, 2, height, width), codes.shape)
    x = model.embed(codes).detach().clone().requires_grad_(True)
    logits = model.forward_embedded(x, labels, cond)
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


@pytest.mark.parametrize(
    "num_layers,kernel_size,num_classes,cond_embeddings,position_shape",
    [
        (4, 5, 0, 0, None),
        (2, 3, 0, 0, None),
        (3, 3, 2, 0, None),
        (1, 5, 0, 0, None),
        (2, 3, 0, 5, None),
        (3, 3, 2, 5, None),
        (3, 3, 0, 0, (8, 8)),
        (2, 3, 0, 5, (8, 8)),
    ],
)
def test_causality_and_no_blind_spot(
    num_layers: int, kernel_size: int, num_classes: int, cond_embeddings: int, position_shape: tuple | None
) -> None:
    # spatial conditioning and the position map are seen whole and must not open any path to the map's future
    model = make_model(
        num_layers=num_layers,
        kernel_size=kernel_size,
        num_classes=num_classes,
        cond_embeddings=cond_embeddings,
        position_shape=position_shape,
    )
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


@pytest.mark.parametrize("cond_embeddings", [0, 5])
def test_changing_future_codes_does_not_change_logits(cond_embeddings: int) -> None:
    model = make_model(num_layers=3, kernel_size=3, cond_embeddings=cond_embeddings)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (1, 6, 4), generator=gen)
    cond_codes = cond_codes_for(model, 1, 6, 4)
    base = model(codes, cond_codes=cond_codes)
    for i in range(6):
        for j in range(4):
            changed = codes.clone().view(-1)
            changed[i * 4 + j :] = (changed[i * 4 + j :] + 1) % 16  # every position >= (i, j)
            out = model(changed.view(1, 6, 4), cond_codes=cond_codes)
            # every position before (i, j) keeps its logits exactly
            assert torch.equal(out.flatten(2)[..., : i * 4 + j + 1], base.flatten(2)[..., : i * 4 + j + 1]), (i, j)
            # while the neighbours to the left and above do matter
            for r, c in [(i, j - 1), (i - 1, j)]:
                if r >= 0 and c >= 0:
                    prev = codes.clone()
                    prev[0, r, c] = (prev[0, r, c] + 1) % 16
                    assert (model(prev, cond_codes=cond_codes)[..., i, j] - base[..., i, j]).abs().max() > 1e-6


# ---------------------------------------------------------------- coverage of the whole map


@pytest.mark.parametrize("num_layers,kernel_size", [(1, 3), (2, 3), (3, 3), (1, 5), (2, 5), (3, 5), (2, 7)])
@pytest.mark.parametrize("shape", [(1, 4), (2, 3), (3, 3), (4, 2), (5, 4), (6, 3), (6, 6), (7, 2)])
def test_covers_matches_the_dependencies(num_layers: int, kernel_size: int, shape: tuple[int, int]) -> None:
    model = make_model(num_layers=num_layers, kernel_size=kernel_size)
    height, width = shape
    sees_all = all(
        torch.equal(dependency_map(model, height, width, i, j), raster_before(height, width, i, j))
        for i in range(height)
        for j in range(width)
    )
    assert model.covers(shape) == sees_all
    assert (layers_to_cover(shape, kernel_size) <= num_layers) == sees_all
    assert span_to_cover(shape) >= 0


@pytest.mark.parametrize("shape", [(32, 16), (16, 8)])
def test_default_top_depth_covers_the_top_maps(shape: tuple[int, int]) -> None:
    # the top map of a two-level VQ-VAE at 1/8 and 1/16 of 256 x 128: 16 layers of kernel 5 see all of it
    assert GatedPixelCNN(8, channels=4, num_layers=16, kernel_size=5, head_channels=4).covers(shape)
    assert not GatedPixelCNN(8, channels=4, num_layers=8, kernel_size=5, head_channels=4).covers((32, 16))
    assert layers_to_cover((32, 16), 5) == 15 and layers_to_cover((16, 8), 5) == 7


def test_last_position_depends_on_the_first_on_a_covered_map() -> None:
    # a 10 x 6 map needs span 8: 4 layers of kernel 5; the last logit moves with the first code
    model = make_model(num_layers=4, kernel_size=5)
    assert model.covers((10, 6)) and not make_model(num_layers=3, kernel_size=5).covers((10, 6))
    codes = torch.randint(0, 16, (1, 10, 6), generator=torch.Generator().manual_seed(4))
    changed = codes.clone()
    changed[0, 0, 0] = (changed[0, 0, 0] + 1) % 16
    assert (model(changed)[..., -1, -1] - model(codes)[..., -1, -1]).abs().max() > 1e-6
    shallow = make_model(num_layers=3, kernel_size=5)
    assert torch.equal(shallow(changed)[..., -1, -1], shallow(codes)[..., -1, -1])


# ---------------------------------------------------------------- spatial conditioning


@pytest.mark.parametrize("cond_shape,shape", [((3, 4), (6, 8)), ((2, 2), (8, 8)), ((2, 3), (4, 9))])
def test_every_conditioning_code_reaches_its_own_region(cond_shape: tuple, shape: tuple) -> None:
    model = make_model(num_layers=2, kernel_size=3, cond_embeddings=5)
    ratio = upsampling_ratio(cond_shape, shape)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (2, *shape), generator=gen)
    cond_codes = torch.randint(0, 5, (2, *cond_shape), generator=gen)
    e = model.cond_stack.embed(cond_codes).detach().requires_grad_(True)
    logits = model.forward_embedded(model.embed(codes), None, model.cond_stack.forward_embedded(e, shape))
    proj = torch.randn(16, generator=gen, dtype=logits.dtype)
    for r in range(cond_shape[0]):
        for c in range(cond_shape[1]):
            # the bottom positions under top code (r, c), i.e. its nearest-neighbour block
            block = logits[0, :, r * ratio[0] : (r + 1) * ratio[0], c * ratio[1] : (c + 1) * ratio[1]]
            (grad,) = torch.autograd.grad((block * proj[:, None, None]).sum(), e, retain_graph=True)
            assert grad[0, :, r, c].abs().sum() > 0, (r, c)
            assert grad[1].abs().sum() == 0  # samples in a batch are independent
    # and, with integer codes, changing any single conditioning code changes the logits
    base = model(codes, cond_codes=cond_codes)
    for r in range(cond_shape[0]):
        for c in range(cond_shape[1]):
            changed = cond_codes.clone()
            changed[0, r, c] = (changed[0, r, c] + 1) % 5
            out = model(codes, cond_codes=changed)
            assert (out[0] - base[0]).abs().max() > 1e-6 and torch.equal(out[1], base[1]), (r, c)


@pytest.mark.parametrize("ratio", [2, 4])
def test_conditioning_is_spatially_aligned(ratio: int) -> None:
    # The first position's logits see only the conditioning features at that position, which come from the top
    # codes within the conditioning stack's reach of top cell (0, 0): conv3x3 and one residual block (2 cells),
    # plus the 3x3 refinement after upsampling (1 more cell at most). Far codes must not matter.
    model = make_model(num_layers=2, kernel_size=3, cond_embeddings=5)
    size = 8 * ratio
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (1, size, size), generator=gen)
    cond_codes = torch.randint(0, 5, (1, 8, 8), generator=gen)
    e = model.cond_stack.embed(cond_codes).detach().requires_grad_(True)
    logits = model.forward_embedded(model.embed(codes), None, model.cond_stack.forward_embedded(e, (size, size)))
    logits[0, :, 0, 0].sum().backward()
    seen = e.grad[0].abs().sum(0) > 0
    assert seen[0, 0] and not seen[4:].any() and not seen[:, 4:].any(), seen.int()


# ---------------------------------------------------------------- fast == naive


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("cond_embeddings", [0, 5])
def test_fast_sampling_equals_naive(
    dtype: torch.dtype, num_classes: int, temperature: float, cond_embeddings: int
) -> None:
    model = make_model(
        num_layers=3, kernel_size=5, num_classes=num_classes, dtype=dtype, cond_embeddings=cond_embeddings
    )
    labels = torch.tensor([0, 2, 1]) if num_classes else None
    cond_codes = cond_codes_for(model, 3, 8, 6)
    kwargs = dict(
        shape=(8, 6), num_samples=3, temperature=temperature, labels=labels, return_logits=True, cond_codes=cond_codes
    )
    naive, naive_logits = sample_naive(model, generator=torch.Generator().manual_seed(7), **kwargs)
    fast, fast_logits = sample_fast(model, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(naive, fast)
    if temperature > 0:
        assert naive.unique().numel() >= 3  # the maps are not degenerate
    # the cached logits are those of a full forward pass on the final maps
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fast_logits, model(fast, labels, cond_codes), rtol=0, atol=tol)
    torch.testing.assert_close(naive_logits, fast_logits, rtol=0, atol=tol)


@pytest.mark.parametrize("cond_embeddings", [0, 5])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_fast_sampling_equals_naive_with_a_position_map(cond_embeddings: int, temperature: float) -> None:
    model = make_model(num_layers=3, kernel_size=5, cond_embeddings=cond_embeddings, position_shape=(8, 6))
    kwargs = dict(shape=(8, 6), num_samples=3, temperature=temperature, cond_codes=cond_codes_for(model, 3, 8, 6))
    naive = sample_naive(model, generator=torch.Generator().manual_seed(7), **kwargs)
    fast = sample_fast(model, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(naive, fast)
    with torch.no_grad():
        model.position.zero_()
    assert not torch.equal(fast, sample_fast(model, generator=torch.Generator().manual_seed(7), **kwargs))


@pytest.mark.parametrize("cond_embeddings", [0, 5])
def test_a_position_entry_changes_the_logits_there_and_after_only(cond_embeddings: int) -> None:
    # the map depends on no code, so it may reach its own position; the gates carry it only onwards
    model = make_model(num_layers=3, kernel_size=3, cond_embeddings=cond_embeddings, position_shape=(6, 4))
    codes = torch.randint(0, 16, (1, 6, 4), generator=torch.Generator().manual_seed(0))
    cond_codes = cond_codes_for(model, 1, 6, 4)
    base = model(codes, cond_codes=cond_codes)
    for i, j in [(0, 0), (2, 1), (5, 3)]:
        with torch.no_grad():
            model.position[:, :, i, j] += 1.0
        changed = (model(codes, cond_codes=cond_codes) - base).abs().amax(1)[0] > 0
        with torch.no_grad():
            model.position[:, :, i, j] -= 1.0
        assert changed[i, j] and not changed[raster_before(6, 4, i, j)].any(), (i, j)


def test_a_position_map_takes_only_its_own_map_shape() -> None:
    model = make_model(num_layers=2, kernel_size=3, position_shape=(6, 4))
    assert model.position.shape == (1, 6, 6, 4) and model.cond_channels == 6
    assert model(torch.zeros(2, 6, 4, dtype=torch.long)).shape == (2, 16, 6, 4)
    with pytest.raises(ValueError, match=r"position map for \(6, 4\) maps; got a map of \(8, 4\)"):
        model(torch.zeros(2, 8, 4, dtype=torch.long))
    for bad in [(6,), (0, 4)]:
        with pytest.raises(ValueError, match="position_shape"):
            GatedPixelCNN(16, 8, 2, 3, position_shape=bad)


def test_conditioning_codes_change_the_samples() -> None:
    model = make_model(num_layers=3, kernel_size=3, cond_embeddings=5)
    cond_codes = cond_codes_for(model, 2, 6, 4)
    other = cond_codes.clone()
    other[1] = (other[1] + 1) % 5

    def draw(cond: torch.Tensor) -> torch.Tensor:
        return sample_fast(model, (6, 4), 2, generator=torch.Generator().manual_seed(2), cond_codes=cond)

    a, b = draw(cond_codes), draw(other)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "shape,num_layers,kernel_size,temperature",
    [((5, 2), 2, 7, 1.0), ((1, 9), 3, 3, 1.0), ((7, 1), 2, 5, 0.8), ((4, 5), 4, 3, 0.0)],
)
@pytest.mark.parametrize("cond_embeddings", [0, 4])
def test_fast_sampling_equals_naive_edge_shapes(shape, num_layers, kernel_size, temperature, cond_embeddings) -> None:
    # kernels wider than the map, single row / column, argmax (temperature 0), conditioning map = map (ratio 1)
    model = make_model(num_layers=num_layers, kernel_size=kernel_size, num_classes=2, cond_embeddings=cond_embeddings)
    labels = torch.tensor([1, 0])
    cond_codes = cond_codes_for(model, 2, *shape, ratio=1)
    naive = sample_naive(model, shape, 2, temperature, labels, torch.Generator().manual_seed(3), cond_codes=cond_codes)
    fast = sample_fast(model, shape, 2, temperature, labels, torch.Generator().manual_seed(3), cond_codes=cond_codes)
    assert torch.equal(naive, fast)


# ---------------------------------------------------------------- CUDA graphs of the row pass


def refuse_capture() -> None:
    """Stands in for :meth:`RowSampler.capture` where CUDA graphs fail."""
    raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_graph_capture_is_logged_and_the_row_pass_runs_eagerly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model(num_layers=2, kernel_size=3, cond_embeddings=4).eval()
    weights = sampling.cached_weights(model, None, 2)
    row = sampling.RowSampler(model, weights, sampling.cache_buffers(model, 2, 4, 3, torch.device("cpu")), 3, 1.0)
    monkeypatch.setattr(row, "capture", refuse_capture)
    with caplog.at_level(logging.WARNING, logger=sampling.__name__):
        assert sampling.graph_if_possible(row, use_graph=True) is row
    assert row.graph is None
    assert "without a CUDA graph" in caplog.text and "operation not permitted when stream is capturing" in caplog.text
    links = [torch.randn_like(buffer) for buffer in row.links]
    codes, _ = row(links, torch.rand(3, 2, dtype=torch.float64))
    assert codes.shape == (2, 3) and 0 <= codes.min() and codes.max() < model.num_embeddings


def test_the_fast_sampler_captures_only_on_cuda_and_a_capture_error_still_gives_the_naive_codes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_model(num_layers=3, kernel_size=3, cond_embeddings=4)
    cond_codes = cond_codes_for(model, 2, 6, 4)
    requests = []
    real = sampling.graph_if_possible

    def spy(row: sampling.RowSampler, use_graph: bool) -> sampling.RowSampler:
        requests.append(use_graph)
        monkeypatch.setattr(row, "capture", refuse_capture)
        return real(row, True)  # as if on CUDA: capture is attempted and fails

    monkeypatch.setattr(sampling, "graph_if_possible", spy)
    fast = sample_fast(model, (6, 4), 2, 0.8, generator=torch.Generator().manual_seed(1), cond_codes=cond_codes)
    eager = sampling.sample_fast_eager(
        model, (6, 4), 2, 0.8, generator=torch.Generator().manual_seed(1), cond_codes=cond_codes
    )
    naive = sample_naive(model, (6, 4), 2, 0.8, generator=torch.Generator().manual_seed(1), cond_codes=cond_codes)
    assert requests == [False, False]  # on the CPU neither call asks for a graph
    assert torch.equal(fast, naive) and torch.equal(eager, naive)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cond_embeddings,num_classes,temperature", [(0, 0, 1.0), (5, 0, 0.6), (5, 3, 0.0)])
def test_cuda_graph_rows_give_the_codes_and_logits_of_the_eager_pass_with_one_replay_a_row(
    monkeypatch: pytest.MonkeyPatch, cond_embeddings: int, num_classes: int, temperature: float
) -> None:
    model = make_model(num_layers=4, num_classes=num_classes, cond_embeddings=cond_embeddings, dtype=torch.float32)
    model = model.cuda()
    labels = torch.tensor([0, 2, 1]) if num_classes else None
    cond_codes = cond_codes_for(model, 3, 8, 6)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: (replays.append(1), replay(graph))[1])

    def draw(method: str) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(7)
        return sampling.SAMPLERS[method](
            model, (8, 6), 3, temperature, labels, generator, cond_codes=cond_codes, return_logits=True
        )

    (eager, eager_logits), (naive, _) = draw("fast_eager"), draw("naive")
    assert not replays
    graphed, graphed_logits = draw("fast")
    assert len(replays) == 8  # one replay per row
    assert torch.equal(graphed, eager) and torch.equal(graphed_logits, eager_logits) and torch.equal(graphed, naive)


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


@pytest.mark.parametrize("cond_embeddings", [0, 5])
def test_forward_shape_and_training_step(cond_embeddings: int) -> None:
    model = make_model(
        num_embeddings=12,
        channels=8,
        num_layers=2,
        num_classes=2,
        dtype=torch.float32,
        sharpen=False,
        cond_embeddings=cond_embeddings,
    )
    codes = torch.randint(0, 12, (3, 8, 4))
    labels = torch.tensor([0, 1, 1])
    logits = model(codes, labels, cond_codes_for(model, 3, 8, 4))
    assert logits.shape == (3, 12, 8, 4) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits, codes)
    loss.backward()
    for name, param in model.named_parameters():  # every module takes part
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_samples_shape_range_determinism_and_mode() -> None:
    model = make_model(num_embeddings=10, dtype=torch.float32)
    model.train()
    for method in ("fast", "fast_eager", "naive"):
        s1 = sample_level(model, (4, 3), 2, generator=torch.Generator().manual_seed(0), method=method)
        s2 = sample_level(model, (4, 3), 2, generator=torch.Generator().manual_seed(0), method=method)
        s3 = sample_level(model, (4, 3), 2, generator=torch.Generator().manual_seed(1), method=method)
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
        sample_level(uncond, (2, 2), 1, method="beam")
    with pytest.raises(ValueError, match="kernel_size"):
        GatedPixelCNN(16, kernel_size=4)


def test_conditioning_errors() -> None:
    spatial = make_model(cond_embeddings=5)
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    cond = torch.zeros(2, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="no spatial conditioning"):
        make_model()(codes, cond_codes=cond)
    with pytest.raises(ValueError, match="cond_codes are required"):
        spatial(codes)
    with pytest.raises(ValueError, match=r"cond_codes must be in \[0, 5\)"):
        spatial(codes, cond_codes=torch.full((2, 2, 2), 5))
    with pytest.raises(ValueError, match="divide"):
        spatial(codes, cond_codes=torch.zeros(2, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="divide"):
        spatial(codes, cond_codes=torch.zeros(2, 8, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[2, h, w\]"):
        spatial(codes, cond_codes=torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="cond features"):
        spatial.forward_embedded(spatial.embed(codes))
    for sampler in (sample_fast, sample_naive):
        with pytest.raises(ValueError, match="cond_codes are required"):
            sampler(spatial, (4, 4), 2)
        with pytest.raises(ValueError, match="divide"):
            sampler(spatial, (4, 4), 2, cond_codes=torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cond_channels"):
        GatedPixelCNN(16, cond_embeddings=4, cond_channels=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cond_embeddings", [0, 5])
def test_cuda_matches_cpu(cond_embeddings: int) -> None:
    model = make_model(num_classes=2, dtype=torch.float64, cond_embeddings=cond_embeddings)
    labels = torch.tensor([1, 0])
    cond = cond_codes_for(model, 2, 6, 4)
    kwargs = dict(labels=labels, cond_codes=cond)
    cpu = sample_fast(model, (6, 4), 2, generator=torch.Generator().manual_seed(0), **kwargs)
    gpu = sample_fast(model, (6, 4), 2, generator=torch.Generator().manual_seed(0), device="cuda", **kwargs)
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    model.cuda()
    naive = sample_naive(model, (6, 4), 2, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(naive.cpu(), cpu)
