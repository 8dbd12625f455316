"""MONAI Label side of tests/test_monailabel.py; runs in .venv-monailabel (MONAI Label is not in .venv).

1. ``BundleInferTask`` itself (no app) on a bundle with default-size weights: ``configs/inference.json`` loads
   with ``load_strict=True`` and reconstructs; and on a bundle whose weights have other sizes it must refuse.
2. The app in ``--app`` served in-process through FastAPI's TestClient: ``GET /info/`` and
   ``POST /infer/{model}?image={id}`` for each study and every model (``anomaly`` as a map, as a mask, and with
   a threshold that no code reaches).
3. Requests the app must refuse (paths and unknown ids on ``/infer``, uploads whose id leaves the studies folder,
   corrupt uploads) and one that fails on the server's side, each with its status and message, and whether a
   file appeared where a refused request would have written it; then valid uploads, which must still work.

Every response body goes under ``--out`` with ``summary.json``; tests/test_monailabel.py checks them. Exits
non-zero (with the reason on stderr) when a request fails.

Usage::

    .venv-monailabel/bin/python tests/monailabel_client.py --app APP --studies DIR --bundle DIR \
        --overrides JSON --default-bundle DIR --secret FILE --out DIR
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# (result key, model, params) of the requests made for every study, and of those answered as JSON
INFER_REQUESTS = (
    ("reconstruct", "reconstruct", {}),
    ("generate", "generate", {"seed": 7, "temperature": 1.0}),
    ("anomaly", "anomaly", {}),
    ("anomaly_mask", "anomaly", {"result": "mask", "mask_threshold": 0.05}),
    ("anomaly_nothing_unlikely", "anomaly", {"threshold": 1e9}),
)
JSON_REQUESTS = (
    ("generate_seed_7", "generate", {"seed": 7}),
    ("generate_random", "generate", {}),
    ("anomaly_json", "anomaly", {"result": "mask", "mask_threshold": 0.05}),
)


def direct_bundle_infer_task(
    app_dir: str, default_bundle: str, tiny_bundle: str, studies: list[Path], out: Path
) -> dict:
    sys.path.insert(0, app_dir)  # lib.compat: BundleInferTask importable without torchvision
    from lib.compat import import_bundle_infer_task

    sys.path.remove(app_dir)
    bundle_infer_task = import_bundle_infer_task()
    result = {"torchvision_left_in_sys_modules": "torchvision" in sys.modules}

    # MONAI Label's own Restored step is left out (add_post_restore=False): with bundle/transforms.py storing
    # meta["spatial_shape"] as a torch tensor it fails in numpy (see apps/monailabel/README.md).
    task = bundle_infer_task(default_bundle, {}, load_strict=True, add_post_restore=False)
    result["plain_valid"] = task.is_valid()
    result["plain"] = {}
    for study in studies:
        label, params = task({"image": str(study)})
        target = out / f"plain_{study.name}"
        shutil.copyfile(label, target)
        os.remove(label)
        result["plain"][study.name] = str(target)

    # A weights file with a key the network lacks (MONAI Label offers every models/*.pt as "model_filename"):
    # the default load_strict=False would load it silently; load_strict=True must refuse it.
    result["model_filenames"] = task.config()["model_filename"]
    result["unexpected_key_error"] = _error_of(task, {"image": str(studies[0]), "model_filename": "model_extra_key.pt"})
    # Weights of other sizes (the tiny bundle) read without the matching overrides.
    mismatched = bundle_infer_task(tiny_bundle, {}, load_strict=True, add_post_restore=False)
    result["size_mismatch_error"] = _error_of(mismatched, {"image": str(studies[0])})
    return result


def _error_of(task, request: dict) -> str | None:
    try:
        task(request)
    except RuntimeError as error:
        return str(error)[:2000]
    return None


def _answer(response) -> dict:
    try:
        detail = response.json().get("detail")
    except ValueError:  # not JSON: a bare "Internal Server Error" or a file
        detail = response.text[:500] if response.headers.get("content-type", "").startswith("text") else None
    return {"status": response.status_code, "detail": detail}


def _infer(client, model: str, image: str = "", params: dict | None = None, files: dict | None = None, **query):
    query = {"image": image, "output": "image", **query} if image else {"output": "image", **query}
    return client.post(f"/infer/{model}", params=query, data={"params": json.dumps(params or {})}, files=files)


def _put_image(client, image: str | None, name: str, content: bytes, params: str = "{}"):
    query = {"image": image} if image is not None else {}
    return client.put("/datastore/", params=query, data={"params": params}, files={"file": (name, content)})


def _corrupt_files(slice_bytes: bytes) -> dict[str, tuple[str, bytes]]:
    """Uploads that must be refused: not an image, a truncated one, a 3D volume, a file of another format."""
    import nibabel as nib
    import numpy as np

    volume = nib.Nifti1Image(np.random.default_rng(0).random((32, 16, 4), dtype=np.float32), np.eye(4))
    with tempfile.TemporaryDirectory() as folder:
        nib.save(volume, os.path.join(folder, "volume.nii.gz"))
        volume_bytes = Path(folder, "volume.nii.gz").read_bytes()
    whole = gzip.decompress(slice_bytes)
    return {
        "garbage": ("broken.nii.gz", b"this is not a NIfTI file" * 8),
        "truncated": ("truncated.nii.gz", gzip.compress(whole[: len(whole) // 2])),
        "volume": ("volume.nii.gz", volume_bytes),
        "other_format": ("notes.txt", b"plain text"),
    }


def _files_in(folder: str) -> set[str]:
    return {str(path) for path in Path(folder).rglob("*")}


def _probe_infer(client, studies: Path, secret: str) -> dict:
    """``/infer`` with paths and unknown ids for the image, and bad params. ``secret`` is a readable slice
    outside the studies; the client's (and server's) working directory holds both."""
    cwd = Path.cwd()
    bad_ids = {
        "absolute_outside": secret,
        "absolute_in_studies": str(studies / "slice_a.nii.gz"),
        "etc_passwd": "/etc/passwd",
        "relative_to_server_cwd": os.path.relpath(secret, cwd),
        "dotdot": os.path.join("..", cwd.name, os.path.relpath(secret, cwd)),
        "nul": "slice_a\x00",
        "unknown": "no_such_slice",
    }
    result = {}
    for model in ("reconstruct", "generate", "anomaly"):
        for case, image in bad_ids.items():
            result[f"{model}/{case}"] = _answer(_infer(client, model, image, {"seed": 1}))
        result[f"{model}/params_image"] = _answer(_infer(client, model, "slice_a", {"image": secret}))
        result[f"{model}/no_input"] = _answer(_infer(client, model))
        result[f"{model}/unknown_session"] = _answer(_infer(client, model, session_id="no-such-session"))
        bad_json = client.post(f"/infer/{model}", params={"image": "slice_a"}, data={"params": "{not json"})
        result[f"{model}/params_not_json"] = _answer(bad_json)
    weights = {"model_filename": os.path.join("..", "..", "..", "model.pt")}
    result["reconstruct/model_filename"] = _answer(_infer(client, "reconstruct", "slice_a", weights))
    result["generate/temperature"] = _answer(_infer(client, "generate", "slice_a", {"temperature": "hot"}))
    result["anomaly/result"] = _answer(_infer(client, "anomaly", "slice_a", {"result": "heatmap"}))
    result["anomaly/mask_threshold"] = _answer(_infer(client, "anomaly", "slice_a", {"mask_threshold": -0.5}))
    result["anomaly/threshold"] = _answer(_infer(client, "anomaly", "slice_a", {"threshold": "high"}))
    result["unknown_model"] = _answer(_infer(client, "segmentation", "slice_a"))
    return result


def _probe_datastore_writes(client, studies: Path, slice_bytes: bytes) -> tuple[dict, dict]:
    """Uploads whose image id or label tag would leave the studies folder, and other refused datastore requests.

    Returns:
        ``(answers, written)``: ``written`` says whether a file appeared where each upload would have gone.
    """
    escaping = {"dotdot": "../../evil", "absolute": str(Path.cwd() / "evil_absolute"), "nul": "evil\x00name"}
    answers, written = {}, {}
    for case, image in {**escaping, "dot": "..", "with_extension": "x.nii.gz"}.items():
        answers[case] = _answer(_put_image(client, image, "slice.nii.gz", slice_bytes))
    for case, image in escaping.items():
        written[case] = os.path.exists(os.path.join(studies, image.replace("\x00", "") + ".nii.gz"))
    label = {"label": ("label.nii.gz", slice_bytes)}
    answers["label_tag_dotdot"] = _answer(
        client.put("/datastore/label", params={"image": "slice_a", "tag": "../../evil_tag"}, files=label)
    )
    written["label_tag_dotdot"] = os.path.exists(studies / "labels" / "../../evil_tag")
    answers["params_not_json"] = _answer(_put_image(client, "fine_id", "slice.nii.gz", slice_bytes, "[1,"))
    answers["label_of_unknown_image"] = _answer(
        client.put("/datastore/label", params={"image": "no_such_slice"}, files=label)
    )
    answers["delete_unknown"] = _answer(client.delete("/datastore/image", params={"id": "no_such_slice"}))
    return answers, written


def _probe_valid_uploads(client, slice_bytes: bytes, out: Path) -> dict:
    """An upload into the datastore and inference on it by id; an upload straight to ``/infer``."""
    result = {"put": _answer(_put_image(client, "uploaded_ok", "slice.nii.gz", slice_bytes))}
    requests = {
        "put_then_infer": lambda: _infer(client, "reconstruct", "uploaded_ok"),
        "infer_upload": lambda: _infer(client, "reconstruct", files={"file": ("slice.nii.gz", slice_bytes)}),
    }
    for key, request in requests.items():
        response = request()
        result[key] = {"status": response.status_code}
        if response.status_code == 200:
            (out / f"valid_{key}.nii.gz").write_bytes(response.content)
            result[key]["file"] = str(out / f"valid_{key}.nii.gz")
    return result


def _nifti_names(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*.nii*"))


def probe_safety(client, studies_dir: str, secret: str, out: Path) -> dict:
    """Requests the app must refuse, one that fails on the server's side, and valid uploads after them."""
    studies = Path(studies_dir)
    slice_bytes = (studies / "slice_a.nii.gz").read_bytes()
    result = {"infer": _probe_infer(client, studies, secret)}
    tmp_before = _files_in(tempfile.gettempdir())
    result["put"], result["written"] = _probe_datastore_writes(client, studies, slice_bytes)
    for case, (name, content) in _corrupt_files(slice_bytes).items():
        result["put"][f"corrupt/{case}"] = _answer(_put_image(client, f"corrupt_{case}", name, content))
        result["infer"][f"corrupt/{case}"] = _answer(_infer(client, "reconstruct", files={"file": (name, content)}))
    result["tmp_files_left_by_refused_requests"] = sorted(_files_in(tempfile.gettempdir()) - tmp_before)
    result["studies_files"] = _nifti_names(studies)
    result["datastore_ids"] = sorted(client.get("/datastore/", params={"output": "all"}).json()["objects"])

    result["valid"] = _probe_valid_uploads(client, slice_bytes, out)
    result["studies_files_after_valid_put"] = _nifti_names(studies)

    # A failure on the server's side: a datastore file that turned unreadable after its upload.
    result["server_error_put"] = _answer(_put_image(client, "decayed", "slice.nii.gz", slice_bytes))
    (studies / "decayed.nii.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 64)
    result["server_error"] = _answer(_infer(client, "reconstruct", "decayed"))
    return result


def serve(app_dir: str, studies_dir: str, conf: dict, out: Path, secret: str) -> dict:
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    settings.MONAI_LABEL_APP_DIR = app_dir
    settings.MONAI_LABEL_STUDIES = studies_dir
    settings.MONAI_LABEL_APP_CONF = conf
    settings.MONAI_LABEL_SESSION_PATH = str(out / "sessions")  # not ~/.cache/monailabel
    from monailabel.app import app

    result: dict = {"infer": {}}
    start = time.time()
    # raise_server_exceptions=False: a failing request answers 500 as on a real server, instead of raising here.
    with TestClient(app, raise_server_exceptions=False) as client:  # the context runs the lifespan (builds the app)
        info = client.get("/info/")
        result["startup_s"] = round(time.time() - start, 2)
        if info.status_code != 200:
            raise SystemExit(f"GET /info/ -> {info.status_code}: {info.text[:2000]}")
        result["info"] = info.json()
        images = sorted(client.get("/datastore/", params={"output": "all"}).json()["objects"])
        result["images"] = images
        for image in images:
            for key, model, params in INFER_REQUESTS:
                begin = time.time()
                response = client.post(
                    f"/infer/{model}", params={"image": image, "output": "image"}, data={"params": json.dumps(params)}
                )
                if response.status_code != 200:
                    raise SystemExit(
                        f"POST /infer/{model}?image={image} -> {response.status_code}: " f"{response.text[:4000]}"
                    )
                target = out / f"{key}_{image}.nii.gz"
                target.write_bytes(response.content)
                result["infer"][f"{key}/{image}"] = {"file": str(target), "seconds": round(time.time() - begin, 2)}
        # The result JSON alone: the seed that was used comes back, a fresh one when none is given; the anomaly
        # score and the thresholds used.
        for key, model, params in JSON_REQUESTS:
            response = client.post(
                f"/infer/{model}", params={"image": images[0], "output": "json"}, data={"params": json.dumps(params)}
            )
            if response.status_code != 200:
                raise SystemExit(f"POST /infer/{model} (json) -> {response.status_code}: {response.text[:4000]}")
            result[key] = response.json()
        missing = client.post("/infer/segmentation", params={"image": images[0], "output": "image"})
        result["unknown_model_status"] = missing.status_code
        result["safety"] = probe_safety(client, studies_dir, secret, out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", required=True)
    parser.add_argument("--studies", required=True)
    parser.add_argument("--bundle", required=True, help="bundle copy the app serves (weights of --overrides sizes)")
    parser.add_argument("--overrides", default="", help="JSON of inference.json IDs for --bundle's weights")
    parser.add_argument("--default-bundle", required=True, help="bundle copy with default-size weights")
    parser.add_argument("--secret", required=True, help="a readable slice outside the studies folder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    studies = sorted(Path(args.studies).glob("*.nii*"))

    summary = {"direct": direct_bundle_infer_task(args.app, args.default_bundle, args.bundle, studies, out)}
    conf = {"bundle_dir": args.bundle, "models": "reconstruct,generate,anomaly", "overrides": args.overrides}
    summary["server"] = serve(args.app, args.studies, conf, out, args.secret)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary["server"].items() if k not in ("info", "safety")}, default=str))


if __name__ == "__main__":
    main()
