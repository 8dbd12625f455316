"""MONAI Label app for the pelvic MRI VQ-VAE + PixelCNN bundle: ``reconstruct``, ``generate`` and ``anomaly``.

Start it from the bundle root (see README.md beside this file)::

    .venv-monailabel/bin/monailabel start_server --app apps/monailabel --studies /data/slices \
        --conf models reconstruct,generate,anomaly

Conf options (``--conf KEY VALUE``):

- ``bundle_dir``: the bundle root (default: the repository that holds this app, ``../..``). Weights are read
  from ``<bundle_dir>/models/model.pt`` (VQ-VAE) and ``<bundle_dir>/models/prior/prior.pt`` (prior); ``anomaly``
  also needs the threshold calibrated for them, ``<bundle_dir>/models/anomaly_threshold.json``.
- ``models``: any of ``reconstruct``, ``generate`` and ``anomaly``, comma-separated, or ``all`` (default ``all``).
- ``overrides``: JSON object of ``configs/inference.json`` IDs, for weights trained with other network sizes,
  e.g. ``'{"num_embeddings": 512}'`` (the same overrides that were given to training).
- ``preload``: ``true`` to build the reconstruction network at start (MONAI Label's own option).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask

from lib.bundle_config import bundle_dir_from_conf, ensure_importable, overrides_from_conf
from lib.datastore import GuardedLocalDatastore, check_slice_file, datastore_image_path
from lib.errors import RequestError
from lib.http_guards import install_request_guards, request_input_is_upload
from lib.infers import GenerateInfer, ReconstructInfer
from lib.infers.anomaly import AnomalyInfer

logger = logging.getLogger(__name__)

TASKS = {"reconstruct": ReconstructInfer, "generate": GenerateInfer, "anomaly": AnomalyInfer}


class PelvicMRIApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = conf or {}
        self.bundle_dir = bundle_dir_from_conf(conf)
        self.overrides = overrides_from_conf(conf)
        requested = [m.strip() for m in (conf.get("models") or "all").split(",") if m.strip()]
        self.models = list(TASKS) if not requested or "all" in requested else requested
        unknown = sorted(set(self.models) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown models {unknown}: choose from {sorted(TASKS)} or 'all' (--conf models ...)")
        ensure_importable(self.bundle_dir)
        with open(os.path.join(self.bundle_dir, "configs", "metadata.json")) as f:
            metadata = json.load(f)
        logger.info(f"Bundle: {self.bundle_dir}; models: {self.models}; overrides: {self.overrides}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=metadata.get("name", "Pelvic MRI VQ-VAE + PixelCNN"),
            description="Reconstruction (VQ-VAE), generation and anomaly maps (PixelCNN prior) of 2D pelvic MRI slices",
            version=metadata.get("version", "0"),
        )

    def init_infers(self):
        infers = {}
        for name in self.models:
            task = TASKS[name](self.bundle_dir, self.conf, overrides=self.overrides)
            if task.is_valid():
                infers[name] = task
            else:
                logger.warning(
                    f"Model '{name}' is not available: weights missing under {self.bundle_dir}/models "
                    "(train first with the README's training command, or copy trained weights there; anomaly also "
                    "needs models/anomaly_threshold.json from the run ID calibrating of configs/anomaly.json)"
                )
        return infers

    def init_trainers(self):
        return (
            {}
        )  # training runs through the bundle's own workflows (configs/train_vqvae.json, configs/train_prior.json)

    def init_datastore(self) -> Datastore:
        """A local studies folder is a :class:`GuardedLocalDatastore`; remote datastores are MONAI Label's."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return GuardedLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def on_init_complete(self):
        super().on_init_complete()
        server = sys.modules.get("monailabel.app")  # the FastAPI app, when this instance is being served
        if server is not None:
            install_request_guards(server.app)

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's ``infer`` on a checked request, for every infer task of this app.

        The model must be served (404 otherwise). The image must be a datastore id (400 for a path or another
        malformed id, 404 for an unknown one), read from its datastore file; only an image the client uploaded
        to ``POST /infer/{model}`` (``file=`` or ``session_id``) is read from its upload, and must be a readable
        2D slice (422). ``model_filename`` must be one of the weights the model offers (400).
        """
        request = dict(request)
        task = self._served_task(request.get("model"))
        request["image"] = self._checked_image(request.get("image"), datastore or self.datastore())
        self._check_model_filename(task, request)
        return super().infer(request, datastore)

    def infer_wsi(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's ``infer_wsi`` for datastore ids only (400/404 otherwise), as :meth:`infer`."""
        self._served_task(request.get("model"))
        if isinstance(request.get("image"), str):
            datastore_image_path(datastore or self.datastore(), request["image"])
        return super().infer_wsi(request, datastore)

    def _served_task(self, model: Any) -> InferTask:
        task = self._infers.get(model) if isinstance(model, str) else None
        if task is None:
            raise RequestError(404, f"model {model!r} is not served here; models: {sorted(self._infers)}")
        return task

    @staticmethod
    def _checked_image(image: Any, datastore: Datastore) -> Any:
        if not isinstance(image, str):
            return image  # in-memory data from an in-process caller; HTTP requests always give a string
        if request_input_is_upload():
            check_slice_file(image, "the uploaded image")
            return image
        return datastore_image_path(datastore, image)

    @staticmethod
    def _check_model_filename(task: InferTask, request: dict[str, Any]) -> None:
        offered = task.config().get("model_filename")
        if "model_filename" not in request or not offered:
            return  # a task without weight choices ignores model_filename
        chosen = request["model_filename"]
        names = [chosen] if isinstance(chosen, str) else chosen
        if not isinstance(names, list) or not names or any(name not in offered for name in names):
            raise RequestError(400, f"model_filename {chosen!r} is not one of the weights this model offers: {offered}")
