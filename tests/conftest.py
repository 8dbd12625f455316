"""Shared fixtures: tiny phantom data sets and a runner for ``python -m monai.bundle``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from monai.bundle import ConfigParser
    from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Idle OpenMP threads sleep instead of spinning, here and in every run a test starts: the test workers share the
# cores, and spinning threads wait whole time slices for each other on a busy CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # pytest.ini runs the tests on two workers: each computes on its share of the cores
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

# Small enough for a 2-core CPU, large enough to exercise every code path. Eager: compiling a network that trains
# for seconds costs more than it saves; tests/test_compile.py covers the compiled trainer.
TINY_NETWORK = [
    "--channels",
    "[16, 32]",
    "--num_res_channels",
    "[16, 16]",
    "--num_embeddings",
    "64",
    "--embedding_dim",
    "16",
    "--compile",
    "False",
]
# The top prior still covers the whole 16 x 8 top map (7 layers of kernel 5), as TwoLevelPrior requires.
TINY_PRIOR = [
    "--prior_channels",
    "16",
    "--prior_layers",
    "[7, 3]",
    "--prior_head_channels",
    "32",
    "--prior_cond_channels",
    "8",
    "--prior_cond_blocks",
    "1",
]


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HipMRI-layout phantom set shared by the whole session (read-only by convention)."""
    from bundle.data.phantom import write_hipmri_phantoms

    root = tmp_path_factory.mktemp("phantom")
    write_hipmri_phantoms(root, train_cases=3, val_cases=1, test_cases=1, slices_per_case=6, trailing_axis_every=5)
    return root


def config_list(configs: str) -> str:
    """``"a.json,b.json"`` as the list literal MONAI's runner takes for layered configs: ``"['a.json', 'b.json']"``."""
    return str(configs.split(","))


def run_bundle(run_id: str, config: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m monai.bundle run`` from the bundle root; fails the test with the log on a non-zero exit.

    ``config`` is one config file or several, comma-separated, layered in that order (given to MONAI as a list).
    """
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        config_list(config),
        *map(str, args),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, phantom_dir: Path) -> dict:
    """Both stages of a tiny bundle trained through MONAI's runner: 2 epochs, then the same command re-run with
    ``--max_epochs 3`` (a resume). Shared by the workflow, anomaly and reliability tests; copy ``models`` before
    writing to it (:func:`copy_models`)."""
    out = tmp_path_factory.mktemp("tiny_bundle")
    common = [
        "--dataset_dir",
        phantom_dir,
        "--output_dir",
        out / "outputs",
        "--ckpt_dir",
        out / "models",
        "--batch_size",
        4,
        "--prior_max_epochs",
        2,
        *TINY_NETWORK,
        *TINY_PRIOR,
    ]
    configs = "configs/inference.json,configs/train_vqvae.json,configs/train_prior.json"
    first = run_bundle("training", configs, "--max_epochs", 2, *common)
    second = run_bundle("training", configs, "--max_epochs", 3, *common)
    return {"out": out, "first": first, "second": second}


def copy_models(bundle: dict, destination: Path) -> Path:
    """A private copy of a trained bundle's ``models`` folder under ``destination``; returns ``destination``."""
    shutil.copytree(bundle["out"] / "models", destination / "models")
    return destination


def save_untrained_models(parser: ConfigParser, folder: Path) -> None:
    """Untrained VQ-VAE-2 and prior of ``parser``'s configs (seed 0) saved as ``folder/model.pt`` and ``prior.pt``."""
    import torch

    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "model.pt")
    torch.save(parser.get_parsed_content("prior_def").state_dict(), folder / "prior.pt")


def write_sample_folder(folder: Path, images: Tensor) -> str:
    """``images`` ``[N, 1, H, W]`` as ``folder/sample_000.nii.gz``..., float32, as the sampling workflow names them."""
    import nibabel as nib
    import numpy as np

    folder.mkdir()
    for k, image in enumerate(images):
        nib.save(nib.Nifti1Image(image[0].numpy().astype(np.float32), np.eye(4)), folder / f"sample_{k:03d}.nii.gz")
    return str(folder)
