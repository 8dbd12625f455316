"""Distributed training through ``configs/multi_gpu_train.json``: torchrun (the multi-node form, on one node), 2 CPU
processes (gloo), tiny phantoms (18 training slices, 9 validation slices: an odd count), compiled networks.

A test-only overlay appends a probe handler to both trainers and both evaluators. On every rank it records the
items its training data sets hold and cache, the indices its samplers hand out each epoch, the code maps the prior
is actually trained on, a digest of the codebook that every training forward quantises with (taken after
``CodebookMonitor``'s k-means init), whether the trainers ran compiled networks, over how many items every
validation metric was reduced, and the final weights (``rank{r}.pt``). The test then checks the ranks' shards,
the single set of outputs, and that both ranks hold the same codebook and weights.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import ROOT, TINY_NETWORK, TINY_PRIOR

WORLD_SIZE = 2
N_TRAIN, N_VAL = 18, 9
# DDP around torch.compile'd networks. aot_eager runs TorchDynamo, AOTAutograd and DDP's graph splitting like
# inductor does, without inductor's C++ code generation, which costs minutes on 2 busy cores.
COMPILE_KWARGS = "{'backend': 'aot_eager'}"

# Handlers that write files or console output: on rank 0 only (``"_disabled_": "@is_not_rank0"`` in the training configs).
RANK0_ONLY = {
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "ignite.handlers.ProgressBar",
    "bundle.engine.checkpoint.EngineCheckpointSaver",
    "bundle.engine.checkpoint.AtomicCheckpointSaver",
    "bundle.stage2_prior.sample_grid.SampleGridWriter",
}
HANDLER_LISTS = ["train::handlers", "validate::handlers", "prior_train::handlers", "prior_validate::handlers"]

PROBE = '''
"""Test-only handler: what this rank trained or validated on, and its weights at the end."""
import hashlib
import json
from pathlib import Path

import torch
import ignite.distributed as idist
import torch.distributed as dist
from ignite.engine import Events
from ignite.metrics import Loss
from monai.handlers import IgniteMetricHandler
from monai.networks.layers.vector_quantizer import EMAQuantizer


class RankProbe:
    def __init__(self, path, network=None, metrics=None, compile_kwargs=None):
        self.path, self.network, self.metrics, self.compile_kwargs = Path(path), network, metrics or {}, compile_kwargs
        self.rank = dist.get_rank()
        self.record = {"rank": self.rank, "world_size": dist.get_world_size(), "sampler": [], "epoch_length": [],
                       "items": 0, "codes": [], "codebook": [], "metric_items": []}

    def attach(self, engine):
        quantizers = [m for m in self.network.modules() if isinstance(m, EMAQuantizer)] if self.network else []
        for quantizer in quantizers:  # registered after CodebookMonitor's hook, so it sees the initialised codebook
            quantizer.register_forward_pre_hook(self._codebook_digest)
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _codebook_digest(self, module, args):
        if module.training:
            weight = module.embedding.weight.detach().cpu().contiguous()
            self.record["codebook"].append(hashlib.sha1(weight.numpy().tobytes()).hexdigest())

    def _started(self, engine):
        dataset = engine.data_loader.dataset
        self.record["dataset_len"] = len(dataset)
        if hasattr(dataset, "_cache"):  # CacheDataset: the slices this rank holds, and how many it cached
            self.record["files"] = [str(item["image"]) for item in dataset.data]
            self.record["cached"] = sum(item is not None for item in dataset._cache)
            self.record["cache_devices"] = sorted({str(item["image"].device) for item in dataset._cache})
        elif hasattr(dataset, "files"):  # CodeDataset
            self.record["files"] = list(dataset.files)
        self.record["compiled"] = type(engine.network).__name__

    def _epoch_started(self, engine):
        sampler = engine.data_loader.sampler
        self.record["sampler_type"] = type(sampler).__name__
        self.record["sampler"].append([int(i) for i in sampler])
        self.record["epoch_length"].append(engine.state.epoch_length)

    def _iteration_completed(self, engine):
        batch = engine.state.batch
        key = "bottom" if "bottom" in batch else "image"
        self.record["items"] += len(batch[key])
        if key == "bottom" and engine.network.training:
            self.record["codes"].append(torch.cat([batch["top"].flatten(1), batch["bottom"].flatten(1)], 1).to(torch.int16).cpu())

    def _epoch_completed(self, engine):
        # After the metrics' own EPOCH_COMPLETED (attached first): over how many items each metric's value was
        # reduced on all ranks, and the value recomputed from those items. MONAI's metrics keep the gathered
        # per-image buffer; ignite's Loss all-reduces its sums inside compute() only, so they are reduced here.
        counts = {}
        for name, metric in self.metrics.items():
            if isinstance(metric, IgniteMetricHandler):
                buffer = metric.metric_fn.get_buffer()
                count, value = len(buffer), float(buffer.float().mean())
            elif isinstance(metric, Loss):
                count = int(idist.all_reduce(int(metric._num_examples)))
                value = float(idist.all_reduce(float(metric._sum))) / count
            else:
                raise TypeError(f"probe does not know how {type(metric).__name__} counts items")
            counts[name] = [count, value, float(engine.state.metrics[name])]
        self.record["metric_items"].append(counts)

    def _completed(self, engine):
        self.path.mkdir(parents=True, exist_ok=True)
        if self.compile_kwargs is not None:
            self.record["compile_failures"] = list(self.compile_kwargs["backend"].failures)
            self.record["unique_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        if self.network is not None:
            module = getattr(self.network, "module", self.network)
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            codes = torch.cat(self.record["codes"]) if self.record["codes"] else torch.zeros(0)
            torch.save({"state": state, "codes": codes}, self.path / f"rank{self.rank}.pt")
        record = {k: v for k, v in self.record.items() if k != "codes"}
        (self.path / f"rank{self.rank}.json").write_text(json.dumps(record))
'''


def _probe_overlay(tmp: Path) -> Path:
    (tmp / "ddp_probe.py").write_text(textwrap.dedent(PROBE))
    overlay = {
        "+imports": ["$import ddp_probe"],
        "probe_dir": str(tmp / "probe"),
        "+train::handlers": [
            {
                "_target_": "ddp_probe.RankProbe",
                "path": "$@probe_dir + '/vqvae'",
                "network": "@network",
                "compile_kwargs": "@engine_compile_kwargs",
            }
        ],
        "+prior_train::handlers": [
            {
                "_target_": "ddp_probe.RankProbe",
                "path": "$@probe_dir + '/prior'",
                "network": "@prior_network",
                "compile_kwargs": "@engine_compile_kwargs",
            }
        ],
        "+validate::handlers": [
            {
                "_target_": "ddp_probe.RankProbe",
                "path": "$@probe_dir + '/validate'",
                "metrics": "$dict(@validate::key_metric, **@validate::additional_metrics)",
            }
        ],
        "+prior_validate::handlers": [
            {
                "_target_": "ddp_probe.RankProbe",
                "path": "$@probe_dir + '/prior_validate'",
                "metrics": "$dict(@prior_validate::key_metric, **@prior_validate::additional_metrics)",
            }
        ],
    }
    path = tmp / "probe_overlay.json"
    path.write_text(json.dumps(overlay, indent=2))
    return path


def test_writers_are_disabled_on_other_ranks_and_only_writers() -> None:
    """Every file/console writer is rank-0 only, and nothing that takes part in collectives is."""
    parser = ConfigParser()
    parser.read_config(
        [
            "configs/inference.json",
            "configs/train_vqvae.json",
            "configs/train_prior.json",
            "configs/multi_gpu_train.json",
        ]
    )
    for list_id in HANDLER_LISTS:
        for index, handler in enumerate(parser[list_id]):
            if isinstance(handler, str):  # a reference to a top-level ID, e.g. "@prior_level_stopping"
                handler = parser[handler.lstrip("@")]
            target = handler["_target_"]
            rank0_only = handler.get("_disabled_") == "@is_not_rank0"
            assert rank0_only == (target in RANK0_ONLY), f"{list_id}::{index} ({target})"


def test_overlay_wraps_both_networks_and_shards_all_loaders() -> None:
    parser = ConfigParser()
    parser.read_config(
        [
            "configs/inference.json",
            "configs/train_vqvae.json",
            "configs/train_prior.json",
            "configs/multi_gpu_train.json",
        ]
    )
    parser.resolve_macro_and_relative_ids()
    for net, definition in (("network", "@network_def"), ("prior_network", "@prior_def")):
        assert parser[net].startswith("$torch.nn.parallel.DistributedDataParallel(") and definition in parser[net]
    # Validation: each rank scores its part of the set, and the parts cover each slice exactly once (no padding
    # with duplicates, which would bias the metrics that pick the best checkpoint).
    for stage in ("validate", "prior_validate"):
        sampler = parser[f"{stage}::sampler"]
        assert sampler["_target_"] == "DistributedSampler" and sampler["even_divisible"] is False
        assert parser[f"{stage}::dataloader::sampler"] == f"@{stage}::sampler"
        assert parser[f"{stage}::dataloader::shuffle"] is False
    # Training: each rank's data set holds only its shard of the training list (so it caches only that, on the
    # device or the host), the same shard for both stages, and the single-process shuffling sampler walks it.
    assert parser["train_shard"].startswith("$monai.data.partition_dataset(")
    assert "even_divisible=True" in parser["train_shard"] and "shuffle=True" in parser["train_shard"]
    assert "@train_shard" in parser["train::dataset::data"]
    assert parser["prior_train::dataset::indices"] == "@train_shard"
    for stage in ("train", "prior_train"):
        assert parser[f"{stage}::sampler::num_replicas"] == 1 and parser[f"{stage}::sampler::shuffle"] is True
    # savers and loaders see the raw networks' state dicts: ignite unwraps DDP, and frozen_vqvae loads network_def
    assert "@network_def" in parser["frozen_vqvae"]


def test_overlay_only_adds_what_changes_across_processes() -> None:
    """The overlay holds the process group, the device, DDP wrapping, the training shard and the validation samplers,
    and no copy of other IDs."""
    overlay = ConfigParser.load_config_file(str(ROOT / "configs" / "multi_gpu_train.json"))
    allowed = {
        "+imports",
        "device",
        "dist_backend",
        "ddp_device_ids",
        "network",
        "prior_network",
        "train_shard",
        "train#dataset#data",
        "prior_train#dataset#indices",
        "validate#sampler",
        "validate#dataloader#sampler",
        "prior_validate#sampler",
        "prior_validate#dataloader#sampler",
        "initialize",
        "training",
        "finalize",
    }
    extra = {key for key in overlay if key not in allowed}
    assert not extra, f"the multi-GPU overlay copies IDs it does not change: {sorted(extra)}"
    assert overlay["initialize"][0].startswith("$torch.distributed.is_initialized() or")
    assert "$idist.sync()" in overlay["initialize"], "ignite must pick up the process group before rank-0-only queries"
    assert overlay["finalize"][-1] == "$torch.distributed.destroy_process_group()"
    assert overlay["training"] == [
        "@batch_checks",
        "@prior_batch_checks",
        "$@train#trainer.run()",
        "$torch.distributed.barrier()",
        "$@prior_train#trainer.run()",
    ]


@pytest.fixture(scope="module")
def ddp_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 training slices (9 a rank) and an odd number of validation slices: 9, so the ranks validate 5 and 4
    (2 and 1 batches of 4), and a sampler that pads with a duplicate would validate 10."""
    from bundle.data.phantom import write_hipmri_phantoms

    root = tmp_path_factory.mktemp("ddp_phantom")
    counts = write_hipmri_phantoms(
        root, train_cases=2, val_cases=1, test_cases=1, slices_per_case=N_VAL, trailing_axis_every=5
    )
    assert counts["train"] == N_TRAIN and counts["validate"] == N_VAL and N_VAL % WORLD_SIZE
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, ddp_phantoms: Path) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    overlay = _probe_overlay(tmp)
    configs = str(
        [
            "configs/inference.json",
            "configs/train_vqvae.json",
            "configs/train_prior.json",
            "configs/multi_gpu_train.json",
            str(overlay),
        ]
    )
    tiny_network = list(TINY_NETWORK)
    tiny_network[tiny_network.index("--compile") + 1] = "True"  # DDP around compiled networks
    # The multi-node form (explicit c10d rendezvous), on one node: a second node would run the same command with
    # --nnodes=2 --node_rank=1 and this node's address as the endpoint.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node_rank=0",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=localhost:{_free_port()}",
        f"--rdzv-id=bundle-test-{uuid.uuid4().hex[:8]}",
        f"--nproc_per_node={WORLD_SIZE}",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        configs,
        "--dataset_dir",
        str(ddp_phantoms),
        "--output_dir",
        str(tmp / "outputs"),
        "--ckpt_dir",
        str(tmp / "models"),
        "--batch_size",
        "4",
        "--max_epochs",
        "2",
        "--prior_batch_size",
        "4",
        "--prior_max_epochs",
        "2",
        "--prior_sample_count",
        "2",
        "--codebook_restart_interval",
        "1",
        "--data_on_device",
        "True",
        "--compile_kwargs",
        COMPILE_KWARGS,
        *tiny_network,
        *TINY_PRIOR,
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]),
    )
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as error:  # a collective mismatch hangs rather than fails
        pytest.fail(f"torchrun timed out (a rank waiting in a collective?):\n{str(error.stdout)[-4000:]}")
    log = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{log[-8000:]}")
    return {"tmp": tmp, "log": log, "phantoms": ddp_phantoms}


def _records(ddp_run: dict, stage: str) -> list[dict]:
    folder = ddp_run["tmp"] / "probe" / stage
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def _states(ddp_run: dict, stage: str) -> list[dict]:
    folder = ddp_run["tmp"] / "probe" / stage
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.mark.slow
def test_ranks_train_on_disjoint_shards(ddp_run: dict) -> None:
    """Each rank's training data sets hold only its shard of the slices (disjoint, covering them all), it caches
    only those, and both stages use the same shard."""
    files = sorted(str(p) for p in (ddp_run["phantoms"] / "keras_slices_train").iterdir())
    assert len(files) == N_TRAIN
    shard = N_TRAIN // WORLD_SIZE
    records = {stage: _records(ddp_run, stage) for stage in ("vqvae", "prior")}
    for stage, stage_records in records.items():
        assert [r["rank"] for r in stage_records] == [0, 1] and all(r["world_size"] == 2 for r in stage_records)
        shards = [r["files"] for r in stage_records]
        assert all(r["dataset_len"] == len(s) == shard for r, s in zip(stage_records, shards)), stage
        assert not set(shards[0]) & set(shards[1]), f"{stage}: ranks share slices"
        assert sorted(shards[0] + shards[1]) == files, f"{stage}: the shards do not cover the training set"
        for record in stage_records:
            # the single-process sampler walks this rank's own items, reshuffled each epoch
            assert record["sampler_type"] == "DistributedSampler"
            assert all(sorted(epoch) == list(range(shard)) for epoch in record["sampler"]), stage
            assert record["sampler"][0] != record["sampler"][1], "set_epoch reshuffles each epoch"
            # drop_last with batch 4: 9 // 4 = 2 iterations an epoch on each rank (a single process runs 18 // 4)
            assert record["epoch_length"] == [2, 2] and record["items"] == 2 * 2 * 4
    for vqvae, prior in zip(records["vqvae"], records["prior"]):
        assert vqvae["files"] == prior["files"], "the prior trains on the code maps of the VQ-VAE's shard"
        # data_on_device: the cache is built from this rank's shard only, and held on its device
        assert vqvae["cached"] == shard and vqvae["cache_devices"] == ["cpu"]
    # The prior's batches are not augmented: each rank trained on exactly the code maps (top and bottom) of its own
    # shard, in its sampler's order.
    encoded = torch.load(ddp_run["tmp"] / "outputs" / "codes" / "train.pt", weights_only=True)
    assert sorted(encoded["files"]) == files
    cache = torch.cat([encoded["top"].flatten(1), encoded["bottom"].flatten(1)], 1)
    trained = []
    for state, record in zip(_states(ddp_run, "prior"), records["prior"]):
        rows = [encoded["files"].index(f) for f in record["files"]]
        used = [rows[i] for epoch in record["sampler"] for i in epoch[:8]]  # drop_last: 2 batches of 4 an epoch
        assert torch.equal(state["codes"], cache[used]), f"rank {record['rank']} trained on other code maps"
        trained.append(state["codes"])
    assert not torch.equal(trained[0], trained[1])


@pytest.mark.slow
def test_validation_scores_every_slice_exactly_once(ddp_run: dict) -> None:
    """Uneven validation shards (5 and 4 of 9): the ranks' indices are disjoint and cover every item once, and every
    metric (MONAI's gathered buffers, and the ignite ``Loss`` sums behind ``NLLBits``) reduces over exactly 9."""
    for stage, metrics in (
        ("validate", ["val_ssim", "val_psnr", "val_mse"]),
        ("prior_validate", ["val_nll_bits_image", "val_nll_bits_top", "val_nll_bits_bottom"]),
    ):
        records = _records(ddp_run, stage)
        runs = len(records[0]["sampler"])
        assert runs == 2 and all(len(r["sampler"]) == runs for r in records), f"{stage}: one validation an epoch"
        for run in range(runs):
            shards = [r["sampler"][run] for r in records]
            assert not set(shards[0]) & set(shards[1]), f"{stage}: ranks validate the same items"
            assert sorted(shards[0] + shards[1]) == list(range(N_VAL)), f"{stage}: not every item exactly once"
            assert [len(s) for s in shards] == [5, 4]
            for record in records:
                assert sorted(record["metric_items"][run]) == sorted(metrics), stage
                for name, (count, recomputed, value) in record["metric_items"][run].items():
                    assert count == N_VAL, f"{stage} {name}: reduced over {count} items, not {N_VAL}"
                    assert value == pytest.approx(recomputed, rel=1e-5), f"{stage} {name}: not the mean of all"
                    assert value == records[0]["metric_items"][run][name][2], f"{stage} {name}: ranks disagree"
        assert [r["epoch_length"] for r in records] == [[2, 2], [1, 1]]  # uneven batch counts do not hang
        assert [r["items"] for r in records] == [2 * 5, 2 * 4]


@pytest.mark.slow
def test_one_set_of_outputs_written_by_rank_0(ddp_run: dict) -> None:
    tmp = ddp_run["tmp"]
    models = sorted(str(p.relative_to(tmp / "models")) for p in (tmp / "models").rglob("*.pt"))
    assert models == ["model.pt", "model_final.pt", "prior/prior.pt", "prior/prior_final.pt"]
    # The best-score records that keep a resumed run from replacing a better model: one each, by rank 0.
    assert sorted(p.name for p in (tmp / "models").rglob(".*.best.json")) == [
        ".model.pt.best.json",
        ".prior.pt.best.json",
    ]
    checkpoints = sorted(
        str(p.relative_to(tmp / "outputs" / "checkpoints"))
        for p in (tmp / "outputs" / "checkpoints").rglob("*")
        if p.is_file()
    )
    assert [c for c in checkpoints if c.endswith(".pt")] == ["checkpoint_epoch=2.pt", "prior/checkpoint_epoch=2.pt"]
    assert set(checkpoints) - {"checkpoint_epoch=2.pt", "prior/checkpoint_epoch=2.pt"} <= {
        "run_config.json",
        "versions.json",
    }
    events = list((tmp / "outputs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1, "TensorBoard files from more than one process"
    assert (tmp / "outputs" / "prior_samples.png").is_file()
    for path in ("model.pt", "model_final.pt", "prior/prior.pt"):
        state = torch.load(tmp / "models" / path, weights_only=True)
        assert not any(k.startswith("module.") for k in state), f"{path} holds DDP-prefixed keys"
    checkpoint = torch.load(tmp / "outputs" / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    log = ddp_run["log"]
    assert log.count("Outputs:") == 1 and log.count("Train completed, saved final checkpoint") == 2  # VQ-VAE, prior
    assert len(re.findall(r"Epoch\[2\] Metrics -- .*val_ssim", log)) == 1, "metrics printed by rank 0 only"


@pytest.mark.slow
def test_both_trainers_ran_compiled_networks_under_ddp(ddp_run: dict) -> None:
    """``--compile True``: each rank's trainers ran torch.compile'd DDP networks, no graph fell back to eager (the
    weights that come out identical on both ranks are checked below)."""
    assert ddp_run["log"].count("torch.compile on cpu with") == WORLD_SIZE  # use_compile: once a rank, both stages
    graphs = {}
    for stage in ("vqvae", "prior"):
        for record in _records(ddp_run, stage):
            assert record["compiled"] == "OptimizedModule", f"{stage}: rank {record['rank']} trained eagerly"
            assert record["compile_failures"] == [], f"{stage}: graphs fell back to eager"
            graphs.setdefault(stage, []).append(record["unique_graphs"])
    # TorchDynamo's count of compiled graphs in each process grows in both stages
    assert all(0 < v < p for v, p in zip(graphs["vqvae"], graphs["prior"])), graphs


@pytest.mark.slow
def test_codebook_and_weights_identical_on_every_rank(ddp_run: dict) -> None:
    log = ddp_run["log"]
    assert log.count("codebook initialised by k-means") == 2 * WORLD_SIZE  # top and bottom, on each rank
    restarted = [int(v) for v in re.findall(r"codebook_(?:top|bottom)_restarted=(\d+)", log)]
    assert restarted and max(restarted) > 0, "no dead-code restart happened: the broadcast after it is untested"
    digests = [r["codebook"] for r in _records(ddp_run, "vqvae")]
    assert len(digests[0]) == 2 * 4 and digests[0] == digests[1], "ranks quantised with different codebooks"
    assert len(set(digests[0])) > 1, "the codebook never moved"
    final = torch.load(ddp_run["tmp"] / "models" / "model_final.pt", weights_only=True)
    for stage in ("vqvae", "prior"):
        rank0, rank1 = (s["state"] for s in _states(ddp_run, stage))
        assert rank0.keys() == rank1.keys()
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{stage}: {key} differs between ranks"
    rank0 = _states(ddp_run, "vqvae")[0]["state"]
    for key in [
        f"{level}_quantizer.{name}"
        for level in ("top", "bottom")
        for name in ("embedding.weight", "ema_cluster_size", "ema_w")
    ]:
        assert torch.equal(rank0[key], final[key]), key
