"""Smoke tests of the benchmark scripts: ``scripts/benchmark.py --quick --tiny`` runs end to end and its JSON is
complete and sane; the samplers' comparison of ``scripts/benchmark_sampling.py``; the OpenMP probe's child; the
width sweep through ``scripts/time_to_quality.py``.

No timing thresholds: the machine may be shared. Only structure, finiteness and coarse sanity (ratios within an
order of magnitude of 1, fractions of peak at most 1.2, identical codes from both samplers, faster fast sampling,
epoch figures that add up) are checked. Compiling takes minutes on a CPU, so section 9 is skipped here
(``tests/test_compile.py`` covers the compiled trainer).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

pytestmark = pytest.mark.slow

DEMO_TRAINING_IMAGES = 320  # scripts/make_phantoms.py's default set: 20 cases of 16 slices


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("benchmark") / "benchmark.json"
    args = ["scripts/benchmark.py", "--quick", "--tiny", "--no_compile", "--no_omp_probe", "--json", str(out)]
    result = _run(*args)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    assert "ratio trainer / plain" in result.stdout and "16 slices, generate()" in result.stdout  # the table
    text = out.read_text()
    assert text == json.dumps(json.loads(text), indent=4) + "\n"  # docs/*.json format
    return json.loads(text)


def test_machine_and_versions_are_recorded(report: dict) -> None:
    machine = report["machine"]
    for key in ("cpu", "cpu_cores", "torch_threads", "gpu", "device", "torch", "monai", "ignite", "python"):
        assert key in machine, key
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["torch"] and machine["monai"]
    assert report["quick"] is True and report["tiny"] is True
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3


def test_trainer_vs_plain_loop(report: dict) -> None:
    t = report["trainer_vs_plain"]
    for key in (
        "trainer_images_per_s",
        "plain_loop_images_per_s",
        "plain_loop_preloaded_images_per_s",
        "ratio",
        "ratio_paired_median",
    ):
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
        assert 0.2 <= ratio <= 5.0, (name, ratio)


def test_data_pipeline_keeps_up_with_the_trainer(report: dict) -> None:
    data = report["data_pipeline"]
    assert (
        _finite_positive(data["images_per_s"])
        and data["cached_images"] == report["settings"]["phantom_images"]["train"]
    )
    # the loader is tens of times faster than a training step; > 1 only says it is not the bottleneck
    assert data["headroom_vs_trainer"] > 1.0


def test_prior_training_step(report: dict) -> None:
    prior = report["prior_train_step"]
    assert _finite_positive(prior["flops_per_step"])
    assert prior["latent_shapes"] == report["settings"]["latent_shapes"] == [[16, 8], [64, 32]]
    for name in ("fp32", "bf16"):
        assert _finite_positive(prior[name]["maps_per_s"]) and 0.0 < prior[name]["fraction_of_peak"] <= 1.2
    assert 0.2 <= prior["bf16_speedup"] <= 5.0


def test_inference(report: dict) -> None:
    inference = report["inference"]
    for name in ("reconstruction", "encode", "reconstruction_bf16_channels_last", "encode_bf16_channels_last"):
        for batch in (1, 16):
            assert _finite_positive(inference[f"{name}_batch{batch}_ms_per_slice"]), (name, batch)
    agreement = inference["bf16_channels_last_code_agreement"]
    assert set(agreement) == {"top", "bottom"} and all(0.0 <= v <= 1.0 for v in agreement.values())


def test_quantiser_against_monai(report: dict) -> None:
    quantizer = report["quantizer"]
    assert _finite_positive(quantizer["bundle_ms"]) and _finite_positive(quantizer["monai_ms"])
    assert quantizer["speedup"] == pytest.approx(quantizer["monai_ms"] / quantizer["bundle_ms"])
    assert quantizer["input_shape"][2:] == report["settings"]["latent_shapes"][1] and quantizer["same_codes"] is True
    memorisation = report["memorisation_ssim"]
    assert _finite_positive(memorisation["bundle_s"]) and _finite_positive(memorisation["monai_s"])
    assert memorisation["speedup"] == pytest.approx(memorisation["monai_s"] / memorisation["bundle_s"])
    assert memorisation["image_size"] == report["settings"]["image_size"] and memorisation["samples"] == 16
    assert memorisation["max_abs_difference"] < 1e-5  # the same SSIM values


def test_sampling_each_level_fast_is_exact_and_faster(report: dict) -> None:
    sampling = report["sampling"]
    assert sampling["num_samples"] == 16 and sampling["latent_shapes"] == report["settings"]["latent_shapes"]
    assert set(sampling["levels"]) == {"top", "bottom"}
    for level, shape in zip(("top", "bottom"), sampling["latent_shapes"]):
        v = sampling["levels"][level]
        assert v["shape"] == shape and v["conditioned_on_top_codes"] is (level == "bottom")
        assert v["fast_equals_naive"] is True, level
        positions = shape[0] * shape[1]
        # extrapolated from a few positions, or measured to the end
        assert v["naive_measured_positions"] == (3 if v["naive_extrapolated"] else positions), level
        for key in ("forward_pass_s", "fast_s", "naive_s", "naive_s_per_position_median"):
            assert _finite_positive(v[key]), (level, key)
        assert v["fast_s"] < v["naive_s"] and v["speedup"] == pytest.approx(v["naive_s"] / v["fast_s"])
    assert sampling["fast_equals_naive"] is True and sampling["small"]["fast_equals_naive"] is True
    assert sampling["fast_slices_s"] < sampling["naive_slices_s"] and _finite_positive(sampling["decode_s"])
    generated = sampling["generate"]
    assert generated["num_slices"] == 16 and _finite_positive(generated["seconds"])
    assert generated["seconds_per_slice"] == pytest.approx(generated["seconds"] / 16)


def test_training_time_per_epoch_of_each_stage(report: dict) -> None:
    stages = report["training_time"]
    for stage, batch_key in (("stage1", "batch_size"), ("stage2", "prior_batch_size")):
        v = stages[stage]
        batch = report["settings"][batch_key]
        assert v["training_images"] == DEMO_TRAINING_IMAGES and v["batch_size"] == batch
        assert v["iterations_per_epoch"] == DEMO_TRAINING_IMAGES // batch  # the loaders drop the last batch
        assert _finite_positive(v["iteration_s"]) and _finite_positive(v["validation_s"]), stage
        assert v["epoch_s"] > v["iterations_per_epoch"] * v["iteration_s"] + v["validation_s"] * 0.99, stage
        assert v["compile"] is False and v["epoch_s_compiled_estimate"] is None  # --no_compile: no estimate
        assert all(_finite_positive(s) for s in v["once_per_run_s"].values()) and v["once_per_run_s"], stage
    assert _finite_positive(stages["stage2"]["sample_grid_s"]) and stages["stage2"]["iterations_timed"] >= 1


def test_skipped_sections_say_so(report: dict) -> None:
    assert report["compile"] == {"skipped": "--no_compile"} and report["omp_wait_policy"] is None


def test_openmp_probe_child(monkeypatch: pytest.MonkeyPatch) -> None:
    # set, so that importing the script leaves this process's environment alone
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    import benchmark

    child = benchmark.omp_probe_child(2, benchmark.parse_args(["--tiny"]))
    json.dumps(child)  # what the child prints for its parent
    assert child["images_per_s"] == pytest.approx(2 / child["train_step_s"])
    assert _finite_positive(child["reconstruction_batch1_ms"]) and _finite_positive(child["train_step_s"])


def test_compare_level_measures_or_extrapolates_and_checks_codes() -> None:
    import benchmark_sampling

    from bundle.stage2_prior.pixelcnn import GatedPixelCNN

    torch.manual_seed(0)
    top = GatedPixelCNN(8, channels=8, num_layers=3, kernel_size=3, head_channels=8).eval()
    bottom = GatedPixelCNN(8, 8, 2, 3, head_channels=8, cond_embeddings=8, cond_channels=4, cond_blocks=1).eval()
    full, top_codes = benchmark_sampling.compare_level(top, (3, 4), 2, naive_budget_s=1e9)
    assert not full["naive_extrapolated"] and full["naive_measured_positions"] == 12
    assert full["fast_equals_naive"] is True and full["naive_s"] == full["naive_measured_s"]
    assert top_codes.shape == (2, 3, 4) and top_codes.dtype == torch.int64
    part, bottom_codes = benchmark_sampling.compare_level(
        bottom, (6, 8), 2, cond_codes=top_codes, naive_positions=5, naive_budget_s=0.0
    )
    assert part["naive_extrapolated"] and part["naive_measured_positions"] == 5 and part["conditioned_on_top_codes"]
    assert part["fast_equals_naive"] is True and bottom_codes.shape == (2, 6, 8)
    assert part["naive_s"] == pytest.approx(part["naive_s_per_position_median"] * 48)
    small = benchmark_sampling.compare_two_level(torch.nn.ModuleDict({"top": top, "bottom": bottom}), (3, 4), (6, 8), 2)
    assert small["fast_equals_naive"] is True and _finite_positive(small["speedup_measured"])


def test_width_sweep_end_to_end(phantom_dir: Path, tmp_path: Path) -> None:
    import width_sweep

    assert width_sweep.parse_width("64,128:32") == ([64, 128], [32, 32])
    assert width_sweep.parse_width("48,96") == ([48, 96], [24, 24])
    out = tmp_path / "sweep.json"
    # target -1: the width stops after its first epoch and is evaluated once, which exercises the whole path
    args = [
        "scripts/width_sweep.py",
        "--widths",
        "8,16:8",
        "--target",
        "-1",
        "--max_minutes",
        "5",
        "--dataset_dir",
        str(phantom_dir),
        "--work_dir",
        str(tmp_path / "work"),
        "--override",
        "num_embeddings",
        "32",
        "--override",
        "embedding_dim",
        "8",
        "--override",
        "compile",
        "False",
        "--json",
        str(out),
    ]
    result = _run(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["width"] for r in rows] == ["8,16:8"]
    for r in rows:
        assert r["status"] == "reached" and r["test_target_epoch"] == 1, r
        assert _finite_positive(r["time_to_test_target_s"]) and _finite_positive(r["tflop_to_test_target"])
        assert r["training_images"] == 18 and -1.0 <= r["test_ssim"] <= 1.0
        assert r["tflop_to_test_target"] == pytest.approx(18 * r["gflop_per_image"] / 1e3)
        # both codebooks' usage was read from the training log
        usage = r["codebook_usage"]
        assert set(usage) == {"codebook_top_usage", "codebook_bottom_usage"} and all(0 < u <= 1 for u in usage.values())
    assert "TFLOP" in result.stdout
    # compute grows with width (one training run above is enough for the path; the cost alone for a second width)
    wider = width_sweep.cost(*width_sweep.parse_width("16,32:8"))
    assert rows[0]["gflop_per_image"] < wider["gflop_per_image"] and rows[0]["parameters"] < wider["parameters"]
