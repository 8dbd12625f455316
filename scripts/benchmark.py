"""Performance benchmark of the bundle: training, data pipeline, inference and sampling, side by side in one run.

Run from the repository root::

    python scripts/benchmark.py                               # full run, under 10 minutes on a 2-core CPU
    python scripts/benchmark.py --quick                       # smoke test, under 2 minutes
    python scripts/benchmark.py --json docs/benchmark.json    # also write the results as JSON

It uses CUDA when present (``--device`` overrides), otherwise the CPU. What is measured:

1. **Trainer vs plain loop** — images/s of the bundle's Ignite trainer, built from ``configs/train.json`` with
   ``monai.bundle.ConfigParser`` (phantom data in a temp dir, temp output folders, validation switched off with a
   huge ``val_interval``; every other handler, file writers included, stays), against a plain PyTorch loop over
   a second instance of the same ``network_def`` that iterates THE SAME config ``DataLoader`` (same cached data
   set, same augmentations, same batch size) with the same loss (L1 + quantisation loss) and the config's
   autocast / channels-last settings. Only steady-state iterations count: the interval between consecutive
   iteration ends inside an epoch (the first iteration of every epoch and a whole warm-up round are dropped).
   The end-of-epoch handlers (checkpoint, codebook statistics) are timed separately. The same plain step on
   preloaded tensors is reported too, so the data-loading share is visible.
2. **Achieved FLOP/s** of a VQ-VAE training step (``torch.utils.flop_counter.FlopCounterMode`` on one
   forward + backward) against the matrix-multiply peak measured in the same run (large fp32 and bf16 matmuls).
3. **fp32 / bf16 autocast / channels_last / bf16 + channels_last** VQ-VAE training steps (preloaded batches).
4. **Data pipeline alone**: images/s out of the config's training ``DataLoader`` (``CacheDataset``, augmentation
   on the fly) against what the trainer consumes.
5. **PixelCNN sampling**, naive vs fast (cached), seconds per batch of code maps and of decoded slices, through
   ``scripts/benchmark_sampling.py`` (imported; the prior has the sizes of ``configs/inference.json``).
6. **Inference**: ms per slice for reconstruction with the inference network and inferer of
   ``configs/inference.json`` (batch 1 and 16) and for encoding to codes (``index_quantize``, eval mode).
7. **PixelCNN training step** (code maps/s), fp32 vs bf16 autocast.

The machine may be shared, so every timing is taken in ONE process with the variants interleaved: each round
runs every training variant in turn (the order rotates between rounds), and the reported step time is the
MEDIAN over rounds; ratios are computed from these medians (the per-round paired ratios are in the JSON). The
matmul peak is the BEST of its repeats (a peak). The load average before and after is recorded: compare runs
only when it was similar. Weights are random (cost does not depend on them), except that the trainer's own
handlers (k-means codebook init, dead-code restarts) run as in a real training.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from itertools import cycle, islice  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import benchmark_sampling  # noqa: E402  (scripts/benchmark_sampling.py: machine_info, timed, main)

T0 = time.perf_counter()
VARIANTS = {  # name: (bf16 autocast, channels_last)
    "fp32": (False, False),
    "bf16": (True, False),
    "channels_last": (False, True),
    "bf16_channels_last": (True, True),
}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------------------------------- machine ---
def machine(device: torch.device) -> dict:
    """``benchmark_sampling.machine_info`` plus the CPU's vector/bf16 flags, monai and ignite versions, load."""
    import ignite
    import monai

    info = benchmark_sampling.machine_info(device)
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    info.update(
        cpu_flags=[f for f in CPU_FLAGS if f in flags],
        monai=monai.__version__,
        ignite=ignite.__version__,
        cuda=torch.version.cuda,
        cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
        load_average_start=list(os.getloadavg()),
    )
    return info


# ---------------------------------------------------------------------------------------------------- config ---
def train_parser(data_dir: str, work_dir: str, batch_size: int | None, device: str | None):
    """``configs/train.json`` with temp data/output folders, one epoch per ``run()``, validation off."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    overrides = {
        "bundle_root": ROOT,
        "dataset_dir": data_dir,
        "output_dir": os.path.join(work_dir, "outputs"),
        "ckpt_dir": os.path.join(work_dir, "models"),
        "max_epochs": 1,  # the benchmark runs the trainer one epoch at a time
        "val_interval": 10**9,  # no validation inside the timed epochs
        "resume": False,
    }
    if batch_size:
        overrides["batch_size"] = batch_size
    if device:
        overrides["device"] = f"$torch.device('{device}')"
    parser.update(overrides)
    return parser


def inference_parser(device: str | None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    parser.update({"bundle_root": ROOT} | ({"device": f"$torch.device('{device}')"} if device else {}))
    return parser


# ------------------------------------------------------------------------------------------------ primitives ---
def vqvae_step(net, opt, x: torch.Tensor, amp: bool, channels_last: bool, dtype=torch.bfloat16) -> torch.Tensor:
    """One plain-PyTorch VQ-VAE training step: L1 reconstruction + quantisation loss."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=amp):
        reconstruction, quantization_loss = net(x)
    loss = F.l1_loss(reconstruction.float(), x) + quantization_loss
    loss.backward()
    opt.step()
    return loss


def prior_step(net, opt, codes: torch.Tensor, amp: bool) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(codes.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(codes)
    loss = F.cross_entropy(logits.float(), codes)
    loss.backward()
    opt.step()
    return loss


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, size: int, repeats: int) -> dict:
    """Best GFLOP/s of a ``size``-cubed matrix product in fp32 and bf16, interleaved.

    Each product is timed both as ``torch.mm`` (MKL / cuBLAS) and as the same GEMM written as a 1x1
    convolution (oneDNN / cuDNN, the library the networks' convolutions run on): on some CPUs (e.g. MKL on
    AMD) the two differ by 2x, and the faster one is the machine's attainable peak.
    """
    kernels = {}
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = torch.randn(size, size, device=device, dtype=dt), torch.randn(size, size, device=device, dtype=dt)
        x = torch.randn(1, size, size // 32, 32, device=device, dtype=dt).contiguous(memory_format=torch.channels_last)
        w = torch.randn(size, size, 1, 1, device=device, dtype=dt)
        kernels[f"{name}_mm"] = lambda a=a, b=b: torch.mm(a, b)
        kernels[f"{name}_conv1x1"] = lambda x=x, w=w: F.conv2d(x, w)
    best = {}
    for name, fn in kernels.items():  # warm-up
        fn()
        best[name] = float("inf")
    for _ in range(repeats):
        for name, fn in kernels.items():
            best[name] = min(best[name], benchmark_sampling.timed(fn, device)[0])
    out = {"size": size, "repeats": repeats}
    out.update({f"{name}_gflops": 2.0 * size**3 / seconds / 1e9 for name, seconds in best.items()})
    for dt in ("fp32", "bf16"):
        out[f"{dt}_gflops"] = max(out[f"{dt}_mm_gflops"], out[f"{dt}_conv1x1_gflops"])
    return out


class IterationClock:
    """Timestamps the end of every iteration; ``intervals`` are the steady-state ones (within an epoch)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def start_epoch(self) -> None:
        self.stamps = []

    def tick(self, *_) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:])]


def interleave(tasks: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list]:
    """Runs a warm-up round, then ``rounds`` rounds of every task, rotating the order each round.

    Each task returns a list of per-item seconds; returns ``{name: [list per round]}`` for the timed rounds.
    """
    names = list(tasks)
    samples: dict[str, list] = defaultdict(list)
    for r in range(-1, rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            values = tasks[name]()
            if r >= 0:
                samples[name].append(values)
        log(f"round {'warm-up' if r < 0 else r + 1}/{rounds} done")
    return samples


def flat(per_round: list[list[float]]) -> list[float]:
    return [v for values in per_round for v in values]


def step_stats(per_round: list[list[float]], items_per_step: int, flops_per_step: float | None = None,
               peak_gflops: float | None = None) -> dict:
    values = flat(per_round)
    step = median(values)
    out = {"step_s": step, "step_s_best": min(values), "step_s_mean": statistics.fmean(values), "n": len(values),
           "items_per_s": items_per_step / step}
    if flops_per_step:
        out["achieved_gflops"] = flops_per_step / step / 1e9
        if peak_gflops:
            out["fraction_of_peak"] = out["achieved_gflops"] / peak_gflops
    return out


def paired_ratios(num: list[list[float]], den: list[list[float]]) -> list[float]:
    """Per-round ratio of median times ``median(num_r) / median(den_r)`` (rounds are side by side in time)."""
    return [median(a) / median(b) for a, b in zip(num, den) if a and b]


# ---------------------------------------------------------------------------------------------------- main -----
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced run for a smoke test (< 2 minutes)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's, CUDA when present)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (0: 3, or 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.chdir(ROOT)  # the configs import `bundle` from the working directory
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)

    from bundle.phantom import write_hipmri_phantoms

    work = tempfile.mkdtemp(prefix="bundle-benchmark-")
    try:
        results = run(args, quick, rounds, work, write_hipmri_phantoms)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


def run(args, quick: bool, rounds: int, work: str, write_hipmri_phantoms) -> dict:
    # ---- data and the trainer from the bundle config ----
    train_cases = 1 if quick else 6  # x 16 slices: 16 or 96 training images
    data_dir = os.path.join(work, "data")
    counts = write_hipmri_phantoms(data_dir, train_cases=train_cases, val_cases=1, test_cases=1)
    log(f"phantoms written: {counts}")
    batch_size = 4 if quick else None  # None: the config's (16)
    config = train_parser(data_dir, work, batch_size, args.device)
    t = time.perf_counter()
    train_dataset = config.get_parsed_content("train::dataset")  # caches every training image
    cache_s = time.perf_counter() - t
    trainer = config.get_parsed_content("train::trainer")
    device = torch.device(config.get_parsed_content("device"))
    loader = config.get_parsed_content("train::dataloader")
    image_key = config.get_parsed_content("image")
    batch_size = config.get_parsed_content("batch_size")
    amp, amp_dtype = config.get_parsed_content("amp"), config.get_parsed_content("amp_dtype")
    channels_last = config.get_parsed_content("channels_last")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[amp_dtype]
    info = machine(device)
    log(f"trainer built from configs/train.json ({len(train_dataset)} cached training images, {cache_s:.1f} s); "
        f"device {device}, batch {batch_size}, amp {amp} ({amp_dtype}), channels_last {channels_last}")
    iters_per_epoch = len(loader)

    # a second, untouched instance of the same network_def (no CodebookMonitor hooks on it)
    base = config.get_parsed_content("network_def", lazy=False)
    base.load_state_dict(trainer.network.state_dict())
    base.to(device)
    lr = config.get_parsed_content("learning_rate")

    # ---- 2. peak and FLOPs ----
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 2048, 3 if quick else 5)
    log("matmul peak GFLOP/s: " + ", ".join(f"{k[:-7]} {v:.1f}" for k, v in peak.items() if k.endswith("_gflops")))
    batches = [b[image_key].to(device) for b in islice(cycle(loader), max(2, min(4, iters_per_epoch)))]
    flops = {}
    for name in ("fp32", "bf16_channels_last"):
        net = copy.deepcopy(base).to(memory_format=torch.channels_last if VARIANTS[name][1] else torch.contiguous_format)
        opt = torch.optim.Adam(net.parameters(), lr)
        flops[name] = count_flops(lambda: vqvae_step(net, opt, batches[0], *VARIANTS[name], dtype))
    flops_step = flops["fp32"]
    log(f"VQ-VAE training step: {flops_step / 1e9:.1f} GFLOP per batch of {batch_size}")

    # ---- models for the interleaved rounds ----
    variant_nets = {}
    for name, (_, cl) in VARIANTS.items():
        net = copy.deepcopy(base).to(memory_format=torch.channels_last if cl else torch.contiguous_format).train()
        variant_nets[name] = (net, torch.optim.Adam(net.parameters(), lr))
    plain_net = copy.deepcopy(base).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    plain_net.train()
    plain_opt = torch.optim.Adam(plain_net.parameters(), lr)
    batch_iter = cycle(batches)

    from bundle.networks.pixelcnn import GatedPixelCNN  # noqa: F401  (the config's prior_def target)
    from ignite.engine import Events

    prior_base = config.get_parsed_content("prior_def", lazy=False).to(device)
    num_embeddings = config.get_parsed_content("num_embeddings")
    latent = config.get_parsed_content("latent_shape")
    prior_batch = 4 if quick else config.get_parsed_content("prior_batch_size")
    prior_lr = config.get_parsed_content("prior_learning_rate")
    codes = torch.randint(0, num_embeddings, (prior_batch, *latent), device=device)
    prior_nets = {}
    for name in ("fp32", "bf16"):
        net = copy.deepcopy(prior_base).train()
        prior_nets[name] = (net, torch.optim.Adam(net.parameters(), prior_lr))
    prior_flops = count_flops(lambda: prior_step(*prior_nets["fp32"], codes, False))

    # ---- the tasks of one round ----
    trainer_clock, plain_clock, data_clock = IterationClock(device), IterationClock(device), IterationClock(device)
    epoch_end: list[float] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: trainer_clock.start_epoch())
    trainer.add_event_handler(Events.ITERATION_COMPLETED, trainer_clock.tick)  # attached last: runs last
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: epoch_end.append(time.perf_counter() - trainer_clock.stamps[-1]))

    def trainer_epoch() -> list[float]:
        trainer.state.max_epochs = trainer.state.epoch + 1
        trainer.run()
        return trainer_clock.intervals()

    def plain_epoch() -> list[float]:
        plain_clock.start_epoch()
        for batch in loader:
            loss = vqvae_step(plain_net, plain_opt, batch[image_key].to(device), amp, channels_last, dtype)
            loss.item()  # what a plain loop logs; the trainer's handlers do the same
            plain_clock.tick()
        return plain_clock.intervals()

    def data_epoch() -> list[float]:
        data_clock.start_epoch()
        for batch in loader:
            batch[image_key].to(device)
            data_clock.tick()
        return data_clock.intervals()

    def variant_steps(name: str, steps: int) -> Callable[[], list[float]]:
        net, opt = variant_nets[name]
        amp_v, cl_v = VARIANTS[name]
        return lambda: [benchmark_sampling.timed(lambda: vqvae_step(net, opt, next(batch_iter), amp_v, cl_v, dtype),
                                                 device)[0] for _ in range(steps)]

    def prior_steps(name: str) -> Callable[[], list[float]]:
        net, opt = prior_nets[name]
        return lambda: [benchmark_sampling.timed(lambda: prior_step(net, opt, codes, name == "bf16"), device)[0]]

    tasks = {"trainer": trainer_epoch, "plain_loop": plain_epoch, "data_pipeline": data_epoch}
    tasks.update({f"vqvae_{name}": variant_steps(name, 1 if quick else 2) for name in VARIANTS})
    tasks.update({f"prior_{name}": prior_steps(name) for name in prior_nets})
    log(f"interleaved rounds: {list(tasks)}; {iters_per_epoch} iterations per trainer epoch")
    samples = interleave(tasks, rounds)
    epoch_end_s = median(epoch_end[1:])  # the warm-up epoch dropped

    # ---- 1, 3, 4, 7: statistics ----
    vq = {}
    for name, (amp_v, _) in VARIANTS.items():
        vq[name] = step_stats(samples[f"vqvae_{name}"], batch_size, flops_step,
                              peak["bf16_gflops"] if amp_v else peak["fp32_gflops"])
        vq[name]["images_per_s"] = vq[name].pop("items_per_s")
        vq[name]["peak_used"] = "bf16" if amp_v else "fp32"
    speedup = {name: vq["fp32"]["step_s"] / vq[name]["step_s"] for name in VARIANTS if name != "fp32"}
    config_variant = "bf16_channels_last" if amp and channels_last else "bf16" if amp else (
        "channels_last" if channels_last else "fp32")

    trainer_s = median(flat(samples["trainer"]))
    plain_s = median(flat(samples["plain_loop"]))
    data_s = median(flat(samples["data_pipeline"]))
    preloaded_s = vq[config_variant]["step_s"]
    trainer_ips, plain_ips = batch_size / trainer_s, batch_size / plain_s
    tvp = {
        "trainer_images_per_s": trainer_ips,
        "plain_loop_images_per_s": plain_ips,
        "ratio": trainer_ips / plain_ips,
        "ratio_mean_based": statistics.fmean(flat(samples["plain_loop"])) / statistics.fmean(flat(samples["trainer"])),
        "paired_round_ratios": paired_ratios(samples["plain_loop"], samples["trainer"]),
        "target": 0.95,
        "plain_loop_preloaded_images_per_s": batch_size / preloaded_s,
        "plain_loop_preloaded_variant": config_variant,
        "trainer_step_s": trainer_s,
        "plain_loop_step_s": plain_s,
        "trainer_iterations_timed": len(flat(samples["trainer"])),
        "iterations_per_epoch": iters_per_epoch,
        "epoch_end_handlers_s": epoch_end_s,
        "settings": {"amp": amp, "amp_dtype": amp_dtype, "channels_last": channels_last, "batch_size": batch_size},
    }
    tvp["meets_target"] = tvp["ratio"] >= tvp["target"]
    data = {
        "images_per_s": batch_size / data_s,
        "batch_s": data_s,
        "trainer_images_per_s": trainer_ips,
        "headroom_vs_trainer": trainer_s / data_s,
        "share_of_trainer_step": data_s / trainer_s,
        "cache_build_s": cache_s,
        "cached_images": len(train_dataset),
        "num_workers": config.get_parsed_content("num_workers"),
        # the plain loop on the loader should cost about (preloaded step + loader batch)
        "plain_loop_minus_preloaded_s": plain_s - preloaded_s,
    }
    prior = {"flops_per_step": prior_flops, "batch_size": prior_batch, "latent": list(latent)}
    for name in prior_nets:
        stats = step_stats(samples[f"prior_{name}"], prior_batch, prior_flops,
                           peak["bf16_gflops"] if name == "bf16" else peak["fp32_gflops"])
        stats["maps_per_s"] = stats.pop("items_per_s")
        prior[name] = stats
    prior["bf16_speedup"] = prior["fp32"]["step_s"] / prior["bf16"]["step_s"]
    prior["paired_round_speedups"] = paired_ratios(samples["prior_fp32"], samples["prior_bf16"])
    del trainer, variant_nets, prior_nets, plain_net

    # ---- 6. inference ----
    inference = inference_benchmark(args.device, 2 if quick else 5, 2 if quick else 4)
    log("inference done")

    # ---- 5. sampling, through scripts/benchmark_sampling.py ----
    sampling = sampling_benchmark(config, quick, work, inference.pop("_decode"))
    log("sampling done")

    info["load_average_end"] = list(os.getloadavg())
    return {
        "schema": 1,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "quick": quick,
        "machine": info,
        "settings": {
            "device": str(device), "rounds": rounds, "batch_size": batch_size, "training_images": len(train_dataset),
            "image_size": config.get_parsed_content("image_size"), "channels": config.get_parsed_content("channels"),
            "num_res_channels": config.get_parsed_content("num_res_channels"),
            "num_embeddings": num_embeddings, "embedding_dim": config.get_parsed_content("embedding_dim"),
            "statistic": "median step time over interleaved rounds (warm-up round dropped); peak: best of repeats",
        },
        "peak_matmul": peak,
        "vqvae_flops": {"per_step_fp32": flops["fp32"], "per_step_bf16_channels_last": flops["bf16_channels_last"],
                        "per_image": flops_step / batch_size, "batch_size": batch_size},
        "vqvae_train_step": vq,
        "vqvae_speedup_vs_fp32": speedup,
        "vqvae_paired_round_speedups": {
            name: paired_ratios(samples["vqvae_fp32"], samples[f"vqvae_{name}"]) for name in speedup},
        "trainer_vs_plain": tvp,
        "data_pipeline": data,
        "prior_train_step": prior,
        "inference": inference,
        "sampling": sampling,
        "wall_s": time.perf_counter() - T0,
    }


def inference_benchmark(device_arg: str | None, rounds: int, calls: int) -> dict:
    """ms per slice: the inference network/inferer of configs/inference.json, and index_quantize (eval mode)."""
    from bundle.inferers import AutocastInferer

    config = inference_parser(device_arg)
    device = torch.device(config.get_parsed_content("device"))
    net = config.get_parsed_content("network").eval()
    inferer = config.get_parsed_content("inferer")
    fast_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    fast_inferer = AutocastInferer(amp=True, dtype="bfloat16", channels_last=True)
    image_size = config.get_parsed_content("image_size")
    x = {b: torch.rand(b, 1, *image_size, device=device) for b in (1, 16)}
    jobs = {
        "reconstruction": lambda b: inferer(x[b], net),
        "encode": lambda b: net.index_quantize(x[b]),
        "reconstruction_bf16_channels_last": lambda b: fast_inferer(x[b], fast_net),
        "encode_bf16_channels_last": lambda b: _encode_fast(fast_net, x[b]),
    }
    times: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for r in range(-1, rounds):
            for name, fn in jobs.items():
                for b in (1, 16):
                    for _ in range(calls if b == 1 else 1):
                        seconds, _ = benchmark_sampling.timed(lambda: fn(b), device)
                        if r >= 0:
                            times[f"{name}_batch{b}"].append(seconds / b)
        # agreement of the bf16 variant with the fp32 reference (random weights: indicative only)
        ref, fast = inferer(x[16], net), fast_inferer(x[16], fast_net)
        codes_ref, codes_fast = net.index_quantize(x[16]), _encode_fast(fast_net, x[16])
    out = {f"{k}_ms_per_slice": 1000 * median(v) for k, v in times.items()}
    out["config"] = {"amp": config.get_parsed_content("amp"), "channels_last": config.get_parsed_content("channels_last"),
                     "weights": "random"}
    out["bf16_channels_last_max_abs_diff"] = float((ref - fast).abs().max())
    out["bf16_channels_last_code_agreement"] = float((codes_ref == codes_fast).float().mean())
    out["_decode"] = (net, device)
    return out


def _encode_fast(net, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return net.index_quantize(x.contiguous(memory_format=torch.channels_last))


def sampling_benchmark(config, quick: bool, work: str, decode: tuple) -> dict:
    """Naive vs fast sampling by ``benchmark_sampling.main`` with the config's prior sizes, plus decoding."""
    latent = config.get_parsed_content("latent_shape")
    num_samples = 1 if quick else 4
    small = (4, 4) if quick else (8, 8)
    out_json = os.path.join(work, "sampling.json")
    argv = ["benchmark_sampling.py",
            "--channels", config.get_parsed_content("prior_channels"),
            "--layers", config.get_parsed_content("prior_layers"),
            "--kernel_size", config.get_parsed_content("prior_kernel_size"),
            "--num_embeddings", config.get_parsed_content("num_embeddings"),
            "--head_channels", config.get_parsed_content("prior_head_channels"),
            "--height", latent[0], "--width", latent[1], "--num_samples", num_samples, "--naive_rows", 1,
            "--small_height", small[0], "--small_width", small[1], "--repeats", 1 if quick else 2,
            "--json", out_json]
    saved_argv, text = sys.argv, io.StringIO()
    sys.argv = [str(a) for a in argv]
    try:
        with contextlib.redirect_stdout(text):
            benchmark_sampling.main()
    finally:
        sys.argv = saved_argv
    for line in text.getvalue().splitlines():
        log(f"  benchmark_sampling: {line}")
    with open(out_json) as f:
        raw = json.load(f)
    full = raw["results"]["full"]
    net, device = decode
    codes = torch.randint(0, config.get_parsed_content("num_embeddings"), (num_samples, *latent), device=device)
    with torch.no_grad():
        net.decode_samples(codes)  # warm-up
        decode_s = min(benchmark_sampling.timed(lambda: net.decode_samples(codes), device)[0] for _ in range(3))
    return {
        "num_samples": num_samples,
        "latent": list(latent),
        "naive_s_per_batch": full["naive_s_extrapolated"],
        "naive_is_extrapolated_from_positions": full["naive_measured_positions"],
        "fast_s_per_batch": full["fast_s"],
        "speedup": full["speedup_extrapolated"],
        "decode_s_per_batch": decode_s,
        "naive_slices_s_per_batch": full["naive_s_extrapolated"] + decode_s,
        "fast_slices_s_per_batch": full["fast_s"] + decode_s,
        "small": raw["results"]["small"],
        "fast_equals_naive": bool(raw["results"]["small"]["fast_equals_naive"]
                                  and full["fast_equals_naive_on_measured_prefix"]),
        "benchmark_sampling": raw,
    }


# ---------------------------------------------------------------------------------------------------- table ----
def print_table(r: dict) -> None:
    m = r["machine"]
    print()
    print(f"machine : {m['cpu']} | {m['cpu_cores']} cores, {m['torch_threads']} torch threads | "
          f"flags {' '.join(m['cpu_flags']) or '-'} | GPU {m['gpu'] or 'none'} | device {m['device']}")
    print(f"versions: python {m['python']} | torch {m['torch']} | monai {m['monai']} | ignite {m['ignite']}")
    la, lb = m["load_average_start"], m["load_average_end"]
    print(f"load    : {la[0]:.2f} at start, {lb[0]:.2f} at end (1-min load average; "
          f"{m['cpu_cores']} cores) | {'QUICK' if r['quick'] else 'full'} run, {r['settings']['rounds']} interleaved "
          f"rounds, medians | wall {r['wall_s']:.0f} s")
    rows: list[tuple[str, str, str]] = []

    def section(title: str) -> None:
        rows.append((f"-- {title}", "", ""))

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((f"   {name}", value, note))

    t, d, s = r["trainer_vs_plain"], r["data_pipeline"], r["settings"]
    section(f"1. trainer (configs/train.json) vs plain loop, {t['settings']['amp_dtype'] if t['settings']['amp'] else 'fp32'}"
            f"{' + channels_last' if t['settings']['channels_last'] else ''}, batch {s['batch_size']}")
    row("Ignite trainer", f"{t['trainer_images_per_s']:.2f} img/s", f"{t['trainer_iterations_timed']} steady-state iterations")
    row("plain loop, same DataLoader", f"{t['plain_loop_images_per_s']:.2f} img/s")
    row("ratio trainer / plain", f"{t['ratio']:.3f}", f"target >= {t['target']} ({'met' if t['meets_target'] else 'NOT met'}); "
        f"per round {', '.join(f'{v:.3f}' for v in t['paired_round_ratios'])}")
    row("plain loop, preloaded tensors", f"{t['plain_loop_preloaded_images_per_s']:.2f} img/s", "no data loading")
    row("end-of-epoch handlers", f"{t['epoch_end_handlers_s']:.3f} s/epoch", "checkpoint + codebook stats (not in the ratio)")
    section(f"2./3. VQ-VAE training step, batch {s['batch_size']}, {r['vqvae_flops']['per_image'] / 1e9:.2f} GFLOP/image "
            f"(FlopCounterMode); matmul peak fp32 {r['peak_matmul']['fp32_gflops']:.0f}, bf16 "
            f"{r['peak_matmul']['bf16_gflops']:.0f} GFLOP/s (best of mm and 1x1 conv, {r['peak_matmul']['size']}^3)")
    for name, v in r["vqvae_train_step"].items():
        sp = r["vqvae_speedup_vs_fp32"].get(name)
        row(name, f"{v['images_per_s']:.2f} img/s",
            f"{v['achieved_gflops']:.1f} GFLOP/s = {100 * v['fraction_of_peak']:.0f}% of {v['peak_used']} peak"
            + (f"; {sp:.2f}x fp32" if sp else ""))
    section("4. data pipeline alone (config DataLoader: CacheDataset + augmentation)")
    row("loader", f"{d['images_per_s']:.1f} img/s", f"{d['headroom_vs_trainer']:.0f}x what the trainer consumes "
        f"({d['share_of_trainer_step'] * 100:.1f}% of a step); cache build {d['cache_build_s']:.1f} s "
        f"for {d['cached_images']} images")
    sm = r["sampling"]
    section(f"5. PixelCNN sampling, batch of {sm['num_samples']}, latent {sm['latent'][0]}x{sm['latent'][1]}")
    row("naive codes", f"{sm['naive_s_per_batch']:.1f} s/batch",
        f"EXTRAPOLATED from {sm['naive_is_extrapolated_from_positions']} positions")
    row("fast codes", f"{sm['fast_s_per_batch']:.2f} s/batch", f"{sm['speedup']:.0f}x naive; exact: {sm['fast_equals_naive']}")
    row("decode to slices", f"{sm['decode_s_per_batch']:.3f} s/batch",
        f"slices: naive {sm['naive_slices_s_per_batch']:.1f} s, fast {sm['fast_slices_s_per_batch']:.2f} s per batch")
    sml = sm["small"]
    row(f"measured {sml['shape'][0]}x{sml['shape'][1]} latent", f"{sml['speedup_measured']:.1f}x",
        f"naive {sml['naive_s']:.2f} s vs fast {sml['fast_s']:.3f} s, both measured")
    inf = r["inference"]
    section("6. inference (configs/inference.json: fp32, contiguous; random weights)")
    for name in ("reconstruction", "encode", "reconstruction_bf16_channels_last", "encode_bf16_channels_last"):
        row(name, f"{inf[f'{name}_batch1_ms_per_slice']:.1f} / {inf[f'{name}_batch16_ms_per_slice']:.1f} ms/slice",
            "batch 1 / batch 16" + (" (not the config's setting)" if "bf16" in name else ""))
    p = r["prior_train_step"]
    section(f"7. PixelCNN training step, batch {p['batch_size']}, {p['flops_per_step'] / p['batch_size'] / 1e9:.1f} GFLOP/map")
    for name in ("fp32", "bf16"):
        v = p[name]
        row(name, f"{v['maps_per_s']:.2f} maps/s", f"{v['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * v['fraction_of_peak']:.0f}% of {name} peak" + (f"; {p['bf16_speedup']:.2f}x fp32" if name == "bf16" else ""))
    widths = [max(len(x[i]) for x in rows if x[1]) for i in range(2)]
    for a, b, c in rows:
        print(a if not b else f"{a.ljust(widths[0])}  {b.rjust(widths[1])}  {c}".rstrip())


if __name__ == "__main__":
    main()
