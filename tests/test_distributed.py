"""Distributed training through ``configs/multi_gpu_train.json``: torchrun, 2 CPU processes (gloo), tiny phantoms.

A test-only overlay appends a probe handler to both trainers. On every rank it records the indices its
``DistributedSampler`` hands out each epoch, the code maps the prior is actually trained on, a digest of the
codebook that every training forward quantises with (taken after ``CodebookMonitor``'s k-means init), and the
final weights (``rank{r}.pt``). The test then checks the ranks' shards, the single set of outputs, and that both
ranks hold the same codebook and weights.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import ROOT, TINY_NETWORK, TINY_PRIOR

WORLD_SIZE = 2

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
"""Test-only handler: what this rank trained on, and its weights at the end."""
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.networks.layers.vector_quantizer import EMAQuantizer


class RankProbe:
    def __init__(self, path, network):
        self.path, self.network = Path(path), network
        self.rank = dist.get_rank()
        self.record = {"rank": self.rank, "world_size": dist.get_world_size(), "sampler": [], "epoch_length": [],
                       "items": 0, "codes": [], "codebook": []}

    def attach(self, engine):
        quantizers = [m for m in self.network.modules() if isinstance(m, EMAQuantizer)]
        for quantizer in quantizers:  # registered after CodebookMonitor's hook, so it sees the initialised codebook
            quantizer.register_forward_pre_hook(self._codebook_digest)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _codebook_digest(self, module, args):
        if module.training:
            weight = module.embedding.weight.detach().cpu().contiguous()
            self.record["codebook"].append(hashlib.sha1(weight.numpy().tobytes()).hexdigest())

    def _epoch_started(self, engine):
        sampler = engine.data_loader.sampler
        self.record["sampler_type"] = type(sampler).__name__
        self.record["sampler"].append([int(i) for i in sampler])
        self.record["epoch_length"].append(engine.state.epoch_length)

    def _iteration_completed(self, engine):
        batch = engine.state.batch
        key = "bottom" if "bottom" in batch else "image"
        self.record["items"] += len(batch[key])
        if key == "bottom":
            self.record["codes"].append(torch.cat([batch["top"].flatten(1), batch["bottom"].flatten(1)], 1).to(torch.int16).cpu())

    def _completed(self, engine):
        self.path.mkdir(parents=True, exist_ok=True)
        module = getattr(self.network, "module", self.network)
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        codes = torch.cat(self.record.pop("codes")) if self.record["codes"] else torch.zeros(0)
        torch.save({"state": state, "codes": codes}, self.path / f"rank{self.rank}.pt")
        (self.path / f"rank{self.rank}.json").write_text(json.dumps(self.record))
'''


def _probe_overlay(tmp: Path) -> Path:
    (tmp / "ddp_probe.py").write_text(textwrap.dedent(PROBE))
    overlay = {
        "+imports": ["$import ddp_probe"],
        "probe_dir": str(tmp / "probe"),
        "+train::handlers": [
            {"_target_": "ddp_probe.RankProbe", "path": "$@probe_dir + '/vqvae'", "network": "@network"}
        ],
        "+prior_train::handlers": [
            {"_target_": "ddp_probe.RankProbe", "path": "$@probe_dir + '/prior'", "network": "@prior_network"}
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
    for stage in ("train", "validate", "prior_train", "prior_validate"):
        sampler = parser[f"{stage}::sampler"]
        assert sampler["_target_"] == "DistributedSampler" and sampler["even_divisible"] is True
        assert parser[f"{stage}::dataloader::sampler"] == f"@{stage}::sampler"
        assert parser[f"{stage}::dataloader::shuffle"] is False
    # savers and loaders see the raw networks' state dicts: ignite unwraps DDP, and frozen_vqvae loads network_def
    assert "@network_def" in parser["frozen_vqvae"]


def test_overlay_only_adds_what_changes_across_processes() -> None:
    """The overlay holds the process group, the device, DDP wrapping and samplers, and no copy of other IDs."""
    overlay = ConfigParser.load_config_file(str(ROOT / "configs" / "multi_gpu_train.json"))
    allowed = {
        "+imports",
        "device",
        "dist_backend",
        "ddp_device_ids",
        "network",
        "prior_network",
        "initialize",
        "training",
        "finalize",
    }
    extra = {key for key in overlay if key not in allowed and not key.endswith("sampler")}
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
def ddp_run(tmp_path_factory: pytest.TempPathFactory, phantom_dir: Path) -> dict:
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
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD_SIZE}",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        configs,
        "--dataset_dir",
        str(phantom_dir),
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
        *TINY_NETWORK,
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
    return {"tmp": tmp, "log": log}


def _records(ddp_run: dict, stage: str) -> list[dict]:
    folder = ddp_run["tmp"] / "probe" / stage
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def _states(ddp_run: dict, stage: str) -> list[dict]:
    folder = ddp_run["tmp"] / "probe" / stage
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.mark.slow
def test_ranks_train_on_disjoint_shards(ddp_run: dict) -> None:
    for stage, n_items in (("vqvae", 18), ("prior", 18)):
        records = _records(ddp_run, stage)
        assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
        assert all(r["sampler_type"] == "DistributedSampler" for r in records)
        for epoch in range(2):
            shards = [set(r["sampler"][epoch]) for r in records]
            assert len(shards[0]) == len(shards[1]) == n_items // 2, stage
            assert not shards[0] & shards[1], f"{stage} epoch {epoch + 1}: ranks share samples"
            assert shards[0] | shards[1] == set(range(n_items)), stage
        assert records[0]["sampler"][0] != records[0]["sampler"][1], "set_epoch reshuffles each epoch"
        # drop_last with batch 4: each rank runs 9 // 4 = 2 iterations an epoch (a single process runs 18 // 4 = 4)
        assert all(r["epoch_length"] == [2, 2] and r["items"] == 2 * 2 * 4 for r in records)
    # The prior's batches are not augmented: each rank trained on exactly the code maps (top and bottom) of its own
    # shard, in order.
    encoded = torch.load(ddp_run["tmp"] / "outputs" / "codes" / "train.pt", weights_only=True)
    cache = torch.cat([encoded["top"].flatten(1), encoded["bottom"].flatten(1)], 1)
    trained = []
    for state, record in zip(_states(ddp_run, "prior"), _records(ddp_run, "prior")):
        used = [i for epoch in record["sampler"] for i in epoch[:8]]  # drop_last: 2 batches of 4 an epoch
        assert torch.equal(state["codes"], cache[used]), f"rank {record['rank']} trained on other code maps"
        trained.append(state["codes"])
    assert not torch.equal(trained[0], trained[1])


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
