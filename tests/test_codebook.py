"""Codebook health: k-means init, dead-code restart, and the epoch-level usage monitor on a real Ignite engine."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from monai.networks.layers.vector_quantizer import EMAQuantizer
from monai.networks.nets import VQVAE
from torch.utils._python_dispatch import TorchDispatchMode

from bundle.stage1_vqvae.codebook import find_quantizer, init_codebook, kmeans, restart_dead_codes
from bundle.stage1_vqvae.codebook_monitor import CodebookMonitor


def _tiny_vqvae(num_embeddings: int = 32, decay: float = 0.99) -> VQVAE:
    return VQVAE(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        num_res_layers=1,
        num_res_channels=(8, 8),
        downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings=num_embeddings,
        embedding_dim=4,
        decay=decay,
    )


def test_kmeans_finds_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    data = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    found = kmeans(data, 3, generator=g)
    distances = torch.cdist(centres, found).min(1).values
    assert (distances < 0.5).all()


def test_kmeans_with_fewer_vectors_than_codes_gives_distinct_codes() -> None:
    found = kmeans(torch.randn(5, 3), 16, generator=torch.Generator().manual_seed(0))
    assert found.shape == (16, 3) and torch.unique(found, dim=0).shape[0] == 16


def test_init_codebook_places_codes_on_data_and_survives_an_ema_step() -> None:
    quantizer = EMAQuantizer(spatial_dims=2, num_embeddings=8, embedding_dim=2, decay=0.99)
    encodings = torch.randn(4, 2, 8, 8) * 0.1 + 5.0  # far from the N(0, 1) default codes
    init_codebook(quantizer, encodings, generator=torch.Generator().manual_seed(0))
    quantizer.train()
    _, _, indices = quantizer(encodings)
    assert torch.unique(indices).numel() >= 6, "data-initialised codes should all be near the data"
    # EMA statistics agree with the codes, so one update does not throw them back to the old positions.
    assert (quantizer.embedding.weight - 5.0).abs().max() < 1.0


def test_restart_moves_only_dead_codes_onto_pool_vectors() -> None:
    quantizer = EMAQuantizer(spatial_dims=2, num_embeddings=6, embedding_dim=3)
    before = quantizer.embedding.weight.clone()
    counts = torch.tensor([3, 0, 1, 0, 0, 9])
    pool = torch.full((10, 3), 7.0) + 0.01 * torch.randn(10, 3)
    assert restart_dead_codes(quantizer, counts, pool, generator=torch.Generator().manual_seed(0)) == 3
    after = quantizer.embedding.weight
    alive, dead = counts > 0, counts == 0
    assert torch.equal(after[alive], before[alive])
    assert ((after[dead] - 7.0).abs() < 0.1).all()
    assert torch.allclose(quantizer.ema_w[dead], after[dead] * quantizer.ema_cluster_size[dead, None])


def _train_engine(net: VQVAE, batches: list[torch.Tensor]) -> Engine:
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)

    def step(engine: Engine, batch: torch.Tensor) -> float:
        net.train()
        recon, qloss = net(batch)
        loss = (recon - batch).abs().mean() + qloss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return Engine(step)


def test_monitor_reports_epoch_usage_and_restarts_dead_codes() -> None:
    torch.manual_seed(0)
    net = _tiny_vqvae(num_embeddings=32)
    batches = [torch.rand(4, 1, 32, 32) for _ in range(6)]
    engine = _train_engine(net, batches)
    monitor = CodebookMonitor(net, init_from_data=True, restart_dead=True, restart_interval=3, seed=0)
    monitor.attach(engine)
    seen: list[torch.Tensor] = []
    find_quantizer(net).register_forward_hook(lambda m, a, out: seen.append(out[2].flatten()) if m.training else None)
    engine.run(batches, max_epochs=2)
    metrics = engine.state.metrics
    # The usage figures are those of the last epoch's codes, counted over the whole epoch.
    used = torch.unique(torch.cat(seen[-6:])).numel()
    assert metrics["codebook_usage"] == used / 32
    assert metrics["codebook_dead"] == 32 - used
    assert 1.0 <= metrics["codebook_perplexity"] <= used
    # Every code unused within one of the epoch's restart windows (iterations 7-9 and 10-12) was restarted.
    unused = [32 - torch.unique(torch.cat(window)).numel() for window in (seen[6:9], seen[9:12])]
    assert metrics["codebook_restarted"] == sum(unused) > 0
    assert set(metrics) == {"codebook_usage", "codebook_perplexity", "codebook_dead", "codebook_restarted"}


def test_monitor_initialises_only_a_fresh_run() -> None:
    torch.manual_seed(0)
    net = _tiny_vqvae()
    quantizer = find_quantizer(net)
    batches = [torch.rand(2, 1, 32, 32) + 3.0 for _ in range(2)]
    engine = _train_engine(net, batches)
    CodebookMonitor(net, init_from_data=True, restart_dead=False).attach(engine)
    original = quantizer.embedding.weight.clone()
    engine.state.iteration = 5  # what a resumed run looks like once CheckpointLoader has run
    engine.state.epoch = 1
    engine.run(batches, max_epochs=2)
    # No k-means: the EMA only nudges codes a little from their loaded positions.
    assert torch.allclose(quantizer.embedding.weight.mean(), original.mean(), atol=0.5)

    fresh = _tiny_vqvae()
    fresh_quantizer = find_quantizer(fresh)
    engine = _train_engine(fresh, batches)
    CodebookMonitor(fresh, init_from_data=True, restart_dead=False).attach(engine)
    before = fresh_quantizer.embedding.weight.clone()
    engine.run(batches[:1], max_epochs=1)
    assert not torch.allclose(fresh_quantizer.embedding.weight, before, atol=0.1)


class _OpLog(TorchDispatchMode):
    """Records the name of every ATen op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Ops whose result size or value the host must read (a GPU stream sync when run on a GPU).
HOST_READING_OPS = {"_local_scalar_dense", "nonzero", "bincount", "unique", "_unique2", "masked_select", "equal"}


def test_monitor_step_hooks_do_not_read_device_values_on_the_host() -> None:
    torch.manual_seed(0)
    net = _tiny_vqvae(num_embeddings=32).train()
    monitor = CodebookMonitor(net, init_from_data=False, restart_dead=True, restart_interval=10)
    quantizer = find_quantizer(net)
    encodings = torch.randn(2, 4, 8, 8)
    output = quantizer(encodings)
    log = _OpLog()
    with log:
        monitor.watches[0].after_quantize(quantizer, (encodings,), output)
    assert "index_add_" in log.ops and "randperm" in log.ops  # the hook ran (test premise)
    assert not HOST_READING_OPS & set(log.ops)
    assert int(monitor.epoch_counts.sum()) == 2 * 8 * 8
