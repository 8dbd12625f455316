"""Performance benchmark of the bundle's two-level model: training, data pipeline, inference, sampling, side by side.

Run from the repository root::

    python scripts/benchmark.py                               # full run (the demo's data set and sizes)
    python scripts/benchmark.py --quick                       # fewer iterations and images, the same sizes
    python scripts/benchmark.py --quick --tiny --no_compile   # smoke test with tiny networks (the unit test's)
    python scripts/benchmark.py --json docs/benchmark.json    # also write the results as JSON

It uses CUDA when present (``--device`` overrides), otherwise the CPU. The networks are the VQ-VAE-2
(``network_def``) and the two-level prior (``prior_def``) of ``configs/inference.json``; the trainers are built
from the layered stage configs with ``monai.bundle.ConfigParser``. What is measured:

1. **Trainer vs plain loop** (stage 1): images/s of the Ignite trainer of ``configs/inference.json`` +
   ``configs/train_vqvae.json`` (phantom data in a temp dir, temp output folders, validation switched off with a
   huge ``val_interval``, ``epoch_length`` capped; every other handler, file writers included, stays) against a
   plain PyTorch loop over a second instance of the same ``network_def`` (same initial weights) that draws its
   batches from THE SAME config ``DataLoader``, with the same loss (L1 + quantisation loss of both levels) and the
   config's autocast / channels-last settings. The first epoch is a warm-up and the first iteration of every
   epoch is reported apart. The same plain step on preloaded tensors is reported too.
2. **Achieved FLOP/s** of a VQ-VAE-2 training step (``torch.utils.flop_counter.FlopCounterMode`` on one forward +
   backward) against the matrix-multiply peak measured in the same run (large fp32 and bf16 products, as
   ``torch.mm`` and as a 1x1 convolution; the faster of the two is the peak).
3. **fp32 / bf16 autocast / channels_last / bf16 + channels_last** VQ-VAE-2 training steps (preloaded batches).
4. **Data pipeline alone**: images/s out of the config's training ``DataLoader`` (``CacheDataset``, augmentation
   on the fly) against what the trainer consumes.
5. **Sampling** (``scripts/benchmark_sampling.py``, imported): for each level (the top map; the bottom map
   conditioned on the top codes), fast (cached) versus naive sampling of the full map for a batch of 16 maps, with
   ``torch.equal`` of their codes on every position naive sampled (naive is EXTRAPOLATED from a few positions when a
   full run would be too long, and says so); decoding; the time to sample 16 slices with
   ``bundle.stage2_prior.generation.generate`` (both levels and decoding); and a small map pair sampled to the end
   by both samplers.
6. **Inference**: ms per slice for reconstruction with the inference network and inferer of
   ``configs/inference.json`` (batch 1 and 16) and for encoding to codes (``index_quantize``, both levels, eval
   mode); the same in bf16 + channels-last, with the share of codes it changes.
7. **Prior training step** (code-map pairs/s): ``TwoLevelPrior`` with ``TwoLevelCrossEntropy`` on batches made by
   ``prepare_code_batch`` (the stage-2 trainer's), fp32 vs bf16 autocast.
8. **OpenMP wait policy** (CPU only, ``--no_omp_probe`` skips it): a training step and a batch-1 reconstruction in
   child processes with libgomp's default (spinning) wait policy, with ``OMP_WAIT_POLICY=PASSIVE`` and with 1
   thread. This process itself runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set or
   ``--omp_default`` is given (it has to be decided before torch is imported).
9. **torch.compile** (``--no_compile`` skips it): the config's VQ-VAE-2 step and the bf16 prior step, compiled with
   inductor as ``compile: true`` does, against the same eager steps, interleaved like 3 and 7; the first call
   (compilation, from an empty inductor cache) is timed apart.
10. **Training time per epoch of each stage** at the demo's defaults (the phantom set of
    ``scripts/make_phantoms.py``: 320 training and 48 validation slices; the configs' batch sizes), through the
    real trainers, eager (``compile: false``): a fixed number of iterations is timed and SCALED to a whole epoch
    (iterations per epoch x median iteration time), plus the measured epoch-end work: for stage 1 the epoch-end
    handlers (from 1) and one run of the config's validator; for stage 2 a short run of the config's prior
    trainer (``configs/train_prior.json``) on codes encoded by the stage-1 weights, with its validation, and its
    sample grid amortised over ``prior_sample_interval`` epochs. ``--quick`` uses fewer images and scales the
    validation and encoding too. With section 9, the compiled figure applies 9's steady speed-up to the
    iterations (an estimate; compiling once costs 9's first call).
11. **Vector quantiser**: one training-mode call (nearest codes, EMA update, commitment loss) of the bundle's
    ``ScriptableEMAQuantizer`` against MONAI's ``EMAQuantizer`` with the same state, on the bottom level's encoder
    output for one training batch, interleaved round after round; whether both chose the same codes.
12. **Memorisation SSIM** (the generation metrics' nearest training slice of each sample): the bundle's
    ``nearest_ssim`` against MONAI's ``compute_ssim_and_cs`` over the same sample-reference pairs (channel-stacked,
    four references a call), 16 samples of the config's image size against 64 references (16 with ``--quick``),
    interleaved round after round; the largest difference of the two results.

The machine may be shared, so 1, 3, 4, 7 and 9 are measured side by side in ONE trainer run: after every trainer
iteration, a handler runs one plain-loop iteration, one batch of the data pipeline and the next three of the
training variants in turn, each timed on its own, and the trainer's own iteration is timed from the end of that
work to its next iteration end. Each figure is the MEDIAN over the timed epochs. The matmul peak is the BEST of its
samples, taken between trainer iterations. The load average before and after is recorded: compare runs only when
it was similar. Weights are random (cost does not depend on them), except that the trainer's own handlers (k-means
codebook init, dead-code restarts) run as in a real training.
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
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pydoc  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterable, Iterator, Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from itertools import cycle, islice  # noqa: E402

import benchmark_sampling  # noqa: E402  (scripts/benchmark_sampling.py)
import torch  # noqa: E402
from torch.nn.functional import conv2d, l1_loss  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402
from torch.utils.benchmark.utils.timer import timer as synchronized_clock  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bundle.data.phantom import write_hipmri_phantoms  # noqa: E402
from bundle.stage2_prior.two_level import TwoLevelCrossEntropy, prepare_code_batch  # noqa: E402

T0 = time.perf_counter()
VARIANTS = {  # name: (bf16 autocast, channels_last)
    "fp32": (False, False),
    "bf16": (True, False),
    "channels_last": (False, True),
    "bf16_channels_last": (True, True),
}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
STAGE1_CONFIGS = ("inference.json", "train_vqvae.json")
STAGE2_CONFIGS = ("inference.json", "train_vqvae.json", "train_prior.json")
# --tiny: the unit tests' sizes (tests/conftest.py TINY_NETWORK and TINY_PRIOR) and small batches
TINY_SIZES = {
    "channels": [16, 32],
    "num_res_channels": [16, 16],
    "num_embeddings": 64,
    "embedding_dim": 16,
    "prior_channels": 16,
    "prior_layers": [15, 3],
    "prior_head_channels": 32,
    "prior_cond_channels": 8,
    "prior_cond_blocks": 1,
    "batch_size": 4,
    "prior_batch_size": 4,
}
_PHANTOM_DEFAULTS = {k: p.default for k, p in inspect.signature(write_hipmri_phantoms).parameters.items()}
# the demo's data set: scripts/make_phantoms.py writes write_hipmri_phantoms' defaults
DEMO_IMAGES = {
    split: _PHANTOM_DEFAULTS[f"{prefix}_cases"] * _PHANTOM_DEFAULTS["slices_per_case"]
    for split, prefix in (("train", "train"), ("validate", "val"), ("test", "test"))
}
LOSS = TwoLevelCrossEntropy()


@dataclass(frozen=True)
class Plan:
    """How much of everything a run measures.

    Args:
        cases: ``(train, validate, test)`` phantom cases of 16 slices.
        epoch_length: trainer iterations per epoch in section 1.
        timed_epochs: epochs timed after the warm-up epoch in section 1.
        prior_iterations: iterations of the stage-2 trainer in section 10 (the first is a warm-up).
        validation_runs: runs of the stage-1 validator in section 10 (the fastest counts).
        naive_positions: positions naive sampling runs when it is extrapolated.
        naive_budget_s: naive sampling runs to the end when its estimate is within this.
        repeats: repeats of the repeated sampling timings.
        inference_rounds: interleaved rounds of the inference timings.
        inference_calls: batch-1 calls per round.
        omp_repeats: child processes per policy.
        peak_size: matrix size of the matmul peak.
    """

    cases: tuple[int, int, int]
    epoch_length: int
    timed_epochs: int
    prior_iterations: int
    validation_runs: int
    naive_positions: int
    naive_budget_s: float
    repeats: int
    inference_rounds: int
    inference_calls: int
    omp_repeats: int
    peak_size: int


def make_plan(args: argparse.Namespace, device: torch.device) -> Plan:
    """The plan of a full, ``--quick`` or ``--quick --tiny`` run."""
    peak = 8192 if device.type == "cuda" else 2048
    if not args.quick:
        cases = tuple(_PHANTOM_DEFAULTS[k] for k in ("train_cases", "val_cases", "test_cases"))
        return Plan(cases, 4, args.epochs or 2, 4, 2, 6, 30.0, 2, 3, 3, 2, peak)
    cases = (1, 1, 1) if args.tiny else (3, 1, 1)
    return Plan(cases, 3, args.epochs or 1, 3, 1, 3, 5.0, 1, 1, 1, 1, peak // 2)


def log(message: str) -> None:
    """Prints ``message`` to stderr with the seconds since the start."""
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

    For calls without side effects that matter (inference, decoding). Timer runs with this process's torch threads
    (its own default is 1) and waits for the accelerator.
    """
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(number).mean


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------------------------------- machine ---
def machine(device: torch.device) -> dict:
    """``benchmark_sampling.machine_info`` plus the CPU's vector/bf16 flags, monai and ignite versions, load."""
    import ignite
    import monai

    info = benchmark_sampling.machine_info(device)
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), flags)
    info.update(
        cpu_flags=[f for f in CPU_FLAGS if f in flags],
        monai=monai.__version__,
        ignite=ignite.__version__,
        cuda=torch.version.cuda,
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
def bundle_parser(names: Iterable[str], overrides: dict):
    """The layered ``configs/<names>`` with ``overrides`` (``bundle_root`` is always the repository)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", name) for name in names])
    parser.update({"bundle_root": ROOT, **overrides})
    return parser


def common_overrides(args: argparse.Namespace) -> dict:
    """Overrides of every parser of a run: the device and, with ``--tiny``, the sizes."""
    overrides = dict(TINY_SIZES) if args.tiny else {}
    if args.device:
        overrides["device"] = f"$torch.device('{args.device}')"
    return overrides


def training_overrides(args: argparse.Namespace, data_dir: str, work: str, plan: Plan) -> dict:
    """Temp data and output folders, no resume, eager; no stage-1 validation and ``epoch_length`` capped.

    The trainer is compared with an eager plain loop; section 9 measures compiling.
    """
    return {
        **common_overrides(args),
        "dataset_dir": data_dir,
        "output_dir": os.path.join(work, "outputs"),
        "ckpt_dir": os.path.join(work, "models"),
        "max_epochs": 1 + plan.timed_epochs,
        "val_interval": 10**9,  # no validation inside the timed epochs; section 10 runs the validator on its own
        "train::trainer::epoch_length": plan.epoch_length,
        "resume": False,
        "compile": False,
    }


def prior_overrides(plan: Plan) -> dict:
    """On top of :func:`training_overrides` for stage 2: one short epoch, validated."""
    return {"prior_max_epochs": 1, "prior_val_interval": 1, "prior_train::trainer::epoch_length": plan.prior_iterations}


def config_optimizer(config, id_: str) -> Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]:
    """The optimizer the config defines at ``id_`` (its class and arguments), for other parameters.

    Args:
        config: the parser.
        id_: e.g. ``"optimizer"`` or ``"prior_train::optimizer"``.

    Returns:
        A function of the parameters that builds the optimizer.
    """
    optimizer_class = pydoc.locate(config[f"{id_}::_target_"])
    names = [k for k in config[id_] if not k.startswith("_") and k != "params"]
    kwargs = {name: config.get_parsed_content(f"{id_}::{name}") for name in names}
    return lambda params: optimizer_class(params, **kwargs)


# ------------------------------------------------------------------------------------------------ primitives ---
def vqvae_step(net, opt, x: torch.Tensor, amp: bool, channels_last: bool, dtype=torch.bfloat16) -> torch.Tensor:
    """One plain-PyTorch VQ-VAE-2 training step: L1 reconstruction + quantisation loss of both levels."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=amp):
        reconstruction, quantization_loss = net(x)
    loss = l1_loss(reconstruction.float(), x) + quantization_loss
    loss.backward()
    opt.step()
    return loss


def random_code_batch(
    batch_size: int, latent_shapes: Sequence[Sequence[int]], num_embeddings: Sequence[int], device: torch.device
) -> dict[str, torch.Tensor]:
    """A batch as ``CodeDataset`` + ``DataLoader`` give it: ``{"top": [B, h_t, w_t], "bottom": [B, h_b, w_b]}``."""
    return {
        level: torch.randint(0, k, (batch_size, *shape), device=device)
        for level, shape, k in zip(("top", "bottom"), latent_shapes, num_embeddings)
    }


def prior_step(net, opt, batch: dict[str, torch.Tensor], amp: bool) -> torch.Tensor:
    """One plain-PyTorch step of the two-level prior as the stage-2 trainer runs it: ``prepare_code_batch``, the
    prior on ``(top, bottom)``, ``TwoLevelCrossEntropy``."""
    top, codes, args, kwargs = prepare_code_batch(batch)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(top.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(top, *args, **kwargs)
    loss = LOSS([lg.float() for lg in logits], codes)
    loss.backward()
    opt.step()
    return loss


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn``, counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class MatmulPeak:
    """Best GFLOP/s of a ``size``-cubed matrix product in fp32 and bf16.

    Each product is timed both as ``torch.mm`` (MKL / cuBLAS) and as the same GEMM written as a 1x1 convolution
    (oneDNN / cuDNN, the library the networks' convolutions run on): on some CPUs the two differ by 2x, and the
    faster one is the machine's attainable peak. ``sample()`` is called again and again during the run, so that
    the best of all samples is taken when the machine happened to be free.
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


def forever(loader: Iterable) -> Iterator:
    """Batches of ``loader``, epoch after epoch (a fresh iterator, so a fresh shuffle, each time)."""
    while True:
        yield from loader


class Lockstep:
    """Times the trainer's own iterations and runs the other training variants between them.

    Attached LAST to ``Events.ITERATION_COMPLETED``, so it sees the end of every trainer iteration (all the
    config's per-iteration handlers included). Each call then runs, timed one by one: one plain-loop iteration,
    one batch of the data pipeline alone, the next ``per_iteration`` companions in a fixed rotation, and a
    matmul-peak sample. The trainer's iteration time is measured from the end of that work to the next call. The
    first iteration of each epoch (epoch-end handlers of the previous epoch) is kept apart as ``boundary``.
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
        self.samples: dict[str, list[tuple[int, int, float]]] = defaultdict(list)  # name -> [(epoch, it, s)]

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
    """Median, best and mean step seconds of ``values``, items/s, and achieved GFLOP/s and share of the peak."""
    step = median(values)
    out = {
        "step_s": step,
        "step_s_best": min(values, default=float("nan")),
        "step_s_mean": statistics.fmean(values) if values else float("nan"),
        "n": len(values),
        "items_per_s": items_per_step / step,
    }
    if flops_per_step:
        out["achieved_gflops"] = flops_per_step / step / 1e9
        if peak_gflops:
            out["fraction_of_peak"] = out["achieved_gflops"] / peak_gflops
    return out


# ---------------------------------------------------------------------------------------------------- main -----
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations and images, same sizes")
    parser.add_argument("--tiny", action="store_true", help="the unit tests' tiny networks and batches of 4")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the config's, CUDA when present)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument(
        "--epochs", type=int, default=0, help="timed trainer epochs after the warm-up epoch (0: 2, or 1 with --quick)"
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark (or, with ``--omp_probe_child``, one OpenMP probe) and prints and writes the results.

    Args:
        argv: command-line arguments; ``None`` reads ``sys.argv``.
    """
    args = parse_args(argv)
    os.chdir(ROOT)  # the configs import `bundle` from the working directory
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.omp_probe_child:
        print(json.dumps(omp_probe_child(args.omp_probe_child, args)))
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
            f.write(json.dumps(results, indent=4) + "\n")
        print(f"wrote {args.json}")


def run(args: argparse.Namespace, work: str) -> dict:
    """Every section; returns the JSON-ready results."""
    data_dir = os.path.join(work, "data")
    probe_device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = make_plan(args, probe_device)
    train_cases, val_cases, test_cases = plan.cases
    counts = write_hipmri_phantoms(data_dir, train_cases=train_cases, val_cases=val_cases, test_cases=test_cases)
    log(f"phantoms written: {counts}")
    config = bundle_parser(STAGE2_CONFIGS, training_overrides(args, data_dir, work, plan))  # prior sizes too
    device = torch.device(config.get_parsed_content("device"))
    info = machine(device)

    training = interleaved_training(args, plan, config, work, device)
    stage1 = stage1_epoch(config, plan, training, counts)
    log(f"stage 1: {stage1['epoch_s']:.1f} s per demo epoch")
    stage2 = stage2_epoch(args, plan, data_dir, work, training, counts)
    log(f"stage 2: {stage2['epoch_s']:.1f} s per demo epoch")

    inference, vqvae, prior, latent_shapes = inference_benchmark(args, plan)
    log("inference done")
    sampling = benchmark_sampling.sampling_report(
        vqvae,
        prior,
        latent_shapes,
        num_samples=16,
        naive_positions=plan.naive_positions,
        naive_budget_s=plan.naive_budget_s,
        repeats=plan.repeats,
        seed=args.seed,
    )
    log("sampling done")

    quantizer = quantizer_benchmark(config, plan, device)
    memorisation = memorisation_ssim_benchmark(config, plan)
    log(f"quantiser: {quantizer['speedup']:.2f}x MONAI's")

    omp = None
    if not args.no_omp_probe and device.type == "cpu":
        omp = omp_probe(4 if args.quick else config.get_parsed_content("batch_size"), plan.omp_repeats, args)
        log("OpenMP probe done")

    info["load_average_end"] = list(os.getloadavg())
    return {
        "schema": 2,
        "command": " ".join(["python", *sys.argv]),
        "quick": args.quick,
        "tiny": args.tiny,
        "machine": info,
        "settings": {
            "device": str(device),
            "plan": asdict(plan),
            "phantom_images": counts,
            **{
                key: config.get_parsed_content(key)
                for key in (
                    "batch_size",
                    "prior_batch_size",
                    "image_size",
                    "channels",
                    "num_res_channels",
                    "num_embeddings",
                    "embedding_dim",
                    "prior_channels",
                    "prior_layers",
                    "latent_shapes",
                )
            },
            "statistic": "median over the timed epochs, variants interleaved with the trainer's iterations; "
            "matmul peak: best of repeats; inference, decoding and the OpenMP probe: mean per call after "
            "torch.utils.benchmark.Timer's warm-up (inference: median over rounds); sampling: best of repeats",
        },
        **training,
        "training_time": {"stage1": stage1, "stage2": stage2},
        "inference": inference,
        "sampling": sampling,
        "quantizer": quantizer,
        "memorisation_ssim": memorisation,
        "omp_wait_policy": omp,
        "wall_s": time.perf_counter() - T0,
    }


# ----------------------------------------------------------------------------- 1, 2, 3, 4, 7, 9: interleaved ---
def interleaved_training(args: argparse.Namespace, plan: Plan, config, work: str, device: torch.device) -> dict:
    """Sections 1, 2, 3, 4, 7 and 9: the stage-1 trainer runs; every other step runs between its iterations."""
    from ignite.engine import Events

    cache_s, train_dataset = once(lambda: config.get_parsed_content("train::dataset"))  # caches every image
    val_cache_s, _ = once(lambda: config.get_parsed_content("validate::dataset"))
    trainer = config.get_parsed_content("train::trainer")
    loader = config.get_parsed_content("train::dataloader")  # the trainer's own loader
    image_key = config.get_parsed_content("image")
    batch_size = config.get_parsed_content("batch_size")
    amp, dtype = config.get_parsed_content("amp"), config.get_parsed_content("amp_torch_dtype")
    amp_dtype = str(dtype).removeprefix("torch.")
    channels_last = config.get_parsed_content("channels_last")
    vqvae_optimizer = config_optimizer(config, "optimizer")
    log(
        f"stage-1 trainer built ({len(train_dataset)} cached training images in {cache_s:.1f} s); device {device}, "
        f"batch {batch_size}, amp {amp} ({amp_dtype}), channels_last {channels_last}"
    )

    # a second, untouched instance of the same network_def (no CodebookMonitor hooks), same initial weights
    base = config.get_parsed_content("network_def", lazy=False)
    base.load_state_dict(trainer.network.state_dict())
    base.to(device)

    peak_meter = MatmulPeak(device, plan.peak_size)
    for _ in range(3):
        peak_meter.sample()
    batches = [b[image_key].to(device) for b in islice(forever(loader), 4)]  # preloaded, for the variants

    def new_vqvae(cl: bool):
        net = copy.deepcopy(base).to(memory_format=torch.channels_last if cl else torch.contiguous_format).train()
        return net, vqvae_optimizer(net.parameters())

    flops = {
        name: count_flops(lambda name=name: vqvae_step(*new_vqvae(VARIANTS[name][1]), batches[0], *VARIANTS[name]))
        for name in ("fp32", "bf16_channels_last")
    }
    log(f"VQ-VAE-2 training step: {flops['fp32'] / 1e9:.1f} GFLOP per batch of {batch_size} (FlopCounterMode)")

    prior_base = config.get_parsed_content("prior_def", lazy=False).to(device)
    prior_batch = config.get_parsed_content("prior_batch_size")
    prior_optimizer = config_optimizer(config, "prior_train::optimizer")
    latent_shapes = config.get_parsed_content("latent_shapes")
    code_batch = random_code_batch(prior_batch, latent_shapes, prior_base.num_embeddings, device)

    def new_prior():
        net = copy.deepcopy(prior_base).train()
        return net, prior_optimizer(net.parameters())

    prior_flops = count_flops(lambda: prior_step(*new_prior(), code_batch, False))

    plain_net, plain_opt = new_vqvae(channels_last)
    plain_batches, data_batches, variant_batches = forever(loader), forever(loader), cycle(batches)

    def plain_iteration() -> None:
        x = next(plain_batches)[image_key].to(device)
        vqvae_step(plain_net, plain_opt, x, amp, channels_last, dtype).item()  # .item(): what a loop logs

    companions: dict[str, Callable[[], object]] = {}
    for name, (amp_v, cl_v) in VARIANTS.items():
        net, opt = new_vqvae(cl_v)
        companions[f"vqvae_{name}"] = lambda net=net, opt=opt, amp_v=amp_v, cl_v=cl_v: vqvae_step(
            net, opt, next(variant_batches), amp_v, cl_v
        )
    for name in ("fp32", "bf16"):
        net, opt = new_prior()
        companions[f"prior_{name}"] = lambda net=net, opt=opt, amp_v=name == "bf16": prior_step(
            net, opt, code_batch, amp_v
        )
    compile_info = compiled_companions(
        args,
        work,
        companions,
        device,
        new_vqvae,
        new_prior,
        batches,
        variant_batches,
        code_batch,
        (amp, channels_last, dtype),
    )
    lockstep = Lockstep(
        plain_iteration, lambda: next(data_batches)[image_key].to(device), companions, per_iteration=3, peak=peak_meter
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lockstep)  # attached last: runs after the config's
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: log(
            f"trainer epoch {e.state.epoch}/{e.state.max_epochs}{' (warm-up)' if e.state.epoch == 1 else ''} done"
        ),
    )
    log(
        f"trainer: 1 warm-up + {plan.timed_epochs} timed epochs of {plan.epoch_length} iterations; between its "
        f"iterations: plain loop, data pipeline and 3 of {list(companions)} in turn"
    )
    trainer_run_s, _ = once(trainer.run)

    peak = peak_meter.result()
    log("matmul peak GFLOP/s: " + ", ".join(f"{k[:-7]} {v:.0f}" for k, v in peak.items() if k.endswith("_gflops")))
    vq = variant_stats(lockstep, batch_size, flops["fp32"], peak)
    config_variant = next(name for name, v in VARIANTS.items() if v == (bool(amp), bool(channels_last)))
    settings = {"amp": amp, "amp_dtype": amp_dtype, "channels_last": channels_last, "batch_size": batch_size}
    tvp = trainer_vs_plain(lockstep, batch_size, vq[config_variant]["step_s"], config_variant, settings)
    tvp["trainer_run_s_with_companions"] = trainer_run_s
    data = data_pipeline_stats(lockstep, batch_size, tvp["trainer_step_s"])
    data.update(cache_build_s=cache_s, validation_cache_build_s=val_cache_s, cached_images=len(train_dataset))
    data.update(num_workers=config.get_parsed_content("num_workers"))
    prior = {
        "flops_per_step": prior_flops,
        "batch_size": prior_batch,
        "latent_shapes": [list(s) for s in latent_shapes],
    }
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
    return {
        "peak_matmul": peak,
        "vqvae_flops": {
            "per_step_fp32": flops["fp32"],
            "per_step_bf16_channels_last": flops["bf16_channels_last"],
            "per_image": flops["fp32"] / batch_size,
            "batch_size": batch_size,
        },
        "vqvae_train_step": vq,
        "vqvae_speedup_vs_fp32": {n: vq["fp32"]["step_s"] / vq[n]["step_s"] for n in VARIANTS if n != "fp32"},
        "trainer_vs_plain": tvp,
        "data_pipeline": data,
        "prior_train_step": prior,
        "compile": compile_info,
    }


def variant_stats(lockstep: Lockstep, batch_size: int, flops_step: float, peak: dict) -> dict:
    """Section 3: images/s and fraction of the matching peak of each VQ-VAE-2 training variant."""
    out = {}
    for name, (amp_v, _) in VARIANTS.items():
        precision = "bf16" if amp_v else "fp32"
        out[name] = step_stats(lockstep.seconds(f"vqvae_{name}"), batch_size, flops_step, peak[f"{precision}_gflops"])
        out[name]["images_per_s"] = out[name].pop("items_per_s")
        out[name]["peak_used"] = precision
    return out


def trainer_vs_plain(lockstep: Lockstep, batch_size: int, preloaded_s: float, variant: str, settings: dict) -> dict:
    """Section 1 from the lockstep samples."""
    trainer_s, plain_s = median(lockstep.seconds("trainer")), median(lockstep.seconds("plain_loop"))
    boundary = lockstep.seconds("trainer_boundary")
    out = {
        "trainer_images_per_s": batch_size / trainer_s,
        "plain_loop_images_per_s": batch_size / plain_s,
        "ratio": plain_s / trainer_s,
        "ratio_paired_median": median(lockstep.paired_ratios("plain_loop", "trainer")),
        "ratio_best_based": min(lockstep.seconds("plain_loop")) / min(lockstep.seconds("trainer")),
        "target": 0.95,
        "plain_loop_preloaded_images_per_s": batch_size / preloaded_s,
        "plain_loop_preloaded_variant": variant,
        "trainer_step_s": trainer_s,
        "plain_loop_step_s": plain_s,
        "trainer_iterations_timed": len(lockstep.seconds("trainer")),
        "epoch_boundary_extra_s": median(boundary) - trainer_s if boundary else None,
        "settings": {**settings, "val_interval": "off (10**9)"},
    }
    out["meets_target"] = out["ratio"] >= out["target"]
    return out


def data_pipeline_stats(lockstep: Lockstep, batch_size: int, trainer_s: float) -> dict:
    """Section 4 from the lockstep samples."""
    data_s = median(lockstep.seconds("data_pipeline"))
    return {
        "images_per_s": batch_size / data_s,
        "batch_s": data_s,
        "trainer_images_per_s": batch_size / trainer_s,
        "headroom_vs_trainer": trainer_s / data_s,
        "share_of_trainer_step": data_s / trainer_s,
    }


def compiled_companions(
    args: argparse.Namespace,
    work: str,
    companions: dict,
    device: torch.device,
    new_vqvae: Callable,
    new_prior: Callable,
    batches: list[torch.Tensor],
    variant_batches: Iterator[torch.Tensor],
    code_batch: dict[str, torch.Tensor],
    settings: tuple,
) -> dict:
    """Section 9: adds ``torch.compile``d copies of the config's VQ-VAE-2 step and of the bf16 prior step.

    They join the companions interleaved with the trainer, beside their eager twins (``vqvae_<config variant>``
    and ``prior_bf16``). Each is compiled here, and its first call (tracing + inductor code generation) is timed.
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
    info["prior_first_call_s"], _ = once(lambda: prior_step(prior, prior_opt, code_batch, True))
    log(
        f"torch.compile: first VQ-VAE-2 step {info['vqvae_first_call_s']:.1f} s, first prior step "
        f"{info['prior_first_call_s']:.1f} s (compiling)"
    )
    companions["vqvae_compiled"] = lambda: vqvae_step(vqvae, opt, next(variant_batches), amp, channels_last, dtype)
    companions["prior_bf16_compiled"] = lambda: prior_step(prior, prior_opt, code_batch, True)
    return info


def compile_effect(lockstep: Lockstep, eager: str, compiled: str, batch: int, first_call_s: float) -> dict:
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


# ---------------------------------------------------------------------------------- 10: training time/epoch ---
def batches_per_epoch(images: int, batch_size: int, drop_last: bool) -> int:
    """Batches a ``DataLoader`` gives for ``images`` items."""
    return images // batch_size if drop_last else math.ceil(images / batch_size)


def compiled_epoch(iterations: int, iteration_s: float, rest_s: float, compiled: dict | None) -> float | None:
    """Epoch seconds with section 9's steady speed-up applied to the iterations (None without section 9)."""
    return iterations * iteration_s / compiled["speedup"] + rest_s if compiled else None


def stage1_epoch(config, plan: Plan, training: dict, counts: dict) -> dict:
    """Section 10, stage 1: demo iterations x the trainer's iteration time (section 1), its epoch-end handlers and
    the config's validator run on its own (which also writes ``model.pt`` for stage 2)."""
    evaluator = config.get_parsed_content("validate::evaluator")
    runs = [once(lambda: evaluator.run())[0] for _ in range(plan.validation_runs)]
    batch_size = config.get_parsed_content("batch_size")
    tvp = training["trainer_vs_plain"]
    iterations = batches_per_epoch(DEMO_IMAGES["train"], batch_size, drop_last=True)
    val_scale = batches_per_epoch(DEMO_IMAGES["validate"], batch_size, False) / batches_per_epoch(
        counts["validate"], batch_size, False
    )
    validation_s = min(runs) * val_scale
    boundary = max(tvp["epoch_boundary_extra_s"] or 0.0, 0.0)
    rest = validation_s + boundary
    cache = training["data_pipeline"]
    return {
        "method": f"{iterations} iterations x median trainer iteration (section 1, {tvp['trainer_iterations_timed']} "
        "timed) + epoch-end handlers (section 1) + one run of validate#evaluator"
        + (f" scaled x{val_scale:.2g} to {DEMO_IMAGES['validate']} images" if val_scale != 1 else ""),
        "training_images": DEMO_IMAGES["train"],
        "validation_images": DEMO_IMAGES["validate"],
        "batch_size": batch_size,
        "iterations_per_epoch": iterations,
        "iteration_s": tvp["trainer_step_s"],
        "epoch_end_handlers_s": boundary,
        "validation_s": validation_s,
        "validation_measured_images": counts["validate"],
        "epoch_s": iterations * tvp["trainer_step_s"] + rest,
        "epoch_s_compiled_estimate": compiled_epoch(
            iterations, tvp["trainer_step_s"], rest, training["compile"].get("vqvae")
        ),
        "compile": False,
        "once_per_run_s": {
            "cache_build": (cache["cache_build_s"] + cache["validation_cache_build_s"])
            * (DEMO_IMAGES["train"] + DEMO_IMAGES["validate"])
            / (counts["train"] + counts["validate"])
        },
    }


class StageClock:
    """Stamps of a trainer's epoch start, iterations, epoch end and completion, and of its validator's runs.

    Attached after the config's handlers, so each stamp comes after theirs for the same event.
    """

    def __init__(self, trainer, evaluator) -> None:
        from ignite.engine import Events

        self.stamps: dict[str, list[float]] = defaultdict(list)
        for event in (Events.EPOCH_STARTED, Events.ITERATION_COMPLETED, Events.EPOCH_COMPLETED, Events.COMPLETED):
            trainer.add_event_handler(event, self._stamp, f"train_{event.name.lower()}")
        for event in (Events.STARTED, Events.COMPLETED):
            evaluator.add_event_handler(event, self._stamp, f"validate_{event.name.lower()}")

    def _stamp(self, engine, key: str) -> None:
        self.stamps[key].append(synchronized_clock())

    def iteration_s(self) -> list[float]:
        """Seconds of every iteration of the first epoch (the first one is measured from the epoch start)."""
        ticks = self.stamps["train_epoch_started"][:1] + self.stamps["train_iteration_completed"]
        return [b - a for a, b in zip(ticks[:-1], ticks[1:])]

    def validation_s(self) -> float:
        """Seconds of the first validation run."""
        return self.stamps["validate_completed"][0] - self.stamps["validate_started"][0]

    def epoch_end_s(self) -> float:
        """From the last iteration to the end of the epoch-end handlers (validation included)."""
        return self.stamps["train_epoch_completed"][0] - self.stamps["train_iteration_completed"][-1]

    def completion_s(self) -> float:
        """The handlers of ``COMPLETED`` (the sample grid, the final save)."""
        return self.stamps["train_completed"][0] - self.stamps["train_epoch_completed"][-1]


def stage2_epoch(args: argparse.Namespace, plan: Plan, data_dir: str, work: str, training: dict, counts: dict) -> dict:
    """Section 10, stage 2: the config's prior trainer, eager, for ``plan.prior_iterations`` iterations and one
    validation, on codes encoded with the stage-1 weights ``stage1_epoch`` saved; scaled to a demo epoch."""
    config = bundle_parser(STAGE2_CONFIGS, {**training_overrides(args, data_dir, work, plan), **prior_overrides(plan)})
    encode_s, _ = once(
        lambda: (config.get_parsed_content("prior_train::codes"), config.get_parsed_content("prior_validate::codes"))
    )
    trainer = config.get_parsed_content("prior_train::trainer")
    clock = StageClock(trainer, config.get_parsed_content("prior_validate::evaluator"))
    trainer.run()
    iterations_run = clock.iteration_s()
    timed = iterations_run[1:] or iterations_run  # the first iteration warms up
    batch_size = config.get_parsed_content("prior_batch_size")
    iterations = batches_per_epoch(DEMO_IMAGES["train"], batch_size, drop_last=True)
    val_scale = batches_per_epoch(DEMO_IMAGES["validate"], batch_size, False) / batches_per_epoch(
        counts["validate"], batch_size, False
    )
    validation_s = clock.validation_s() * val_scale
    other_epoch_end_s = clock.epoch_end_s() - clock.validation_s()
    interval = config.get_parsed_content("prior_sample_interval")
    grid_s = clock.completion_s()
    rest = validation_s + other_epoch_end_s + (grid_s / interval if interval > 0 else 0.0)
    iteration_s = median(timed)
    encode_scale = (DEMO_IMAGES["train"] + DEMO_IMAGES["validate"]) / (counts["train"] + counts["validate"])
    return {
        "method": f"{iterations} iterations x median of {len(timed)} timed iterations of prior_train#trainer + its "
        "measured epoch end (validation" + (f" scaled x{val_scale:.2g}" if val_scale != 1 else "") + ", checkpoints)"
        f" + the end-of-run sample grid / prior_sample_interval ({interval})",
        "training_images": DEMO_IMAGES["train"],
        "validation_images": DEMO_IMAGES["validate"],
        "batch_size": batch_size,
        "iterations_per_epoch": iterations,
        "iteration_s": iteration_s,
        "iterations_timed": len(timed),
        "first_iteration_s": iterations_run[0],
        "validation_s": validation_s,
        "validation_measured_images": counts["validate"],
        "epoch_end_checkpoints_s": other_epoch_end_s,
        "sample_grid_s": grid_s,
        "sample_grid_count": config.get_parsed_content("prior_sample_count"),
        "sample_grid_interval": interval,
        "epoch_s": iterations * iteration_s + rest,
        "epoch_s_compiled_estimate": compiled_epoch(iterations, iteration_s, rest, training["compile"].get("prior")),
        "compile": False,
        "once_per_run_s": {"encode_codes": encode_s * encode_scale},
        "once_per_run_scaled_from_images": counts["train"] + counts["validate"],
    }


# ----------------------------------------------------------------------------------------------- 6: inference ---
def inference_benchmark(args: argparse.Namespace, plan: Plan) -> tuple[dict, torch.nn.Module, torch.nn.Module, tuple]:
    """ms per slice: the inference network/inferer of configs/inference.json, and index_quantize (eval mode).

    Returns:
        ``(figures, the eval VQ-VAE-2, the eval prior, latent_shapes)``, the networks for section 5.
    """
    from bundle.engine.inferers import AutocastInferer

    config = bundle_parser(("inference.json",), common_overrides(args))
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
        for _ in range(plan.inference_rounds):  # jobs interleaved, round after round, so that load hits them alike
            for name, fn in jobs.items():
                for b in (1, 16):
                    seconds = per_call_s(functools.partial(fn, b), plan.inference_calls if b == 1 else 1)
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
    out["bf16_channels_last_code_agreement"] = {
        level: float((a == b).float().mean()) for level, a, b in zip(("top", "bottom"), codes_ref, codes_fast)
    }
    prior = config.get_parsed_content("prior_def").to(device).eval()
    return out, net, prior, config.get_parsed_content("latent_shapes")


def _encode_fast(net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return net.index_quantize(x.contiguous(memory_format=torch.channels_last))


# --------------------------------------------------------------------------------------------- 11: quantiser ---
def quantizer_benchmark(config, plan: Plan, device: torch.device) -> dict:
    """ms per training-mode call of the bundle's quantiser and of MONAI's ``EMAQuantizer`` (same state, same input:
    the bottom level of one training batch), interleaved; and whether they chose the same codes."""
    from monai.networks.layers.vector_quantizer import EMAQuantizer

    from bundle.stage1_vqvae.quantizer import ScriptableEMAQuantizer

    bottom = config.get_parsed_content("network_def").bottom_quantizer
    size = {"num_embeddings": bottom.num_embeddings, "embedding_dim": bottom.embedding_dim}
    quantizers = {
        "bundle": ScriptableEMAQuantizer(spatial_dims=2, **size),
        "monai": EMAQuantizer(spatial_dims=2, **size),
    }
    quantizers["monai"].load_state_dict(quantizers["bundle"].state_dict())
    batch = config.get_parsed_content("batch_size")
    shape = (batch, size["embedding_dim"], *config.get_parsed_content("latent_shapes")[1])
    x = torch.randn(shape, device=device)
    codes = {name: q.to(device).train()(x)[2] for name, q in quantizers.items()}
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(max(3, plan.inference_rounds)):  # interleaved, so that load hits both alike
        for name, q in quantizers.items():
            times[name].append(per_call_s(functools.partial(q, x), 3))
    out = {f"{name}_ms": 1000 * median(v) for name, v in times.items()}
    out.update(input_shape=list(shape), num_embeddings=size["num_embeddings"])
    out["speedup"] = out["monai_ms"] / out["bundle_ms"]
    out["same_codes"] = bool(torch.equal(codes["bundle"], codes["monai"]))
    return out


# ---------------------------------------------------------------------------------- 12: memorisation SSIM ---
def monai_nearest_ssim(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Each sample's best SSIM to the references with MONAI's ``compute_ssim_and_cs``, the samples stacked as
    channels against four references at a time (the bundle's method before version 0.4.5)."""
    from monai.metrics import SSIMMetric
    from monai.metrics.regression import compute_ssim_and_cs

    cfg = SSIMMetric(spatial_dims=2, data_range=1.0)
    n, _, h, w = samples.shape
    stacked = samples.reshape(1, n, h, w)
    best = torch.full((n,), -math.inf)
    for refs in references.split(4):
        ssim_map, _ = compute_ssim_and_cs(
            stacked.expand(len(refs), -1, -1, -1),
            refs.repeat(1, n, 1, 1),
            2,
            cfg.kernel_size,
            cfg.kernel_sigma,
            cfg.data_range,
            cfg.kernel_type,
            cfg.k1,
            cfg.k2,
        )
        best = torch.maximum(best, ssim_map.flatten(2).mean(-1).max(0).values)
    return best


def memorisation_ssim_benchmark(config, plan: Plan) -> dict:
    """s per call of the bundle's ``nearest_ssim`` and of the MONAI-function reference, same images, interleaved."""
    from bundle.evaluation.metrics import nearest_ssim

    generator = torch.Generator().manual_seed(0)
    size = config.get_parsed_content("image_size")
    references = torch.rand(16 if plan.cases[0] < 10 else 64, 1, *size, generator=generator)
    samples = torch.cat([references[:2] * 0.9, torch.rand(14, 1, *size, generator=generator)])
    jobs = {
        "bundle": lambda: nearest_ssim(samples, references),
        "monai": lambda: monai_nearest_ssim(samples, references),
    }
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(max(3, plan.inference_rounds)):
        for name, job in jobs.items():
            times[name].append(per_call_s(job, 1))
    out = {f"{name}_s": median(v) for name, v in times.items()}
    out.update(samples=len(samples), references=len(references), image_size=list(size))
    out["speedup"] = out["monai_s"] / out["bundle_s"]
    out["max_abs_difference"] = float((jobs["bundle"]() - jobs["monai"]()).abs().max())
    return out


# ------------------------------------------------------------------------------------------ 8: OpenMP policy ---
def omp_probe_child(batch_size: int, args: argparse.Namespace) -> dict:
    """In a child process: a VQ-VAE-2 training step as the stage-1 config trains (batch ``batch_size``) and a
    batch-1 reconstruction as ``configs/inference.json`` runs it, under this process's ``OMP_WAIT_POLICY``."""
    config = bundle_parser(STAGE1_CONFIGS, common_overrides(args))
    device = torch.device(config.get_parsed_content("device"))
    amp, cl = config.get_parsed_content("amp"), config.get_parsed_content("channels_last")
    dtype = config.get_parsed_content("amp_torch_dtype")
    net = config.get_parsed_content("network")
    opt = config.get_parsed_content("optimizer")
    x = torch.rand(batch_size, 1, *config.get_parsed_content("image_size"), device=device)
    step_s = per_call_s(lambda: vqvae_step(net, opt, x, amp, cl, dtype), 2)
    inference = bundle_parser(("inference.json",), common_overrides(args))
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


def omp_probe(batch_size: int, repeats: int, args: argparse.Namespace) -> dict:
    """Section 8: the same workload in child processes with the torch default threads and ``OMP_WAIT_POLICY``
    unset (libgomp's default: spin) or ``PASSIVE``, and with 1 thread, whatever this process's own setting.

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
        for name in list(policies) if rep % 2 == 0 else list(policies)[::-1]:
            policy, n_threads = policies[name]
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            command = [sys.executable, os.path.abspath(__file__), "--omp_probe_child", str(batch_size)]
            command += ["--threads", str(n_threads)] + (["--tiny"] if args.tiny else [])
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
class Table:
    """Rows of ``(name, value, note)`` under section titles, printed aligned."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def section(self, title: str) -> None:
        self.rows.append((f"-- {title}", "", ""))

    def row(self, name: str, value: str, note: str = "") -> None:
        self.rows.append((f"   {name}", value, note))

    def print(self) -> None:
        widths = [max(len(x[i]) for x in self.rows if x[1]) for i in range(2)]
        for a, b, c in self.rows:
            print(a if not b else f"{a.ljust(widths[0])}  {b.rjust(widths[1])}  {c}".rstrip())


def print_table(r: dict) -> None:
    """The results as a table on stdout."""
    m = r["machine"]
    print()
    print(
        f"machine : {m['cpu']} | {m['cpu_cores']} cores, {m['torch_threads']} torch threads | "
        f"flags {' '.join(m['cpu_flags']) or '-'} | GPU {m['gpu'] or 'none'} | device {m['device']}"
    )
    print(
        f"versions: python {m['python']} | torch {m['torch']} | monai {m['monai']} | ignite {m['ignite']} | env "
        + (" ".join(f"{k}={v}" for k, v in m["env"].items()) or "-")
        + (" (PASSIVE set by the benchmark)" if m["omp_wait_policy_set_by_benchmark"] else "")
    )
    la, lb = m["load_average_start"], m["load_average_end"]
    mode = ("QUICK" if r["quick"] else "full") + (" TINY networks" if r["tiny"] else "")
    print(
        f"load    : {la[0]:.2f} at start, {lb[0]:.2f} at end (1-min load average; {m['cpu_cores']} cores) | {mode} "
        f"run, {r['settings']['plan']['timed_epochs']} timed epoch(s), variants interleaved, medians | wall "
        f"{r['wall_s']:.0f} s"
    )
    table = Table()
    table_training(table, r)
    table_sampling(table, r["sampling"])
    table_inference(table, r["inference"])
    table_extras(table, r)
    table_epochs(table, r["training_time"])
    table.print()


def table_training(table: Table, r: dict) -> None:
    """Sections 1 to 4."""
    t, d, batch = r["trainer_vs_plain"], r["data_pipeline"], r["settings"]["batch_size"]
    s = t["settings"]
    table.section(
        f"1. stage-1 trainer vs plain loop, {s['amp_dtype'] if s['amp'] else 'fp32'}"
        f"{' + channels_last' if s['channels_last'] else ''}, batch {batch}"
    )
    table.row(
        "Ignite trainer",
        f"{t['trainer_images_per_s']:.2f} img/s",
        f"{t['trainer_iterations_timed']} steady-state iterations",
    )
    table.row("plain loop, same DataLoader", f"{t['plain_loop_images_per_s']:.2f} img/s")
    table.row(
        "ratio trainer / plain",
        f"{t['ratio']:.3f}",
        f"target >= {t['target']} ({'met' if t['meets_target'] else 'NOT met'}); "
        f"paired per iteration {t['ratio_paired_median']:.3f}, best-based {t['ratio_best_based']:.3f}",
    )
    table.row("plain loop, preloaded tensors", f"{t['plain_loop_preloaded_images_per_s']:.2f} img/s", "no loading")
    if t["epoch_boundary_extra_s"] is not None:
        table.row("epoch boundary", f"{t['epoch_boundary_extra_s']:+.3f} s/epoch", "epoch-end handlers")
    peak, flops = r["peak_matmul"], r["vqvae_flops"]
    table.section(
        f"2./3. VQ-VAE-2 training step, batch {batch}, {flops['per_image'] / 1e9:.2f} GFLOP/image; matmul peak fp32 "
        f"{peak['fp32_gflops']:.0f}, bf16 {peak['bf16_gflops']:.0f} GFLOP/s ({peak['size']}^3, {peak['samples']} "
        "samples)"
    )
    for name, v in r["vqvae_train_step"].items():
        sp = r["vqvae_speedup_vs_fp32"].get(name)
        table.row(
            name,
            f"{v['images_per_s']:.2f} img/s",
            f"{v['achieved_gflops']:.1f} GFLOP/s = {100 * v['fraction_of_peak']:.0f}% of {v['peak_used']} peak"
            + (f"; {sp:.2f}x fp32" if sp else ""),
        )
    table.section("4. data pipeline alone (config DataLoader: CacheDataset + augmentation)")
    table.row(
        "loader",
        f"{d['images_per_s']:.1f} img/s",
        f"{d['headroom_vs_trainer']:.0f}x what the trainer consumes; cache build {d['cache_build_s']:.1f} s for "
        f"{d['cached_images']} images",
    )


def table_sampling(table: Table, sm: dict) -> None:
    """Section 5."""
    top, bottom = (f"{s[0]}x{s[1]}" for s in sm["latent_shapes"])
    table.section(f"5. sampling, batch of {sm['num_samples']}, top {top}, bottom {bottom} (conditioned on the top)")
    for level, v in sm["levels"].items():
        how = (
            f"EXTRAPOLATED from {v['naive_measured_positions']} positions"
            if v["naive_extrapolated"]
            else "measured to the end"
        )
        table.row(f"{level} naive", f"{v['naive_s']:.1f} s", how)
        table.row(
            f"{level} fast",
            f"{v['fast_s']:.2f} s",
            f"{v['speedup']:.0f}x naive; codes identical (torch.equal, {v['naive_measured_positions']} positions): "
            f"{v['fast_equals_naive']}",
        )
    table.row("decode", f"{sm['decode_s']:.3f} s", f"two levels: naive {sm['naive_slices_s']:.0f} s with decoding")
    g = sm["generate"]
    table.row(f"{g['num_slices']} slices, generate()", f"{g['seconds']:.2f} s", f"{g['seconds_per_slice']:.3f} s/slice")
    s = sm["small"]
    table.row(
        f"small {s['latent_shapes'][0]} + {s['latent_shapes'][1]}",
        f"{s['speedup_measured']:.1f}x",
        f"naive {s['naive_s']:.2f} s vs fast {s['fast_s']:.3f} s, both to the end; identical: {s['fast_equals_naive']}",
    )


def table_inference(table: Table, inf: dict) -> None:
    """Section 6."""
    table.section("6. inference (configs/inference.json; random weights), batch 1 / batch 16")
    for name in ("reconstruction", "encode", "reconstruction_bf16_channels_last", "encode_bf16_channels_last"):
        table.row(
            name,
            f"{inf[f'{name}_batch1_ms_per_slice']:.1f} / {inf[f'{name}_batch16_ms_per_slice']:.1f} ms/slice",
            "not the config's setting" if "bf16" in name else "",
        )


def table_extras(table: Table, r: dict) -> None:
    """Sections 7, 8 and 9."""
    p = r["prior_train_step"]
    table.section(
        f"7. prior training step, batch {p['batch_size']}, {p['flops_per_step'] / p['batch_size'] / 1e9:.1f}"
        " GFLOP/map pair"
    )
    for name in ("fp32", "bf16"):
        v = p[name]
        table.row(
            name,
            f"{v['maps_per_s']:.2f} maps/s",
            f"{v['achieved_gflops']:.1f} GFLOP/s = {100 * v['fraction_of_peak']:.0f}% of {name} peak"
            + (f"; {p['bf16_speedup']:.2f}x fp32" if name == "bf16" else ""),
        )
    o = r.get("omp_wait_policy")
    if o:
        table.section(f"8. OpenMP wait policy (child processes, {o['repeats']} each; batch {o['batch_size']})")
        for name, v in o["policies"].items():
            table.row(
                name, f"{v['images_per_s']:.2f} img/s", f"batch-1 reconstruction {v['reconstruction_batch1_ms']:.0f} ms"
            )
        table.row("PASSIVE vs unset", f"{o['passive_train_speedup']:.2f}x", "training")
    c = r["compile"]
    if "vqvae" in c:
        table.section("9. torch.compile (inductor) vs eager, same step, interleaved")
        for name, unit in (("vqvae", "img/s"), ("prior", "maps/s")):
            v = c[name]
            table.row(
                f"{name} compiled",
                f"{v['items_per_s_compiled']:.2f} {unit}",
                f"{v['speedup']:.2f}x eager; first call {v['first_call_s']:.1f} s, pays off after "
                + (f"{v['break_even_steps']:.0f} steps" if v["break_even_steps"] else "never"),
            )
    else:
        table.section(f"9. torch.compile skipped: {c.get('skipped')}")
    q = r["quantizer"]
    table.section(f"11. vector quantiser, training mode, input {q['input_shape']}, {q['num_embeddings']} codes")
    table.row(
        "bundle vs MONAI",
        f"{q['bundle_ms']:.1f} vs {q['monai_ms']:.1f} ms",
        f"{q['speedup']:.2f}x, same codes: {q['same_codes']}",
    )
    m = r["memorisation_ssim"]
    table.section(f"12. memorisation SSIM, {m['samples']} samples x {m['references']} references {m['image_size']}")
    table.row(
        "bundle vs MONAI function",
        f"{m['bundle_s']:.2f} vs {m['monai_s']:.2f} s",
        f"{m['speedup']:.2f}x, largest difference {m['max_abs_difference']:.1e}",
    )


def table_epochs(table: Table, tt: dict) -> None:
    """Section 10."""
    table.section("10. training time per epoch at the demo's defaults, eager (SCALED from timed iterations)")
    for name, v in (("stage 1 (VQ-VAE-2)", tt["stage1"]), ("stage 2 (priors)", tt["stage2"])):
        compiled = v["epoch_s_compiled_estimate"]
        once_s = ", ".join(f"{k} {s:.0f} s" for k, s in v["once_per_run_s"].items())
        table.row(
            name,
            f"{v['epoch_s']:.0f} s/epoch",
            f"{v['iterations_per_epoch']} x {v['iteration_s']:.2f} s + validation {v['validation_s']:.1f} s"
            + (f"; compiled ~{compiled:.0f} s (estimate)" if compiled else "")
            + f"; once per run: {once_s}",
        )


if __name__ == "__main__":
    main()
