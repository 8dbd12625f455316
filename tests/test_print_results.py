"""``scripts/print_results.py``: the demo's headline figures, and a line naming each metrics file that is missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("print_results", ROOT / "scripts" / "print_results.py")
print_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(print_results)

RECONSTRUCTION = {"ssim": 0.8104, "psnr": 28.137, "ms_ssim": 0.9631, "n_images": 128}
GENERATION = {
    "nll_bits_top": 3.9563,
    "nll_bits_bottom": 2.6191,
    "fid": 0.1924,
    "fid_real_baseline": 0.0475,
    "num_samples": 48,
    "c2st_accuracy": 0.625,
    "c2st_accuracy_real_baseline": 0.5,
    "precision": 0.25,
    "recall": 0.5625,
    "precision_real_baseline": 0.8958,
    "recall_real_baseline": 0.625,
}

DENSITY = {"density": 0.2153, "coverage": 0.1875, "density_real_baseline": 0.6528, "coverage_real_baseline": 0.5}
RECONSTRUCTED_DENSITY = {"density_reconstruction_baseline": 0.6597, "coverage_reconstruction_baseline": 0.5208}


def test_both_reports_give_every_figure_beside_its_reference(tmp_path: Path) -> None:
    (tmp_path / "reconstruction_metrics.json").write_text(json.dumps(RECONSTRUCTION))
    (tmp_path / "generation_metrics.json").write_text(json.dumps(GENERATION))
    lines = print_results.summary(tmp_path)
    assert lines[0] == "Test reconstruction: SSIM 0.810, PSNR 28.14 dB, MS-SSIM 0.963 on 128 slices"
    assert "FID 0.192 (real-vs-real 0.048) on 48 samples" in lines
    assert "Precision 0.250, recall 0.562 (real-vs-real 0.896, 0.625)" in lines
    assert not any(line.startswith("No ") for line in lines)


def test_the_reconstruction_reference_is_printed_when_the_report_has_it(tmp_path: Path) -> None:
    extra = {"c2st_accuracy_reconstruction_baseline": 0.531, "precision_reconstruction_baseline": 0.2109}
    (tmp_path / "generation_metrics.json").write_text(json.dumps({**GENERATION, **extra}))
    lines = print_results.generation_lines(json.loads((tmp_path / "generation_metrics.json").read_text()))
    assert "Precision 0.250, recall 0.562 (real-vs-real 0.896, 0.625)" in lines  # recall's reference is missing
    assert (
        "Classifier two-sample accuracy 0.625 (real-vs-real 0.500; reconstructed-vs-real 0.531; "
        "0.5 = indistinguishable)" in lines
    )
    lines = print_results.generation_lines({**GENERATION, **extra, "recall_reconstruction_baseline": 0.5625})
    assert "Precision 0.250, recall 0.562 (real-vs-real 0.896, 0.625; reconstructed-vs-real 0.211, 0.562)" in lines


def test_density_and_coverage_follow_precision_when_the_report_has_them() -> None:
    lines = print_results.generation_lines({**GENERATION, **DENSITY})
    assert lines[-1] == "Density 0.215, coverage 0.188 (real-vs-real 0.653, 0.500)"
    lines = print_results.generation_lines({**GENERATION, **DENSITY, **RECONSTRUCTED_DENSITY})
    assert lines[-1] == "Density 0.215, coverage 0.188 (real-vs-real 0.653, 0.500; reconstructed-vs-real 0.660, 0.521)"
    assert not any(line.startswith("Density") for line in print_results.generation_lines(GENERATION))


def test_a_missing_report_is_named_with_the_workflow_that_writes_it(tmp_path: Path) -> None:
    (tmp_path / "generation_metrics.json").write_text(json.dumps(GENERATION))
    lines = print_results.summary(tmp_path)
    assert (
        lines[0]
        == f"No {tmp_path / 'reconstruction_metrics.json'}: the 'evaluating' run with configs/evaluate.json writes it"
    )
    assert "Prior NLL: top 3.956, bottom 2.619 bits/code" in lines and len(lines) == 5
    assert len(print_results.summary(tmp_path / "empty")) == 2


def test_the_epochs_each_stage_trained_come_first(tmp_path: Path) -> None:
    prior = tmp_path / "checkpoints" / "prior"
    prior.mkdir(parents=True)
    for path in (tmp_path / "checkpoints" / "checkpoint_epoch=17.pt", prior / "checkpoint_epoch=12.pt"):
        path.write_bytes(b"")
    assert print_results.summary(tmp_path)[0] == "Epochs trained: stage 1 17, stage 2 12"
    (prior / "checkpoint_epoch=12.pt").unlink()
    assert print_results.summary(tmp_path)[0] == "Epochs trained: stage 1 17"


def test_the_real_top_reference_follows_the_reconstruction_reference() -> None:
    real_top = {"density_real_top_baseline": 0.5903, "coverage_real_top_baseline": 0.4375}
    lines = print_results.generation_lines({**GENERATION, **DENSITY, **RECONSTRUCTED_DENSITY, **real_top})
    assert lines[-1] == (
        "Density 0.215, coverage 0.188 (real-vs-real 0.653, 0.500; reconstructed-vs-real 0.660, 0.521; "
        "real-top-vs-real 0.590, 0.438)"
    )
