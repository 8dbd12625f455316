"""MONAI Label side of tests/test_monailabel.py; runs in .venv-monailabel (MONAI Label is not in .venv).

1. ``BundleInferTask`` itself (no app) on a bundle with default-size weights: ``configs/inference.json`` loads
   with ``load_strict=True`` and reconstructs; and on a bundle whose weights have other sizes it must refuse.
2. The app in ``--app`` served in-process through FastAPI's TestClient: ``GET /info/`` and
   ``POST /infer/{model}?image={id}`` for each study and both models.

Every response body goes under ``--out`` with ``summary.json``; tests/test_monailabel.py checks them. Exits
non-zero (with the reason on stderr) when a request fails.

Usage::

    .venv-monailabel/bin/python tests/monailabel_client.py --app APP --studies DIR --bundle DIR \
        --overrides JSON --default-bundle DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path


def direct_bundle_infer_task(app_dir: str, default_bundle: str, tiny_bundle: str, studies: list[Path],
                             out: Path) -> dict:
    sys.path.insert(0, app_dir)  # lib.compat: BundleInferTask importable without torchvision
    from lib.compat import import_bundle_infer_task

    sys.path.remove(app_dir)
    BundleInferTask = import_bundle_infer_task()
    result = {"torchvision_left_in_sys_modules": "torchvision" in sys.modules}

    # MONAI Label's own Restored step is left out (add_post_restore=False): with bundle/transforms.py storing
    # meta["spatial_shape"] as a torch tensor it fails in numpy (see apps/monailabel/README.md).
    task = BundleInferTask(default_bundle, {}, load_strict=True, add_post_restore=False)
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
    mismatched = BundleInferTask(tiny_bundle, {}, load_strict=True, add_post_restore=False)
    result["size_mismatch_error"] = _error_of(mismatched, {"image": str(studies[0])})
    return result


def _error_of(task, request: dict) -> str | None:
    try:
        task(request)
    except RuntimeError as error:
        return str(error)[:2000]
    return None


def serve(app_dir: str, studies_dir: str, conf: dict, out: Path) -> dict:
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
            for model, params in (("reconstruct", {}), ("generate", {"seed": 7, "temperature": 1.0})):
                begin = time.time()
                response = client.post(f"/infer/{model}", params={"image": image, "output": "image"},
                                       data={"params": json.dumps(params)})
                if response.status_code != 200:
                    raise SystemExit(f"POST /infer/{model}?image={image} -> {response.status_code}: "
                                     f"{response.text[:4000]}")
                target = out / f"{model}_{image}.nii.gz"
                target.write_bytes(response.content)
                result["infer"][f"{model}/{image}"] = {"file": str(target), "seconds": round(time.time() - begin, 2)}
        # The result JSON alone: the seed that was used comes back, a fresh one when none is given.
        for key, params in (("generate_seed_7", {"seed": 7}), ("generate_random", {})):
            response = client.post("/infer/generate", params={"image": images[0], "output": "json"},
                                   data={"params": json.dumps(params)})
            if response.status_code != 200:
                raise SystemExit(f"POST /infer/generate (json) -> {response.status_code}: {response.text[:4000]}")
            result[key] = response.json()
        missing = client.post("/infer/segmentation", params={"image": images[0], "output": "image"})
        result["unknown_model_status"] = missing.status_code
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", required=True)
    parser.add_argument("--studies", required=True)
    parser.add_argument("--bundle", required=True, help="bundle copy the app serves (weights of --overrides sizes)")
    parser.add_argument("--overrides", default="", help="JSON of inference.json IDs for --bundle's weights")
    parser.add_argument("--default-bundle", required=True, help="bundle copy with default-size weights")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    studies = sorted(Path(args.studies).glob("*.nii*"))

    summary = {"direct": direct_bundle_infer_task(args.app, args.default_bundle, args.bundle, studies, out)}
    conf = {"bundle_dir": args.bundle, "models": "reconstruct,generate", "overrides": args.overrides}
    summary["server"] = serve(args.app, args.studies, conf, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary["server"].items() if k != "info"}, default=str))


if __name__ == "__main__":
    main()
