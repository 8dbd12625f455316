"""Smoke test of scripts/benchmark.py --quick: it runs end to end and its JSON is complete and sane.

No timing thresholds: the machine may be shared. Only structure, finiteness and coarse sanity (ratios within
an order of magnitude of 1, fractions of peak at most 1.2, exact and faster fast sampling) are checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("benchmark") / "benchmark.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    command = [sys.executable, "scripts/benchmark.py", "--quick", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    assert "ratio trainer / plain" in result.stdout  # the table was printed
    return json.loads(Path(out).read_text())


def test_machine_and_versions_are_recorded(report: dict) -> None:
    machine = report["machine"]
    for key in ("cpu", "cpu_cores", "torch_threads", "gpu", "device", "torch", "monai", "ignite", "python"):
        assert key in machine, key
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["torch"] and machine["monai"]
    assert report["quick"] is True and len(machine["load_average_start"]) == 3


def test_trainer_vs_plain_loop(report: dict) -> None:
    t = report["trainer_vs_plain"]
    for key in ("trainer_images_per_s", "plain_loop_images_per_s", "plain_loop_preloaded_images_per_s", "ratio",
                "ratio_paired_median"):
        assert _finite_positive(t[key]), (key, t[key])
    assert 0.3 <= t["ratio"] <= 3.0 and 0.3 <= t["ratio_paired_median"] <= 3.0
    assert t["trainer_iterations_timed"] >= 1 and t["target"] == 0.95
    assert t["ratio"] == pytest.approx(t["trainer_images_per_s"] / t["plain_loop_images_per_s"])


def test_flops_peak_and_precision_variants(report: dict) -> None:
    peak = report["peak_matmul"]
    assert _finite_positive(peak["fp32_gflops"]) and _finite_positive(peak["bf16_gflops"])
    flops = report["vqvae_flops"]
    assert _finite_positive(flops["per_step_fp32"]) and _finite_positive(flops["per_image"])
    # autocast and memory format change the kernels, not the arithmetic
    assert flops["per_step_bf16_channels_last"] == pytest.approx(flops["per_step_fp32"], rel=0.05)
    variants = report["vqvae_train_step"]
    assert set(variants) == {"fp32", "bf16", "channels_last", "bf16_channels_last"}
    for name, v in variants.items():
        assert _finite_positive(v["images_per_s"]) and _finite_positive(v["achieved_gflops"]), name
        assert 0.0 < v["fraction_of_peak"] <= 1.2, (name, v["fraction_of_peak"])
    for name, ratio in report["vqvae_speedup_vs_fp32"].items():
        assert 0.3 <= ratio <= 3.0, (name, ratio)


def test_data_pipeline_keeps_up_with_the_trainer(report: dict) -> None:
    data = report["data_pipeline"]
    assert _finite_positive(data["images_per_s"]) and data["cached_images"] > 0
    # the loader is tens of times faster than a training step; > 1 only says it is not the bottleneck
    assert data["headroom_vs_trainer"] > 1.0


def test_prior_training_step(report: dict) -> None:
    prior = report["prior_train_step"]
    assert _finite_positive(prior["flops_per_step"])
    for name in ("fp32", "bf16"):
        assert _finite_positive(prior[name]["maps_per_s"]) and 0.0 < prior[name]["fraction_of_peak"] <= 1.2
    assert 0.3 <= prior["bf16_speedup"] <= 3.0


def test_inference(report: dict) -> None:
    inference = report["inference"]
    for name in ("reconstruction", "encode"):
        for batch in (1, 16):
            assert _finite_positive(inference[f"{name}_batch{batch}_ms_per_slice"]), (name, batch)
    assert 0.0 <= inference["bf16_channels_last_code_agreement"] <= 1.0


def test_sampling_fast_is_exact_and_faster(report: dict) -> None:
    sampling = report["sampling"]
    assert sampling["fast_equals_naive"] is True
    for key in ("naive_s_per_batch", "fast_s_per_batch", "decode_s_per_batch"):
        assert _finite_positive(sampling[key]), key
    assert sampling["fast_s_per_batch"] < sampling["naive_s_per_batch"]
    assert sampling["fast_slices_s_per_batch"] < sampling["naive_slices_s_per_batch"]


def test_openmp_probe(report: dict) -> None:
    omp = report["omp_wait_policy"]
    assert omp is not None and len(omp["policies"]) == 3
    for v in omp["policies"].values():
        assert _finite_positive(v["images_per_s"]) and _finite_positive(v["reconstruction_batch1_ms"])
    assert _finite_positive(omp["passive_train_speedup"]) and _finite_positive(omp["one_thread_train_speedup"])


def test_compile_section(report: dict) -> None:
    compiled = report["compile"]
    assert compiled["backend"] == "inductor" and compiled["inductor_cache"].startswith("cold")
    for name in ("vqvae", "prior"):
        v = compiled[name]
        assert _finite_positive(v["items_per_s_compiled"]) and _finite_positive(v["items_per_s_eager"]), name
        assert 0.3 <= v["speedup"] <= 3.0, (name, v["speedup"])
        assert v["speedup"] == pytest.approx(v["eager_step_s"] / v["compiled_step_s"])
        # the first call compiles, so it is slower than a steady compiled step
        assert v["first_call_s"] > v["compiled_step_s"] and v["n"] >= 1


def test_width_sweep_end_to_end(phantom_dir: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import width_sweep

    assert width_sweep.parse_width("64,128:32") == ([64, 128], [32, 32])
    assert width_sweep.parse_width("48,96") == ([48, 96], [24, 24])
    out = tmp_path / "sweep.json"
    # target -1: each width stops after its first epoch and is evaluated once, which exercises the whole path
    command = [sys.executable, "scripts/width_sweep.py", "--widths", "8,16:8", "16,32:8", "--target", "-1",
               "--max_minutes", "5", "--dataset_dir", str(phantom_dir), "--work_dir", str(tmp_path / "work"),
               "--override", "num_embeddings", "32", "--override", "embedding_dim", "8", "--json", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["width"] for r in rows] == ["8,16:8", "16,32:8"]
    for r in rows:
        assert r["status"] == "reached" and r["test_target_epoch"] == 1, r
        assert _finite_positive(r["time_to_test_target_s"]) and _finite_positive(r["tflop_to_test_target"])
        assert r["training_images"] == 18 and -1.0 <= r["test_ssim"] <= 1.0
        assert r["tflop_to_test_target"] == pytest.approx(18 * r["gflop_per_image"] / 1e3)
    # compute grows with width
    assert rows[0]["gflop_per_image"] < rows[1]["gflop_per_image"] and rows[0]["parameters"] < rows[1]["parameters"]
    assert "TFLOP" in result.stdout
