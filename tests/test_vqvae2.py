"""The two-level VQ-VAE: code and image shapes, exact decoding from codes, both levels used, TorchScript, weights,
the scriptable EMA quantiser's distributed path, and the codebook monitor on both codebooks."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.networks.layers.vector_quantizer import EMAQuantizer

from bundle.stage1_vqvae.codebook import find_quantizer, find_quantizers, init_codebook
from bundle.stage1_vqvae.codebook_monitor import CodebookMonitor
from bundle.stage1_vqvae.export import VQVAE2Decoder
from bundle.stage1_vqvae.quantizer import ScriptableEMAQuantizer
from bundle.stage1_vqvae.vqvae2 import VQVAE2

TINY = {"channels": (8, 8), "num_res_layers": 1, "num_res_channels": 8, "embedding_dim": 4}
LEVELS = ("top", "bottom")


def _tiny(top_downsamples: int = 1, num_embeddings: tuple[int, int] = (16, 32), **kwargs) -> VQVAE2:
    return VQVAE2(**TINY, num_embeddings=num_embeddings, top_downsamples=top_downsamples, **kwargs)


@pytest.mark.parametrize("top_downsamples", [1, 2])
@pytest.mark.parametrize("size", [(256, 128), (256, 144)])
def test_code_and_reconstruction_shapes(top_downsamples: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = _tiny(top_downsamples).eval()
    x = torch.rand(2, 1, *size)
    top_factor = 4 * 2**top_downsamples
    expected_top, expected_bottom = (size[0] // top_factor, size[1] // top_factor), (size[0] // 4, size[1] // 4)
    assert net.latent_shapes(size) == (expected_top, expected_bottom)
    with torch.no_grad():
        reconstruction, loss = net(x)
        top, bottom = net.index_quantize(x)
    assert reconstruction.shape == x.shape and loss.ndim == 0 and torch.isfinite(loss)
    assert top.shape == (2, *expected_top) and bottom.shape == (2, *expected_bottom)
    assert top.dtype == bottom.dtype == torch.int64
    assert 0 <= int(top.min()) and int(top.max()) < 16 and 0 <= int(bottom.min()) and int(bottom.max()) < 32


@pytest.mark.parametrize("top_downsamples, size", [(1, (256, 124)), (2, (256, 136)), (2, (248, 128))])
def test_sizes_not_divisible_by_the_top_factor_are_rejected(top_downsamples: int, size: tuple[int, int]) -> None:
    net = _tiny(top_downsamples).eval()
    factor = 4 * 2**top_downsamples
    with pytest.raises(ValueError, match=f"divisible by {factor}"):
        net.latent_shapes(size)
    with pytest.raises(ValueError, match=f"divisible by {factor}"):
        net(torch.rand(1, 1, *size))


def test_decoding_the_codes_gives_the_reconstruction_exactly() -> None:
    torch.manual_seed(0)
    net = _tiny().eval()
    x = torch.rand(2, 1, 64, 32)
    with torch.no_grad():
        reconstruction, _ = net(x)
        decoded = net.decode_samples(*net.index_quantize(x))
        net.return_loss = False
        alone = net(x)
    assert torch.equal(decoded, reconstruction)
    assert torch.equal(alone, reconstruction)


def _init_codebooks_from(net: VQVAE2, x: torch.Tensor) -> None:
    """Both codebooks by k-means on the network's own encodings of ``x``, so that ``x`` uses many codes."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        top_encodings, bottom_features = net.encode(x)
        init_codebook(net.top_quantizer, top_encodings, generator)
        top_quantized = net.quantize_top(top_encodings)[0]
        bottom_encodings = net.bottom_projection(torch.cat([bottom_features, net.top_decoder(top_quantized)], 1))
        init_codebook(net.bottom_quantizer, bottom_encodings, generator)


def test_the_decoder_uses_both_levels_and_the_bottom_codes_depend_on_the_top() -> None:
    torch.manual_seed(0)
    net = _tiny().eval()
    x = torch.rand(2, 1, 64, 32)
    _init_codebooks_from(net, x)
    with torch.no_grad():
        top, bottom = net.index_quantize(x)
        assert torch.unique(top).numel() > 4 and torch.unique(bottom).numel() > 4  # test premise
        reference = net.decode_samples(top, bottom)
        other_top = net.decode_samples((top + 1) % 16, bottom)
        other_bottom = net.decode_samples(top, (bottom + 1) % 32)
        net.top_quantizer.embedding.weight.mul_(-1.0)  # different top code vectors, same images
        _, bottom_after = net.index_quantize(x)
    assert not torch.allclose(other_top, reference, atol=1e-4)
    assert not torch.allclose(other_bottom, reference, atol=1e-4)
    assert not torch.equal(bottom_after, bottom)


def test_straight_through_gradients_reach_both_encoders() -> None:
    torch.manual_seed(0)
    net = _tiny().train()
    x = torch.rand(2, 1, 64, 32)
    reconstruction, loss = net(x)
    ((reconstruction - x).abs().mean()).backward()  # no commitment loss: only the straight-through path
    for module in (net.bottom_encoder, net.top_encoder, net.top_decoder, net.bottom_projection):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("top_downsamples", [1, 2])
def test_torchscript_matches_eager(top_downsamples: int) -> None:
    torch.manual_seed(0)
    net = _tiny(top_downsamples, return_loss=False).eval()
    scripted = torch.jit.script(copy.deepcopy(net))  # scripting shares the parameters; keep net's apart
    x = torch.rand(2, 1, 256, 144)
    with torch.no_grad():
        top, bottom = net.index_quantize(x)
        scripted_top, scripted_bottom = scripted.index_quantize(x)
        assert torch.equal(scripted(x), net(x))
        assert torch.equal(scripted_top, top) and torch.equal(scripted_bottom, bottom)
        assert torch.equal(scripted.decode_samples(top, bottom), net.decode_samples(top, bottom))
    # A scripted training step updates the EMA codebooks as the eager one does.
    eager_copy = _tiny(top_downsamples, return_loss=False)
    eager_copy.load_state_dict(net.state_dict())
    scripted.train()(x)
    eager_copy.train()(x)
    for level in LEVELS:
        codebook = getattr(scripted, f"{level}_quantizer").embedding.weight
        assert torch.allclose(codebook, getattr(eager_copy, f"{level}_quantizer").embedding.weight, atol=1e-6)
        assert not torch.allclose(codebook, getattr(net, f"{level}_quantizer").embedding.weight)


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    net = _tiny().eval()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    torch.manual_seed(1)
    loaded = _tiny().eval()
    loaded.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), strict=True)
    assert {f"{level}_quantizer.ema_w" for level in LEVELS} <= set(net.state_dict())
    x = torch.rand(2, 1, 64, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], net(x)[0])


def test_decoder_export_form_loads_the_full_checkpoint_and_scripts() -> None:
    torch.manual_seed(0)
    net = _tiny(2).eval()
    decoder = VQVAE2Decoder(**TINY, num_embeddings=(16, 32), top_downsamples=2)
    decoder.load_state_dict(net.state_dict(), strict=True)
    assert not hasattr(decoder, "bottom_encoder") and not hasattr(decoder, "top_decoder")
    top, bottom = torch.randint(16, (2, 4, 2)), torch.randint(32, (2, 16, 8))
    scripted = torch.jit.script(decoder.eval())
    traced = torch.jit.trace(decoder, (torch.rand(1, 4, 2), torch.rand(1, 16, 8)))
    with torch.no_grad():
        expected = net.decode_samples(top, bottom)
        assert torch.equal(scripted(top, bottom), expected)
        assert torch.equal(traced(top, bottom), expected)


def test_quantisation_stays_fp32_under_cpu_bf16_autocast() -> None:
    torch.manual_seed(0)
    net = _tiny(num_embeddings=(512, 512)).eval()
    net.top_quantizer.embedding.weight.data = 1.0 + 1e-3 * torch.randn(512, 4)  # near ties in bf16
    encodings = 1.0 + 1e-3 * torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        reference = net.top_quantizer.quantize(encodings)[2]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            quantized, loss, indices = net.quantize_top(encodings)
            raw = net.top_quantizer.quantize(encodings)[2]
    assert torch.equal(indices, reference) and quantized.dtype == loss.dtype == torch.float32
    assert torch.equal(quantized, net.top_quantizer.embed(reference))
    assert not torch.equal(raw, reference), "bf16 distances should have changed some codes (test premise)"


@pytest.mark.parametrize("ddp_sync", [True, False])
def test_eager_training_sums_ema_statistics_over_ranks(monkeypatch: pytest.MonkeyPatch, ddp_sync: bool) -> None:
    reduced: list[torch.Size] = []

    def fake_all_reduce(tensor: torch.Tensor, op: object = None) -> None:
        reduced.append(tensor.shape)
        tensor.mul_(2.0)  # what a second rank with the same batch would add

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    quantizer = ScriptableEMAQuantizer(spatial_dims=2, num_embeddings=8, embedding_dim=3, decay=0.0, ddp_sync=ddp_sync)
    quantizer.train()(torch.randn(2, 3, 4, 4))
    assert reduced == ([torch.Size([8]), torch.Size([8, 3])] if ddp_sync else [])
    assert float(quantizer.ema_cluster_size.sum()) == pytest.approx(2 * 32 if ddp_sync else 32)


def test_quantiser_matches_monai_ema_quantizer_without_a_one_hot_matrix() -> None:
    torch.manual_seed(0)
    ours = ScriptableEMAQuantizer(spatial_dims=2, num_embeddings=64, embedding_dim=8, decay=0.9)
    monai_quantizer = EMAQuantizer(spatial_dims=2, num_embeddings=64, embedding_dim=8, decay=0.9)
    monai_quantizer.load_state_dict(ours.state_dict())
    for step in range(3):  # the codebooks move apart if one EMA update differs
        encodings = torch.randn(4, 8, 16, 8, requires_grad=True)
        quantized, loss, indices = ours.train()(encodings)
        expected_quantized, expected_loss, expected_indices = monai_quantizer.train()(encodings)
        assert indices.shape == (4, 16, 8) and torch.equal(indices, expected_indices), step
        assert torch.equal(quantized, expected_quantized) and torch.allclose(loss, expected_loss)
        for name, value in monai_quantizer.state_dict().items():
            assert torch.allclose(ours.state_dict()[name], value, rtol=1e-5, atol=1e-6), (step, name)
    quantized.sum().backward()
    assert torch.equal(encodings.grad, torch.ones_like(encodings))  # straight through
    assert float(ours.ema_cluster_size.sum()) == pytest.approx(float(monai_quantizer.ema_cluster_size.sum()))


def test_quantisers_are_found_by_level_name() -> None:
    net = _tiny()
    assert find_quantizers(net) == {"top": net.top_quantizer, "bottom": net.bottom_quantizer}
    assert find_quantizers(torch.nn.Sequential(net)).keys() == {"top", "bottom"}
    with pytest.raises(TypeError, match="2 quantisers"):
        find_quantizer(net)


def _train_engine(net: VQVAE2) -> Engine:
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)

    def step(engine: Engine, batch: torch.Tensor) -> float:
        net.train()
        reconstruction, loss = net(batch)
        loss = (reconstruction - batch).abs().mean() + loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return Engine(step)


def _record_codes(net: VQVAE2) -> dict[str, list[torch.Tensor]]:
    """Codes of every training forward per level, and the codebook each forward quantised with."""
    seen: dict[str, list[torch.Tensor]] = {level: [] for level in LEVELS}
    for level in LEVELS:
        quantizer = getattr(net, f"{level}_quantizer")
        quantizer.register_forward_hook(
            lambda m, a, out, level=level: seen[level].append(out[2].flatten()) if m.training else None
        )
    return seen


def test_monitor_initialises_both_codebooks_from_data() -> None:
    torch.manual_seed(0)
    batches = [torch.rand(4, 1, 32, 32)]
    used_first: dict[str, dict[bool, int]] = {level: {} for level in LEVELS}
    for init in (False, True):
        torch.manual_seed(0)
        net = _tiny(num_embeddings=(16, 32))
        engine = _train_engine(net)
        CodebookMonitor(net, init_from_data=init, restart_dead=False).attach(engine)
        seen = _record_codes(net)
        engine.run(batches, max_epochs=1)
        for level in LEVELS:
            used_first[level][init] = torch.unique(seen[level][0]).numel()
    for level, size in zip(LEVELS, (16, 32)):
        # the first batch (64 top and 256 bottom vectors) reaches most codes only when they start on its data
        assert used_first[level][True] >= 0.75 * size, used_first
        assert used_first[level][False] < 0.5 * size, "default codes should miss the data (test premise)"


def test_monitor_restarts_dead_codes_and_reports_each_level() -> None:
    torch.manual_seed(0)
    net = _tiny(num_embeddings=(16, 64))
    batches = [torch.rand(2, 1, 32, 32) for _ in range(6)]
    engine = _train_engine(net)
    CodebookMonitor(net, init_from_data=True, restart_dead=True, restart_interval=3, seed=0).attach(engine)
    seen = _record_codes(net)
    engine.run(batches, max_epochs=2)
    metrics = engine.state.metrics
    assert {k for k in metrics if k.startswith("codebook_")} == {
        f"codebook_{level}_{key}" for level in LEVELS for key in ("usage", "perplexity", "dead", "restarted")
    }
    for level, size in zip(LEVELS, (16, 64)):
        last_epoch = seen[level][6:]
        used = torch.unique(torch.cat(last_epoch)).numel()
        assert metrics[f"codebook_{level}_usage"] == used / size
        assert metrics[f"codebook_{level}_dead"] == size - used
        assert 1.0 <= metrics[f"codebook_{level}_perplexity"] <= used
        # every code unused within a restart window (iterations 7-9, 10-12) was restarted
        unused = [size - torch.unique(torch.cat(window)).numel() for window in (last_epoch[:3], last_epoch[3:])]
        assert metrics[f"codebook_{level}_restarted"] == sum(unused) > 0


def test_top_thumbnail_loss_is_added_with_its_weight_and_trains_the_top_level() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 32)
    plain, weighted = _tiny().eval(), _tiny(top_reconstruction_weight=2.0).eval()  # eval: the codebooks stay put
    weighted.load_state_dict(plain.state_dict())
    _, plain_loss = plain(x)
    reconstruction, weighted_loss = weighted(x)
    top_quantized = weighted.quantize_top(weighted.encode(x)[0])[0]
    thumbnail = weighted.top_head(weighted.top_upsampler(top_quantized))
    expected = torch.mean(torch.abs(thumbnail - torch.nn.functional.avg_pool2d(x, 4)))
    assert thumbnail.shape == (2, 1, 16, 8)
    torch.testing.assert_close(weighted_loss - plain_loss, 2.0 * expected)
    torch.testing.assert_close(reconstruction, plain(x)[0])  # the reconstruction itself is unchanged
    weighted_loss.backward()
    assert weighted.top_head.conv.weight.grad.abs().sum() > 0
    assert weighted.top_encoder.blocks[0].conv.weight.grad.abs().sum() > 0
    plain_loss.backward()
    assert plain.top_head.conv.weight.grad is None
