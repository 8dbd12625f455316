"""MONAI Label integration: BundleInferTask on configs/inference.json, and the app in apps/monailabel served.

MONAI Label lives in its own environment (``bash scripts/setup_monailabel.sh`` makes ``.venv-monailabel``), so
this test prepares everything here (bundle copies with weights, studies) and runs tests/monailabel_client.py
there; then it checks the NIfTI files that came back, and the statuses and messages of the requests the app
must refuse. Nothing is written into the repository: the app, the studies and the bundle are copies under a
temporary directory (MONAI Label writes into its app and studies folders). The weights are untrained (random)
networks built from configs/inference.json: this checks the plumbing (loading, geometry, value range), not image
quality.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow

VENV_PYTHON = ROOT / ".venv-monailabel" / "bin" / "python"

# Network sizes of the weights the app serves (and the app's --conf overrides): small, and other than the
# defaults, so that serving them proves the overrides reach both tasks.
TINY = {
    "channels": [16, 32],
    "num_res_channels": [16, 16],
    "num_embeddings": 64,
    "embedding_dim": 16,
    "prior_channels": 16,
    "prior_layers": [7, 3],
    "prior_cond_channels": 8,
    "prior_cond_blocks": 1,
    "prior_head_channels": 32,
}

# Two request images with non-trivial geometry: a 256 x 128 slice, and a 256 x 144 one stored with a trailing
# singleton axis, rotated in-plane, with another intensity scale.
ROTATION = 0.3
STUDIES = {
    "slice_a": {
        "case": 1,
        "index": 5,
        "width": 128,
        "trailing": False,
        "scale": 1.0,
        "affine": [[0.9, 0, 0, -100], [0, 1.1, 0, -80], [0, 0, 3, 12], [0, 0, 0, 1]],
    },
    "slice_b": {
        "case": 2,
        "index": 8,
        "width": 144,
        "trailing": True,
        "scale": 1000.0,
        "affine": [
            [0.8 * np.cos(ROTATION), -1.2 * np.sin(ROTATION), 0, 10],
            [0.8 * np.sin(ROTATION), 1.2 * np.cos(ROTATION), 0, -20],
            [0, 0, 2.5, 33],
            [0, 0, 0, 1],
        ],
    },
}


def _copy_bundle(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("configs", "bundle"):
        shutil.copytree(ROOT / folder, target / folder, ignore=ignore)
    return target


def _save_weights(bundle_dir: Path, overrides: dict) -> None:
    """Untrained networks as configs/inference.json builds them (with ``overrides``), in the bundle's layout, and
    the anomaly threshold calibrated for them (the 0.9 quantile of the NLL of phantom slices' codes)."""
    from monai.bundle import ConfigParser

    from bundle.anomaly.threshold import calibrate, save_calibration
    from bundle.data.phantom import phantom_slice

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser.update(overrides)
    torch.manual_seed(0)
    (bundle_dir / "models" / "prior").mkdir(parents=True)
    vqvae, prior = parser.get_parsed_content("network_def").eval(), parser.get_parsed_content("prior_def").eval()
    weights = [bundle_dir / "models" / "model.pt", bundle_dir / "models" / "prior" / "prior.pt"]
    torch.save(vqvae.state_dict(), weights[0])
    torch.save(prior.state_dict(), weights[1])
    slices = torch.stack([torch.from_numpy(phantom_slice(3, index, 16, 128, 0)[0]) for index in (4, 8, 12)])
    with torch.no_grad():
        top, bottom = vqvae.index_quantize((slices / slices.amax(dim=(1, 2), keepdim=True))[:, None])
    calibration = calibrate(prior, {"top": top, "bottom": bottom}, quantile=0.9)
    save_calibration(bundle_dir / "models" / "anomaly_threshold.json", calibration, weights)


def _write_studies(folder: Path) -> None:
    from bundle.data.phantom import phantom_slice

    folder.mkdir()
    for name, spec in STUDIES.items():
        image, _ = phantom_slice(spec["case"], spec["index"], 16, spec["width"], 0)
        image = image.astype(np.float32) * spec["scale"]
        if spec["trailing"]:
            image = image[..., None]
        nib.save(nib.Nifti1Image(image, np.asarray(spec["affine"], dtype=np.float64)), folder / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not VENV_PYTHON.is_file():
        pytest.fail(
            f"{VENV_PYTHON.parent.parent} is missing: MONAI Label needs its own environment. "
            "Create it with: bash scripts/setup_monailabel.sh"
        )
    tmp = tmp_path_factory.mktemp("monailabel")
    app = tmp / "app"
    shutil.copytree(
        ROOT / "apps" / "monailabel", app, ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin", ".env")
    )
    _save_weights(_copy_bundle(tmp / "bundle"), TINY)
    default = _copy_bundle(tmp / "bundle_default")
    _save_weights(default, {})
    extra = torch.load(default / "models" / "model.pt", weights_only=True)
    extra["not_in_the_network"] = torch.zeros(1)
    torch.save(extra, default / "models" / "model_extra_key.pt")
    _write_studies(tmp / "studies")
    secret = tmp / "outside" / "secret.nii.gz"  # readable by the server, but not in its datastore
    secret.parent.mkdir()
    shutil.copyfile(tmp / "studies" / "slice_b.nii.gz", secret)
    (tmp / "tmpdir").mkdir()
    out = tmp / "out"
    options = {
        "--app": app,
        "--studies": tmp / "studies",
        "--bundle": tmp / "bundle",
        "--overrides": json.dumps(TINY),
        "--default-bundle": tmp / "bundle_default",
        "--secret": secret,
        "--out": out,
    }
    command = [str(VENV_PYTHON), str(ROOT / "tests" / "monailabel_client.py")]
    command += [str(item) for option in options.items() for item in option]
    # TMPDIR: a private temporary folder, so that what refused uploads leave behind is visible.
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env["TMPDIR"] = str(tmp / "tmpdir")
    env.pop("PYTHONPATH", None)  # nothing from .venv's path may leak into .venv-monailabel
    result = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300, env=env)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    summary = json.loads((out / "summary.json").read_text())
    return {"summary": summary, "studies": tmp / "studies", "app": app, "root": tmp}


def _load(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    image = nib.load(path)
    return np.asarray(image.get_fdata(dtype=np.float32)), image.affine, image.shape


def _check_like_input(result: str | Path, study: Path) -> np.ndarray:
    data, affine, shape = _load(result)
    source = nib.load(study)
    assert shape == source.shape, f"{result}: shape {shape} != input {source.shape}"
    np.testing.assert_allclose(affine, source.affine, atol=1e-5, err_msg=f"{result}: affine differs from the input's")
    assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0, f"{result}: values outside [0, 1]"
    assert nib.load(result).get_data_dtype() == np.float32
    return data


def test_bundle_infer_task_loads_inference_json_strictly(served: dict) -> None:
    direct = served["summary"]["direct"]
    assert direct["plain_valid"]
    assert not direct["torchvision_left_in_sys_modules"], "the torchvision stand-in must not outlive the import"
    assert sorted(direct["plain"]) == ["slice_a.nii.gz", "slice_b.nii.gz"]
    for name, path in direct["plain"].items():
        data, _, shape = _load(path)
        size = (256, STUDIES[name.split(".")[0]]["width"])
        assert tuple(s for s in shape if s != 1) == size, f"{name}: {shape}"  # Invertd restored the input's size
        assert np.isfinite(data).all() and 0.0 <= data.min() and data.max() <= 1.0
    assert direct["model_filenames"] == ["model.pt", "model_extra_key.pt"]
    assert "Unexpected key(s)" in (direct["unexpected_key_error"] or ""), direct["unexpected_key_error"]
    assert "size mismatch" in (direct["size_mismatch_error"] or ""), direct["size_mismatch_error"]


def test_info_lists_every_model(served: dict) -> None:
    info = served["summary"]["server"]["info"]
    assert sorted(info["models"]) == ["anomaly", "generate", "reconstruct"]
    for model in info["models"].values():
        assert model["type"] == "others" and model["dimension"] == 2
    assert info["models"]["generate"]["config"]["seed"] == -1
    assert info["models"]["anomaly"]["config"]["result"] == "map"
    assert served["summary"]["server"]["images"] == ["slice_a", "slice_b"]
    assert served["summary"]["server"]["unknown_model_status"] >= 400


def test_reconstruct_and_generate_keep_the_input_geometry(served: dict) -> None:
    infer = served["summary"]["server"]["infer"]
    for name, spec in STUDIES.items():
        study = served["studies"] / f"{name}.nii.gz"
        reconstruction = _check_like_input(infer[f"reconstruct/{name}"]["file"], study)
        generated = _check_like_input(infer[f"generate/{name}"]["file"], study)
        assert not np.allclose(reconstruction, generated), f"{name}: generate returned the reconstruction"
        assert generated.std() > 0 and reconstruction.std() > 0
        if spec["width"] > 128:  # sampled at 256 x 128, padded back to the input's width with zeros
            margin = (spec["width"] - 128) // 2
            assert np.all(generated[:, :margin] == 0) and np.all(generated[:, -margin:] == 0)
    # the same seed gives the same slice; the slice does not depend on the request image's content
    a = _load(infer["generate/slice_a"]["file"])[0]
    b = _load(infer["generate/slice_b"]["file"])[0].reshape(256, 144)[:, 8:136]
    np.testing.assert_array_equal(a, b)


def test_anomaly_map_and_mask_keep_the_input_geometry(served: dict) -> None:
    infer = served["summary"]["server"]["infer"]
    for name in STUDIES:
        study = served["studies"] / f"{name}.nii.gz"
        anomaly_map = _check_like_input(infer[f"anomaly/{name}"]["file"], study)
        mask = _check_like_input(infer[f"anomaly_mask/{name}"]["file"], study)
        assert anomaly_map.max() > 0, f"{name}: no code above the threshold"
        np.testing.assert_array_equal(mask, (anomaly_map > 0.05).astype(np.float32))
        assert 0 < mask.sum() < mask.size
        # a threshold no code reaches: nothing is resampled, and the gated map is zero
        assert not _check_like_input(infer[f"anomaly_nothing_unlikely/{name}"]["file"], study).any()
    result = served["summary"]["server"]["anomaly_json"]
    assert result["result"] == "mask" and result["mask_threshold"] == 0.05
    stored = json.loads((served["root"] / "bundle" / "models" / "anomaly_threshold.json").read_text())
    assert result["thresholds_bits"] == [stored["top"], stored["bottom"]]
    assert 0 < result["resampled_fraction"] < 1 and 0 < result["mask_fraction"] <= result["resampled_fraction"]
    assert np.isfinite(result["score_bits"]) and result["score_bits"] > stored["bottom"]


def test_generate_reports_its_seed(served: dict) -> None:
    server = served["summary"]["server"]
    default_temperature = json.loads((ROOT / "configs" / "sample.json").read_text())["temperature"]
    assert server["generate_seed_7"]["seed"] == 7 and server["generate_seed_7"]["temperature"] == default_temperature
    assert isinstance(server["generate_random"]["seed"], int) and server["generate_random"]["seed"] >= 0


def _refused(answer: dict, status: int, *words: str) -> None:
    """``answer`` has HTTP ``status`` and a message that contains each of ``words``."""
    assert answer["status"] == status, answer
    assert isinstance(answer["detail"], str) and "Internal Server Error" not in answer["detail"], answer
    for word in words:
        assert word in answer["detail"], (word, answer)


@pytest.mark.parametrize("model", ["reconstruct", "generate", "anomaly"])
def test_infer_takes_only_datastore_ids(served: dict, model: str) -> None:
    infer = served["summary"]["server"]["safety"]["infer"]
    for case in ("absolute_outside", "absolute_in_studies", "etc_passwd", "relative_to_server_cwd", "dotdot"):
        _refused(infer[f"{model}/{case}"], 400, "is a path")
    _refused(infer[f"{model}/nul"], 400, "control character")
    _refused(infer[f"{model}/unknown"], 404, "no_such_slice", "not in the datastore")
    _refused(infer[f"{model}/params_image"], 400, "params may not set ['image']")
    _refused(infer[f"{model}/no_input"], 400, "no input image")
    _refused(infer[f"{model}/unknown_session"], 404, "no-such-session")
    _refused(infer[f"{model}/params_not_json"], 400, "params", "not valid JSON")


def test_infer_refuses_bad_model_and_params(served: dict) -> None:
    server = served["summary"]["server"]
    infer = server["safety"]["infer"]
    _refused(infer["reconstruct/model_filename"], 400, "model_filename", "model.pt")
    _refused(infer["generate/temperature"], 422, "temperature", "hot")
    _refused(infer["anomaly/result"], 422, "result", "heatmap")
    _refused(infer["anomaly/mask_threshold"], 422, "mask_threshold", ">= 0")
    _refused(infer["anomaly/threshold"], 422, "threshold", "high")
    _refused(infer["unknown_model"], 404, "segmentation", "anomaly", "generate", "reconstruct")
    assert server["unknown_model_status"] == 404


def test_datastore_uploads_stay_inside_the_studies(served: dict) -> None:
    safety = served["summary"]["server"]["safety"]
    put = safety["put"]
    _refused(put["dotdot"], 400, "'../../evil'", "path")
    _refused(put["absolute"], 400, "evil_absolute", "path")
    _refused(put["nul"], 400, "control character")
    _refused(put["dot"], 400, "relative folder")
    _refused(put["with_extension"], 400, "'x.nii.gz.nii.gz'", "reads back as another id")
    _refused(put["label_tag_dotdot"], 400, "label tag", "evil_tag")
    _refused(put["params_not_json"], 400, "params", "not valid JSON")
    _refused(put["label_of_unknown_image"], 404, "no_such_slice")
    _refused(put["delete_unknown"], 404, "no_such_slice")
    assert not any(safety["written"].values()), safety["written"]
    root = served["root"]
    assert not [p for p in root.parent.rglob("evil*")], "a refused upload was written"
    assert not any("evil" in name or "corrupt" in name for name in safety["studies_files"]), safety["studies_files"]
    assert not any("evil" in name or "corrupt" in name for name in safety["datastore_ids"]), safety["datastore_ids"]


@pytest.mark.parametrize("case", ["garbage", "truncated", "volume"])
def test_corrupt_uploads_are_refused_with_the_reason(served: dict, case: str) -> None:
    safety = served["summary"]["server"]["safety"]
    reason = {"garbage": "not a gzip file", "truncated": "OSError", "volume": "has spatial shape (32, 16, 4)"}[case]
    _refused(safety["put"][f"corrupt/{case}"], 422, "the uploaded image is not a readable 2D slice", reason)
    _refused(safety["infer"][f"corrupt/{case}"], 422, "the uploaded image is not a readable 2D slice", reason)


def test_uploads_of_another_format_and_leftovers(served: dict) -> None:
    safety = served["summary"]["server"]["safety"]
    _refused(safety["put"]["corrupt/other_format"], 400, "must end with one of the datastore's formats: .nii.gz")
    _refused(safety["infer"]["corrupt/other_format"], 422, "the uploaded image")
    assert safety["tmp_files_left_by_refused_requests"] == []


def test_server_side_failure_names_the_problem(served: dict) -> None:
    safety = served["summary"]["server"]["safety"]
    assert safety["server_error_put"]["status"] == 200
    _refused(safety["server_error"], 500, "decayed.nii.gz")


def test_valid_uploads_still_work(served: dict) -> None:
    safety = served["summary"]["server"]["safety"]
    valid = safety["valid"]
    assert valid["put"] == {"status": 200, "detail": None}
    assert "uploaded_ok.nii.gz" in safety["studies_files_after_valid_put"]
    for key in ("put_then_infer", "infer_upload"):
        assert valid[key]["status"] == 200, valid[key]
        _check_like_input(valid[key]["file"], served["studies"] / "slice_a.nii.gz")
