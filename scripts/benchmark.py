"""Performance benchmark of the bundle: training, data pipeline, inference and sampling, side by side in one run.

Run from the repository root::

    python scripts/benchmark.py                               # full run, under 10 minutes on a 2-core CPU
    python scripts/benchmark.py --quick                       # smoke test, under 2 minutes
    python scripts/benchmark.py --json docs/benchmark.json    # also write the results as JSON

It uses CUDA when present (``--device`` overrides), otherwise the CPU. What is measured:

1. **Trainer vs plain loop** — images/s of the bundle's Ignite trainer, built from ``configs/train.json`` with
   ``monai.bundle.ConfigParser`` (phantom data in a temp dir, temp output folders, validation switched off with a
   huge ``val_interval``; every other handler, file writers included, stays), against a plain PyTorch loop over
   a second instance of the same ``network_def`` (same initial weights) that draws its batches from THE SAME
   config ``DataLoader`` (same cached data set, same augmentations, same batch size), with the same loss
   (L1 + quantisation loss) and the config's autocast / channels-last settings. Only steady-state iterations
   count: the first epoch is a warm-up and the first iteration of every epoch is reported apart. The same plain
   step on preloaded tensors is reported too, so the data-loading share is visible.
2. **Achieved FLOP/s** of a VQ-VAE training step (``torch.utils.flop_counter.FlopCounterMode`` on one
   forward + backward) against the matrix-multiply peak measured in the same run (large fp32 and bf16 products,
   as ``torch.mm`` and as a 1x1 convolution; the faster of the two is the peak).
3. **fp32 / bf16 autocast / channels_last / bf16 + channels_last** VQ-VAE training steps (preloaded batches).
4. **Data pipeline alone**: images/s out of the config's training ``DataLoader`` (``CacheDataset``, augmentation
   on the fly) against what the trainer consumes.
5. **PixelCNN sampling**, naive vs fast (cached), seconds per batch of code maps and of decoded slices, through
   ``scripts/benchmark_sampling.py`` (imported; the prior has the sizes of ``configs/inference.json``).
6. **Inference**: ms per slice for reconstruction with the inference network and inferer of
   ``configs/inference.json`` (batch 1 and 16) and for encoding to codes (``index_quantize``, eval mode); the
   same in bf16 + channels-last for comparison.
7. **PixelCNN training step** (code maps/s), fp32 vs bf16 autocast.
8. **OpenMP wait policy** (CPU only, ``--no_omp_probe`` skips it): a training step and a batch-1 reconstruction
   in child processes with libgomp's default (spinning) wait policy, with ``OMP_WAIT_POLICY=PASSIVE`` and with
   1 thread. On a CPU shared with other jobs, spinning threads wait a whole time slice for a descheduled
   partner at every barrier, which can slow a step several-fold; this process itself therefore runs with
   ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set or ``--omp_default`` is given (it has to be decided
   before torch is imported). The setting used is printed and recorded.
9. **torch.compile** (``--no_compile`` skips it): the config's VQ-VAE step (its autocast / channels-last) and the
   bf16 prior step, compiled with inductor as ``compile: true`` does, against the same eager steps, interleaved
   like 3 and 7; the first call (compilation, from an empty inductor cache) is timed apart, with the number of
   steps after which compiling has paid for itself.

The machine may be shared, so 1, 3, 4, 7 and 9 are measured side by side in ONE trainer run: after every trainer
iteration, a handler runs one plain-loop iteration, one batch of the data pipeline and the next three of the
training variants in turn, each timed on its own, and the trainer's own iteration is timed from the end of that
work to its next iteration end. Load bursts thus hit every variant alike; each figure is the MEDIAN over the
timed epochs, and the trainer/plain ratio is also given as the median of per-iteration paired ratios. The
matmul peak is the BEST of its samples, taken between trainer iterations throughout the run (a peak). The load
average before and after is recorded: compare runs only when it was similar. Weights are random (cost does not
depend on them), except that the trainer's own handlers (k-means codebook init, dead-code restarts) run as in a
real training.

Single calls are read on ``torch.utils.benchmark``'s clock (it waits for the accelerator); repeated calls without
side effects (inference, decoding, the OpenMP probe) are timed with ``torch.utils.benchmark.Timer``.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# libgomp reads OMP_WAIT_POLICY once, when torch loads it, so it is decided here, before `import torch`.
# PASSIVE unless set or --omp_default: on a shared CPU, spinning OpenMP threads wait a whole time slice for a
# descheduled partner at every barrier, which buries the differences measured here (section 8 measures it).
OMP_WAIT_POLICY_SET_BY_BENCHMARK = (
    "OMP_WAIT_POLICY" not in os.environ and "--omp_default" not in sys.argv and "--omp_probe_child" not in sys.argv
)
if OMP_WAIT_POLICY_SET_BY_BENCHMARK:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from itertools import cycle, islice  # noqa: E402

import benchmark_sampling  # noqa: E402  (scripts/benchmark_sampling.py: machine_info, main)
import torch  # noqa: E402
from torch.nn.functional import conv2d, cross_entropy, l1_loss  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402
from torch.utils.benchmark.utils.timer import timer as synchronized_clock  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

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


def once(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds taken by one call of ``fn``, and its result.

    Read on ``torch.utils.benchmark``'s clock, which waits for the accelerator first. For calls that must run
    exactly once: steps that consume a batch or update weights, first (compiling) calls, and the samples
    interleaved with the trainer. ``Timer`` itself would add warm-up calls.
    """
    start = synchronized_clock()
    result = fn()
    return synchronized_clock() - start, result


def per_call_s(fn: Callable[[], object], number: int) -> float:
    """Mean seconds per call of ``fn`` over ``number`` calls, after ``torch.utils.benchmark.Timer``'s warm-up calls.

    For calls without side effects that matter (inference, decoding, a throw-away training step). Timer runs with
    this process's torch threads (its own default is 1) and waits for the accelerator.
    """
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(number).mean


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
        env={
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
            if k in os.environ
        },
        omp_wait_policy_set_by_benchmark=OMP_WAIT_POLICY_SET_BY_BENCHMARK,
    )
    return info


# ---------------------------------------------------------------------------------------------------- config ---
def train_parser(data_dir: str, work_dir: str, batch_size: int | None, device: str | None, max_epochs: int = 1):
    """``configs/train.json`` with temp data and output folders, validation off, no resume, eager."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    overrides = {
        "bundle_root": ROOT,
        "dataset_dir": data_dir,
        "output_dir": os.path.join(work_dir, "outputs"),
        "ckpt_dir": os.path.join(work_dir, "models"),
        "max_epochs": max_epochs,
        "val_interval": 10**9,  # no validation inside the timed epochs
        "resume": False,
        "compile": False,  # the trainer is compared with an eager plain loop; section 9 measures compiling
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
    loss = l1_loss(reconstruction.float(), x) + quantization_loss
    loss.backward()
    opt.step()
    return loss


def prior_step(net, opt, codes: torch.Tensor, amp: bool) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(codes.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(codes)
    loss = cross_entropy(logits.float(), codes)
    loss.backward()
    opt.step()
    return loss


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class MatmulPeak:
    """Best GFLOP/s of a ``size``-cubed matrix product in fp32 and bf16.

    Each product is timed both as ``torch.mm`` (MKL / cuBLAS) and as the same GEMM written as a 1x1
    convolution (oneDNN / cuDNN, the library the networks' convolutions run on): on some CPUs (e.g. MKL on
    AMD) the two differ by 2x, and the faster one is the machine's attainable peak. ``sample()`` is called
    again and again during the run (between trainer iterations too), so that the best of all samples is
    taken when the machine happened to be free: on a shared machine a peak measured once is often too low.
    """

    def __init__(self, device: torch.device, size: int) -> None:
        self.size, self.kernels, self.best = size, {}, {}
        for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            a, b = (torch.randn(size, size, device=device, dtype=dt) for _ in range(2))
            x = torch.randn(1, size, size // 32, 32, device=device, dtype=dt).contiguous(
                memory_format=torch.channels_last
            )
            w = torch.randn(size, size, 1, 1, device=device, dtype=dt)
            self.kernels[f"{name}_mm"] = lambda a=a, b=b: torch.mm(a, b)
            self.kernels[f"{name}_conv1x1"] = lambda x=x, w=w: conv2d(x, w)
        for name, fn in self.kernels.items():  # warm-up
            fn()
            self.best[name] = float("inf")
        self.samples = 0

    def sample(self) -> None:
        for name, fn in self.kernels.items():
            self.best[name] = min(self.best[name], once(fn)[0])
        self.samples += 1

    def result(self) -> dict:
        out = {"size": self.size, "samples": self.samples}
        out.update({f"{name}_gflops": 2.0 * self.size**3 / s / 1e9 for name, s in self.best.items()})
        for dt in ("fp32", "bf16"):
            out[f"{dt}_gflops"] = max(out[f"{dt}_mm_gflops"], out[f"{dt}_conv1x1_gflops"])
        return out


def forever(loader):
    """Batches of ``loader``, epoch after epoch (a fresh iterator, so a fresh shuffle, each time)."""
    while True:
        yield from loader


class Lockstep:
    """Times the trainer's own iterations and runs the other training variants between them.

    Attached LAST to ``Events.ITERATION_COMPLETED``, so it sees the end of every trainer iteration (all the
    config's per-iteration handlers included). Each call then runs, timed one by one: one plain-loop iteration
    (its next batch from its own iterator over the same config DataLoader, then the step), one batch of the data
    pipeline alone, the next ``per_iteration`` companions in a fixed rotation, and a matmul-peak sample. The
    trainer's iteration time is measured from the end of that work to the next call: it contains the trainer's
    batch fetch, its step and its handlers, and nothing of the companions. So every variant runs side by side
    with the trainer, seconds apart, and load bursts hit them alike. The first iteration of each epoch (new
    iterator, epoch-end handlers of the previous epoch) is kept apart as ``boundary``.
    """

    def __init__(
        self,
        plain: Callable[[], object],
        data: Callable[[], object],
        companions: dict[str, Callable[[], object]],
        per_iteration: int,
        peak: MatmulPeak,
    ) -> None:
        self.plain, self.data, self.per_iteration, self.peak = plain, data, per_iteration, peak
        self.companions = companions
        self.rotation = cycle(list(companions))
        self.resume: float | None = None
        # name -> [(epoch, iteration, seconds)]
        self.samples: dict[str, list[tuple[int, int, float]]] = defaultdict(list)

    def __call__(self, engine) -> None:
        now = synchronized_clock()
        epoch, iteration = engine.state.epoch, engine.state.iteration
        if self.resume is not None:
            first = (iteration - 1) % engine.state.epoch_length == 0
            self.samples["trainer_boundary" if first else "trainer"].append((epoch, iteration, now - self.resume))
        self.samples["plain_loop"].append((epoch, iteration, once(self.plain)[0]))
        self.samples["data_pipeline"].append((epoch, iteration, once(self.data)[0]))
        for _ in range(self.per_iteration):
            name = next(self.rotation)
            self.samples[name].append((epoch, iteration, once(self.companions[name])[0]))
        self.peak.sample()
        self.resume = synchronized_clock()

    def seconds(self, name: str, skip_epochs: int = 1) -> list[float]:
        """Timings of ``name`` after the warm-up epoch(s)."""
        return [s for e, _, s in self.samples[name] if e > skip_epochs]

    def paired_ratios(self, num: str, den: str, skip_epochs: int = 1) -> list[float]:
        """``num / den`` for the samples taken at the same trainer iteration."""
        den_at = {i: s for e, i, s in self.samples[den] if e > skip_epochs}
        return [s / den_at[i] for e, i, s in self.samples[num] if e > skip_epochs and i in den_at]


def step_stats(
    values: list[float], items_per_step: int, flops_per_step: float | None = None, peak_gflops: float | None = None
) -> dict:
    step = median(values)
    out = {
        "step_s": step,
        "step_s_best": min(values),
        "step_s_mean": statistics.fmean(values),
        "n": len(values),
        "items_per_s": items_per_step / step,
    }
    if flops_per_step:
        out["achieved_gflops"] = flops_per_step / step / 1e9
        if peak_gflops:
            out["fraction_of_peak"] = out["achieved_gflops"] / peak_gflops
    return out


# ---------------------------------------------------------------------------------------------------- main -----
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced run for a smoke test (< 2 minutes)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's, CUDA when present)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument(
        "--epochs", type=int, default=0, help="timed trainer epochs after the warm-up epoch (0: 3, or 1 with --quick)"
    )
    parser.add_argument("--no_omp_probe", action="store_true", help="skip section 8 (child processes)")
    parser.add_argument(
        "--omp_default",
        action="store_true",
        help="keep libgomp's default wait policy (spinning) instead of OMP_WAIT_POLICY=PASSIVE",
    )
    parser.add_argument("--no_compile", action="store_true", help="skip section 9 (torch.compile)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--omp_probe_child", type=int, default=0, help=argparse.SUPPRESS)  # internal: batch size
    args = parser.parse_args()
    os.chdir(ROOT)  # the configs import `bundle` from the working directory
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.omp_probe_child:
        print(json.dumps(omp_probe_child(args.omp_probe_child, args.device)))
        return
    work = tempfile.mkdtemp(prefix="bundle-benchmark-")
    try:
        results = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


def run(args, work: str) -> dict:
    from ignite.engine import Events

    from bundle.data.phantom import write_hipmri_phantoms

    quick = args.quick
    epochs = args.epochs or (1 if quick else 3)

    # ---- data and the trainer, from the bundle config ----
    data_dir = os.path.join(work, "data")
    counts = write_hipmri_phantoms(data_dir, train_cases=1 if quick else 6, val_cases=1, test_cases=1)
    log(f"phantoms written: {counts}")
    config = train_parser(data_dir, work, 4 if quick else None, args.device, max_epochs=1 + epochs)
    cache_s, train_dataset = once(lambda: config.get_parsed_content("train::dataset"))  # caches every image
    trainer = config.get_parsed_content("train::trainer")
    loader = config.get_parsed_content("train::dataloader")  # the trainer's own loader
    device = torch.device(config.get_parsed_content("device"))
    image_key = config.get_parsed_content("image")
    batch_size = config.get_parsed_content("batch_size")
    amp, amp_dtype = config.get_parsed_content("amp"), config.get_parsed_content("amp_dtype")
    channels_last = config.get_parsed_content("channels_last")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[amp_dtype]
    lr = config.get_parsed_content("learning_rate")
    info = machine(device)
    log(
        f"trainer built from configs/train.json ({len(train_dataset)} cached training images in {cache_s:.1f} s); "
        f"device {device}, batch {batch_size}, amp {amp} ({amp_dtype}), channels_last {channels_last}"
    )

    # a second, untouched instance of the same network_def (no CodebookMonitor hooks), same initial weights
    base = config.get_parsed_content("network_def", lazy=False)
    base.load_state_dict(trainer.network.state_dict())
    base.to(device)

    # ---- 2. peak and FLOP count ----
    peak_meter = MatmulPeak(device, 8192 if device.type == "cuda" else 2048)
    for _ in range(3):
        peak_meter.sample()
    batches = [b[image_key].to(device) for b in islice(forever(loader), 4)]  # preloaded, for the variants

    def new_vqvae(cl: bool):
        net = copy.deepcopy(base).to(memory_format=torch.channels_last if cl else torch.contiguous_format).train()
        return net, torch.optim.Adam(net.parameters(), lr)

    flops = {
        name: count_flops(
            lambda name=name: vqvae_step(*new_vqvae(VARIANTS[name][1]), batches[0], *VARIANTS[name], dtype)
        )
        for name in ("fp32", "bf16_channels_last")
    }
    flops_step = flops["fp32"]
    log(f"VQ-VAE training step: {flops_step / 1e9:.1f} GFLOP per batch of {batch_size} (FlopCounterMode)")

    prior_base = config.get_parsed_content("prior_def", lazy=False).to(device)
    latent = config.get_parsed_content("latent_shape")
    prior_batch = 4 if quick else config.get_parsed_content("prior_batch_size")
    prior_lr = config.get_parsed_content("prior_learning_rate")
    codes = torch.randint(0, config.get_parsed_content("num_embeddings"), (prior_batch, *latent), device=device)

    def new_prior():
        net = copy.deepcopy(prior_base).train()
        return net, torch.optim.Adam(net.parameters(), prior_lr)

    prior_flops = count_flops(lambda: prior_step(*new_prior(), codes, False))

    # ---- 1, 3, 4, 7, 9 side by side: the trainer runs, everything else runs between its iterations ----
    plain_net, plain_opt = new_vqvae(channels_last)
    plain_batches, data_batches, variant_batches = forever(loader), forever(loader), cycle(batches)

    def plain_iteration() -> None:
        x = next(plain_batches)[image_key].to(device)
        vqvae_step(plain_net, plain_opt, x, amp, channels_last, dtype).item()  # .item(): what a loop logs

    companions: dict[str, Callable[[], object]] = {}
    for name, (amp_v, cl_v) in VARIANTS.items():
        net, opt = new_vqvae(cl_v)
        companions[f"vqvae_{name}"] = lambda net=net, opt=opt, amp_v=amp_v, cl_v=cl_v: vqvae_step(
            net, opt, next(variant_batches), amp_v, cl_v, dtype
        )
    for name in ("fp32", "bf16"):
        net, opt = new_prior()
        companions[f"prior_{name}"] = lambda net=net, opt=opt, amp_v=name == "bf16": prior_step(net, opt, codes, amp_v)
    compile_info = compiled_companions(
        args,
        work,
        companions,
        device,
        new_vqvae,
        new_prior,
        batches,
        variant_batches,
        codes,
        (amp, channels_last, dtype),
    )
    lockstep = Lockstep(
        plain_iteration, lambda: next(data_batches)[image_key].to(device), companions, per_iteration=3, peak=peak_meter
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lockstep)  # attached last: runs after the config's
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: log(
            f"trainer epoch {e.state.epoch}/{e.state.max_epochs}" f"{' (warm-up)' if e.state.epoch == 1 else ''} done"
        ),
    )
    log(
        f"trainer: 1 warm-up + {epochs} timed epochs of {len(loader)} iterations; between its iterations: plain "
        f"loop, data pipeline and 3 of {list(companions)} in turn"
    )
    trainer_run_s, _ = once(trainer.run)

    # ---- statistics ----
    peak = peak_meter.result()
    log("matmul peak GFLOP/s: " + ", ".join(f"{k[:-7]} {v:.0f}" for k, v in peak.items() if k.endswith("_gflops")))
    vq = {}
    for name, (amp_v, _) in VARIANTS.items():
        vq[name] = step_stats(
            lockstep.seconds(f"vqvae_{name}"),
            batch_size,
            flops_step,
            peak["bf16_gflops"] if amp_v else peak["fp32_gflops"],
        )
        vq[name]["images_per_s"] = vq[name].pop("items_per_s")
        vq[name]["peak_used"] = "bf16" if amp_v else "fp32"
    speedup = {name: vq["fp32"]["step_s"] / vq[name]["step_s"] for name in VARIANTS if name != "fp32"}
    config_variant = {
        (False, False): "fp32",
        (True, False): "bf16",
        (False, True): "channels_last",
        (True, True): "bf16_channels_last",
    }[(bool(amp), bool(channels_last))]

    trainer_s, plain_s = median(lockstep.seconds("trainer")), median(lockstep.seconds("plain_loop"))
    data_s, preloaded_s = median(lockstep.seconds("data_pipeline")), vq[config_variant]["step_s"]
    paired = lockstep.paired_ratios("plain_loop", "trainer")
    boundary = lockstep.seconds("trainer_boundary")
    tvp = {
        "trainer_images_per_s": batch_size / trainer_s,
        "plain_loop_images_per_s": batch_size / plain_s,
        "ratio": plain_s / trainer_s,
        "ratio_paired_median": median(paired),
        "ratio_mean_based": statistics.fmean(lockstep.seconds("plain_loop"))
        / statistics.fmean(lockstep.seconds("trainer")),
        "ratio_best_based": min(lockstep.seconds("plain_loop")) / min(lockstep.seconds("trainer")),
        "paired_ratios": paired,
        "target": 0.95,
        "plain_loop_preloaded_images_per_s": batch_size / preloaded_s,
        "plain_loop_preloaded_variant": config_variant,
        "trainer_step_s": trainer_s,
        "plain_loop_step_s": plain_s,
        "trainer_iterations_timed": len(lockstep.seconds("trainer")),
        "iterations_per_epoch": len(loader),
        "epoch_boundary_extra_s": median(boundary) - trainer_s if boundary else None,
        "trainer_run_s_with_companions": trainer_run_s,
        "settings": {
            "amp": amp,
            "amp_dtype": amp_dtype,
            "channels_last": channels_last,
            "batch_size": batch_size,
            "val_interval": "off (10**9)",
        },
    }
    tvp["meets_target"] = tvp["ratio"] >= tvp["target"]
    data = {
        "images_per_s": batch_size / data_s,
        "batch_s": data_s,
        "trainer_images_per_s": batch_size / trainer_s,
        "headroom_vs_trainer": trainer_s / data_s,
        "share_of_trainer_step": data_s / trainer_s,
        "cache_build_s": cache_s,
        "cached_images": len(train_dataset),
        "num_workers": config.get_parsed_content("num_workers"),
        "plain_loop_minus_preloaded_step_s": plain_s - preloaded_s,
    }
    prior = {"flops_per_step": prior_flops, "batch_size": prior_batch, "latent": list(latent)}
    for name in ("fp32", "bf16"):
        stats = step_stats(lockstep.seconds(f"prior_{name}"), prior_batch, prior_flops, peak[f"{name}_gflops"])
        stats["maps_per_s"] = stats.pop("items_per_s")
        prior[name] = stats
    prior["bf16_speedup"] = prior["fp32"]["step_s"] / prior["bf16"]["step_s"]
    if "vqvae_compiled" in companions:
        compile_info["vqvae"] = compile_effect(
            lockstep, f"vqvae_{config_variant}", "vqvae_compiled", batch_size, compile_info.pop("vqvae_first_call_s")
        )
        compile_info["prior"] = compile_effect(
            lockstep, "prior_bf16", "prior_bf16_compiled", prior_batch, compile_info.pop("prior_first_call_s")
        )
    del trainer, companions, plain_iteration, lockstep

    # ---- 6. inference ----
    inference, decoder = inference_benchmark(args.device, 1 if quick else 4, 1 if quick else 3)
    log("inference done")

    # ---- 5. sampling, through scripts/benchmark_sampling.py ----
    sampling = sampling_benchmark(config, quick, work, decoder, device)
    log("sampling done")

    # ---- 8. OpenMP wait policy, in child processes ----
    omp = None
    if not args.no_omp_probe and device.type == "cpu":
        omp = omp_probe(4 if quick else batch_size, 1 if quick else 2, args)
        log("OpenMP probe done")

    info["load_average_end"] = list(os.getloadavg())
    return {
        "schema": 1,
        "command": " ".join(["python", *sys.argv]),
        "quick": quick,
        "machine": info,
        "settings": {
            "device": str(device),
            "timed_epochs": epochs,
            "batch_size": batch_size,
            "training_images": len(train_dataset),
            "image_size": config.get_parsed_content("image_size"),
            "channels": config.get_parsed_content("channels"),
            "num_res_channels": config.get_parsed_content("num_res_channels"),
            "num_embeddings": config.get_parsed_content("num_embeddings"),
            "embedding_dim": config.get_parsed_content("embedding_dim"),
            "statistic": "median over the timed epochs, variants interleaved with the trainer's iterations; "
            "matmul peak: best of repeats; inference, decoding and the OpenMP probe: mean per call "
            "after torch.utils.benchmark.Timer's warm-up (inference: median over rounds)",
        },
        "peak_matmul": peak,
        "vqvae_flops": {
            "per_step_fp32": flops["fp32"],
            "per_step_bf16_channels_last": flops["bf16_channels_last"],
            "per_image": flops_step / batch_size,
            "batch_size": batch_size,
        },
        "vqvae_train_step": vq,
        "vqvae_speedup_vs_fp32": speedup,
        "trainer_vs_plain": tvp,
        "data_pipeline": data,
        "prior_train_step": prior,
        "compile": compile_info,
        "inference": inference,
        "sampling": sampling,
        "omp_wait_policy": omp,
        "wall_s": time.perf_counter() - T0,
    }


def compiled_companions(
    args,
    work: str,
    companions: dict,
    device: torch.device,
    new_vqvae,
    new_prior,
    batches,
    variant_batches,
    codes: torch.Tensor,
    settings: tuple,
) -> dict:
    """Section 9: adds ``torch.compile``d copies of the config's VQ-VAE step and of the bf16 prior step.

    They join the companions interleaved with the trainer, beside their eager twins (``vqvae_<config variant>``
    and ``prior_bf16``). Each is compiled here, and its first call (tracing + inductor code generation, or a
    hit in inductor's on-disk cache) is timed apart.
    """
    from bundle.engine.compiling import compile_unavailable_reason

    amp, channels_last, dtype = settings
    if args.no_compile:
        return {"skipped": "--no_compile"}
    reason = compile_unavailable_reason(device)
    if reason:
        log(f"torch.compile skipped: {reason}")
        return {"skipped": reason}
    # An empty inductor cache, so the first call costs what a user's first run costs (later runs reuse theirs).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-", dir=work)
    info = {"backend": "inductor", "mode": "default", "inductor_cache": "cold (empty, in the work dir)"}
    net, opt = new_vqvae(channels_last)
    vqvae = torch.compile(net)
    info["vqvae_first_call_s"], _ = once(lambda: vqvae_step(vqvae, opt, batches[0], amp, channels_last, dtype))
    prior_net, prior_opt = new_prior()
    prior = torch.compile(prior_net)
    info["prior_first_call_s"], _ = once(lambda: prior_step(prior, prior_opt, codes, True))
    log(
        f"torch.compile: first VQ-VAE step {info['vqvae_first_call_s']:.1f} s, first prior step "
        f"{info['prior_first_call_s']:.1f} s (compiling)"
    )
    companions["vqvae_compiled"] = lambda: vqvae_step(vqvae, opt, next(variant_batches), amp, channels_last, dtype)
    companions["prior_bf16_compiled"] = lambda: prior_step(prior, prior_opt, codes, True)
    return info


def compile_effect(lockstep: "Lockstep", eager: str, compiled: str, batch: int, first_call_s: float) -> dict:
    """Steady-state speed-up of a compiled step over its eager twin, and when compiling pays for itself."""
    eager_s, compiled_s = median(lockstep.seconds(eager)), median(lockstep.seconds(compiled))
    saved = eager_s - compiled_s
    return {
        "eager": eager,
        "eager_step_s": eager_s,
        "compiled_step_s": compiled_s,
        "speedup": eager_s / compiled_s,
        "items_per_s_eager": batch / eager_s,
        "items_per_s_compiled": batch / compiled_s,
        "n": len(lockstep.seconds(compiled)),
        "first_call_s": first_call_s,
        "compile_overhead_s": first_call_s - compiled_s,
        "break_even_steps": (first_call_s - compiled_s) / saved if saved > 0 else None,
    }


def inference_benchmark(device_arg: str | None, rounds: int, calls: int) -> tuple[dict, torch.nn.Module]:
    """ms per slice: the inference network/inferer of configs/inference.json, and index_quantize (eval mode)."""
    from bundle.engine.inferers import AutocastInferer

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
        for _ in range(rounds):  # jobs interleaved, round after round, so that load bursts hit them alike
            for name, fn in jobs.items():
                for b in (1, 16):
                    seconds = per_call_s(functools.partial(fn, b), calls if b == 1 else 1)
                    times[f"{name}_batch{b}"].append(seconds / b)
        # agreement of the bf16 variant with the fp32 reference (random weights: indicative only)
        ref, fast = inferer(x[16], net), fast_inferer(x[16], fast_net)
        codes_ref, codes_fast = net.index_quantize(x[16]), _encode_fast(fast_net, x[16])
    out = {f"{k}_ms_per_slice": 1000 * median(v) for k, v in times.items()}
    out["config"] = {
        "amp": config.get_parsed_content("amp"),
        "channels_last": config.get_parsed_content("channels_last"),
        "weights": "random",
    }
    out["bf16_channels_last_max_abs_diff"] = float((ref - fast).abs().max())
    out["bf16_channels_last_code_agreement"] = float((codes_ref == codes_fast).float().mean())
    return out, net


def _encode_fast(net, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return net.index_quantize(x.contiguous(memory_format=torch.channels_last))


def sampling_benchmark(config, quick: bool, work: str, net: torch.nn.Module, device: torch.device) -> dict:
    """Naive vs fast sampling by ``benchmark_sampling.main`` with the config's prior sizes, plus decoding."""
    latent = config.get_parsed_content("latent_shape")
    num_samples = 1 if quick else 4
    small = (4, 4) if quick else (8, 8)
    out_json = os.path.join(work, "sampling.json")
    argv = [
        "benchmark_sampling.py",
        "--channels",
        config.get_parsed_content("prior_channels"),
        "--layers",
        config.get_parsed_content("prior_layers"),
        "--kernel_size",
        config.get_parsed_content("prior_kernel_size"),
        "--num_embeddings",
        config.get_parsed_content("num_embeddings"),
        "--head_channels",
        config.get_parsed_content("prior_head_channels"),
        "--height",
        latent[0],
        "--width",
        latent[1],
        "--num_samples",
        num_samples,
        "--naive_rows",
        1,
        "--small_height",
        small[0],
        "--small_width",
        small[1],
        "--repeats",
        1 if quick else 2,
        "--json",
        out_json,
    ]
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
    codes = torch.randint(0, config.get_parsed_content("num_embeddings"), (num_samples, *latent), device=device)
    with torch.no_grad():
        decode_s = per_call_s(lambda: net.decode_samples(codes), 3)
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
        "fast_equals_naive": bool(
            raw["results"]["small"]["fast_equals_naive"] and full["fast_equals_naive_on_measured_prefix"]
        ),
        "benchmark_sampling": raw,
    }


def omp_probe_child(batch_size: int, device_arg: str | None) -> dict:
    """In a child process: a VQ-VAE training step as the config trains (batch ``batch_size``) and a batch-1
    reconstruction as ``configs/inference.json`` runs it, under this process's ``OMP_WAIT_POLICY``."""
    with tempfile.TemporaryDirectory() as work:
        config = train_parser(os.path.join(work, "none"), work, batch_size, device_arg)
        device = torch.device(config.get_parsed_content("device"))
        amp, cl = config.get_parsed_content("amp"), config.get_parsed_content("channels_last")
        net = config.get_parsed_content("network")
        opt = torch.optim.Adam(net.parameters(), config.get_parsed_content("learning_rate"))
        x = torch.rand(batch_size, 1, *config.get_parsed_content("image_size"), device=device)
        step_s = per_call_s(lambda: vqvae_step(net, opt, x, amp, cl), 2)
    inference = inference_parser(device_arg)
    eval_net, inferer = inference.get_parsed_content("network").eval(), inference.get_parsed_content("inferer")
    x1 = torch.rand(1, 1, *inference.get_parsed_content("image_size"), device=device)
    with torch.no_grad():
        call_s = per_call_s(lambda: inferer(x1, eval_net), 5)
    return {
        "train_step_s": step_s,
        "images_per_s": batch_size / step_s,
        "reconstruction_batch1_ms": 1000 * call_s,
        "load_average": os.getloadavg()[0],
    }


def omp_probe(batch_size: int, repeats: int, args) -> dict:
    """Section 8: the same workload in child processes with the torch default threads and ``OMP_WAIT_POLICY``
    unset (libgomp's default: spin) or ``PASSIVE``, and with 1 thread, whatever this process's own setting.

    libgomp's threads spin at every barrier; when other processes hold the cores, a spinning thread waits for
    a descheduled partner for a whole time slice, many times per step. ``PASSIVE`` makes them sleep instead.
    The policy is read when libgomp loads, hence child processes (alternated, ``repeats`` each).
    """
    threads = args.threads or torch.get_num_threads()
    policies = {
        f"{threads} threads, OMP_WAIT_POLICY unset": (None, threads),
        f"{threads} threads, OMP_WAIT_POLICY=PASSIVE": ("PASSIVE", threads),
        "1 thread": (None, 1),
    }
    runs: dict[str, list[dict]] = defaultdict(list)
    for rep in range(repeats):
        for name in (list(policies) if rep % 2 == 0 else list(policies)[::-1]):
            policy, n_threads = policies[name]
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--omp_probe_child",
                str(batch_size),
                "--threads",
                str(n_threads),
            ]
            command += ["--device", args.device] if args.device else []
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"OpenMP probe child failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out: dict = {"batch_size": batch_size, "repeats": repeats, "policies": {}}
    for name, results in runs.items():
        out["policies"][name] = {
            "images_per_s": median([r["images_per_s"] for r in results]),
            "reconstruction_batch1_ms": median([r["reconstruction_batch1_ms"] for r in results]),
            "runs": results,
        }
    first, passive, single = (out["policies"][name] for name in policies)
    out["passive_train_speedup"] = passive["images_per_s"] / first["images_per_s"]
    out["passive_batch1_speedup"] = first["reconstruction_batch1_ms"] / passive["reconstruction_batch1_ms"]
    out["one_thread_train_speedup"] = single["images_per_s"] / first["images_per_s"]
    return out


# ---------------------------------------------------------------------------------------------------- table ----
def print_table(r: dict) -> None:
    m = r["machine"]
    print()
    print(
        f"machine : {m['cpu']} | {m['cpu_cores']} cores, {m['torch_threads']} torch threads | "
        f"flags {' '.join(m['cpu_flags']) or '-'} | GPU {m['gpu'] or 'none'} | device {m['device']}"
    )
    print(
        f"versions: python {m['python']} | torch {m['torch']} | monai {m['monai']} | ignite {m['ignite']} | env "
        + (" ".join(f"{k}={v}" for k, v in m["env"].items()) or "-")
        + (
            " (PASSIVE set by the benchmark; --omp_default keeps libgomp's default)"
            if m["omp_wait_policy_set_by_benchmark"]
            else ""
        )
    )
    la, lb = m["load_average_start"], m["load_average_end"]
    print(
        f"load    : {la[0]:.2f} at start, {lb[0]:.2f} at end (1-min load average; "
        f"{m['cpu_cores']} cores) | {'QUICK' if r['quick'] else 'full'} run, {r['settings']['timed_epochs']} timed "
        f"epoch(s), variants interleaved, medians | wall {r['wall_s']:.0f} s"
    )
    rows: list[tuple[str, str, str]] = []

    def section(title: str) -> None:
        rows.append((f"-- {title}", "", ""))

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((f"   {name}", value, note))

    t, d, s = r["trainer_vs_plain"], r["data_pipeline"], r["settings"]
    precision = t["settings"]["amp_dtype"] if t["settings"]["amp"] else "fp32"
    section(
        f"1. trainer (configs/train.json) vs plain loop, {precision}"
        f"{' + channels_last' if t['settings']['channels_last'] else ''}, batch {s['batch_size']}"
    )
    row(
        "Ignite trainer",
        f"{t['trainer_images_per_s']:.2f} img/s",
        f"{t['trainer_iterations_timed']} steady-state iterations",
    )
    row("plain loop, same DataLoader", f"{t['plain_loop_images_per_s']:.2f} img/s")
    row(
        "ratio trainer / plain",
        f"{t['ratio']:.3f}",
        f"target >= {t['target']} ({'met' if t['meets_target'] else 'NOT met'}); "
        f"paired per iteration {t['ratio_paired_median']:.3f}, best-based {t['ratio_best_based']:.3f}",
    )
    row("plain loop, preloaded tensors", f"{t['plain_loop_preloaded_images_per_s']:.2f} img/s", "no data loading")
    if t["epoch_boundary_extra_s"] is not None:
        row(
            "epoch boundary",
            f"{t['epoch_boundary_extra_s']:+.3f} s/epoch",
            "first iteration of an epoch minus a steady one: epoch-end handlers, new iterator (not in the ratio)",
        )
    section(
        f"2./3. VQ-VAE training step, batch {s['batch_size']}, {r['vqvae_flops']['per_image'] / 1e9:.2f} GFLOP/image "
        f"(FlopCounterMode); matmul peak fp32 {r['peak_matmul']['fp32_gflops']:.0f}, bf16 "
        f"{r['peak_matmul']['bf16_gflops']:.0f} GFLOP/s (best of mm and 1x1 conv, {r['peak_matmul']['size']}^3, "
        f"{r['peak_matmul']['samples']} samples)"
    )
    batch = s["batch_size"]
    for name, v in r["vqvae_train_step"].items():
        sp = r["vqvae_speedup_vs_fp32"].get(name)
        row(
            name,
            f"{v['images_per_s']:.2f} img/s",
            f"{v['achieved_gflops']:.1f} GFLOP/s = {100 * v['fraction_of_peak']:.0f}% of {v['peak_used']} peak"
            + (f"; {sp:.2f}x fp32" if sp else "")
            + f" | best step {batch / v['step_s_best']:.2f} img/s",
        )
    section("4. data pipeline alone (config DataLoader: CacheDataset + augmentation)")
    row(
        "loader",
        f"{d['images_per_s']:.1f} img/s",
        f"{d['headroom_vs_trainer']:.0f}x what the trainer consumes "
        f"({d['share_of_trainer_step'] * 100:.1f}% of a step); cache build {d['cache_build_s']:.1f} s "
        f"for {d['cached_images']} images",
    )
    sm = r["sampling"]
    section(f"5. PixelCNN sampling, batch of {sm['num_samples']}, latent {sm['latent'][0]}x{sm['latent'][1]}")
    row(
        "naive codes",
        f"{sm['naive_s_per_batch']:.1f} s/batch",
        f"EXTRAPOLATED from {sm['naive_is_extrapolated_from_positions']} positions",
    )
    row(
        "fast codes",
        f"{sm['fast_s_per_batch']:.2f} s/batch",
        f"{sm['speedup']:.0f}x naive; exact: {sm['fast_equals_naive']}",
    )
    row(
        "decode to slices",
        f"{sm['decode_s_per_batch']:.3f} s/batch",
        f"slices: naive {sm['naive_slices_s_per_batch']:.1f} s, fast {sm['fast_slices_s_per_batch']:.2f} s per batch",
    )
    sml = sm["small"]
    row(
        f"measured {sml['shape'][0]}x{sml['shape'][1]} latent",
        f"{sml['speedup_measured']:.1f}x",
        f"naive {sml['naive_s']:.2f} s vs fast {sml['fast_s']:.3f} s, both measured",
    )
    inf = r["inference"]
    section("6. inference (configs/inference.json: fp32, contiguous; random weights)")
    for name in ("reconstruction", "encode", "reconstruction_bf16_channels_last", "encode_bf16_channels_last"):
        row(
            name,
            f"{inf[f'{name}_batch1_ms_per_slice']:.1f} / {inf[f'{name}_batch16_ms_per_slice']:.1f} ms/slice",
            "batch 1 / batch 16" + (" (not the config's setting)" if "bf16" in name else ""),
        )
    p = r["prior_train_step"]
    gflop_per_map = p["flops_per_step"] / p["batch_size"] / 1e9
    section(f"7. PixelCNN training step, batch {p['batch_size']}, {gflop_per_map:.1f} GFLOP/map")
    for name in ("fp32", "bf16"):
        v = p[name]
        row(
            name,
            f"{v['maps_per_s']:.2f} maps/s",
            f"{v['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * v['fraction_of_peak']:.0f}% of {name} peak"
            + (f"; {p['bf16_speedup']:.2f}x fp32" if name == "bf16" else "")
            + f" | best step {p['batch_size'] / v['step_s_best']:.2f} maps/s",
        )
    o = r.get("omp_wait_policy")
    if o:
        section(f"8. OpenMP wait policy (child processes, {o['repeats']} each, alternated; batch {o['batch_size']})")
        for name, v in o["policies"].items():
            row(
                name,
                f"{v['images_per_s']:.2f} img/s",
                f"training step; batch-1 reconstruction " f"{v['reconstruction_batch1_ms']:.0f} ms",
            )
        row(
            "PASSIVE vs unset",
            f"{o['passive_train_speedup']:.2f}x",
            f"training; {o['passive_batch1_speedup']:.1f}x "
            f"batch-1 inference (1 thread vs unset: {o['one_thread_train_speedup']:.2f}x training)",
        )
    c = r.get("compile") or {}
    if "vqvae" in c:
        section("9. torch.compile (inductor, default mode) vs eager, same step, interleaved; the config's settings")
        for name, unit in (("vqvae", "img/s"), ("prior", "maps/s")):
            v = c[name]
            row(
                f"{name} compiled",
                f"{v['items_per_s_compiled']:.2f} {unit}",
                f"{v['speedup']:.2f}x eager ({v['items_per_s_eager']:.2f}); first call {v['first_call_s']:.1f} s, pays "
                "off after " + (f"{v['break_even_steps']:.0f} steps" if v["break_even_steps"] else "never"),
            )
    elif c:
        section(f"9. torch.compile skipped: {c.get('skipped')}")
    widths = [max(len(x[i]) for x in rows if x[1]) for i in range(2)]
    for a, b, c in rows:
        print(a if not b else f"{a.ljust(widths[0])}  {b.rjust(widths[1])}  {c}".rstrip())


if __name__ == "__main__":
    main()
