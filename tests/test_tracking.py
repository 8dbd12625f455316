"""MLflow tracking through MONAI's own ``--tracking`` option, with a local SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_NETWORK, run_bundle

pytestmark = pytest.mark.slow


def test_mlflow_tracking_records_losses_metrics_and_codebook(tmp_path: Path, phantom_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_bundle(
        "training",
        "configs/inference.json,configs/train_vqvae.json",
        "--dataset_dir",
        phantom_dir,
        "--output_dir",
        tmp_path,
        "--ckpt_dir",
        tmp_path / "models",
        "--batch_size",
        4,
        "--max_epochs",
        2,
        *TINY_NETWORK,
        "--tracking",
        "configs/mlflow.json",
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("pelvic_mri_vqvae")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 1 and all(run.info.status == "FINISHED" for run in runs)
    metrics = set().union(*(run.data.metrics for run in runs))
    assert {"train_loss", "val_ssim", "val_psnr", "codebook_top_usage", "codebook_bottom_perplexity"} <= metrics
    history = client.get_metric_history(runs[0].info.run_id, "val_ssim") or client.get_metric_history(
        runs[-1].info.run_id, "val_ssim"
    )
    assert [m.step for m in history] == [1, 2] and all(-1.0 <= m.value <= 1.0 for m in history)
