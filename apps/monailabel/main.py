"""MONAI Label app for the pelvic MRI VQ-VAE + PixelCNN bundle: ``reconstruct`` and ``generate``.

Start it from the bundle root (see README.md beside this file)::

    .venv-monailabel/bin/monailabel start_server --app apps/monailabel --studies /data/slices \
        --conf models reconstruct,generate

Conf options (``--conf KEY VALUE``):

- ``bundle_dir``: the bundle root (default: the repository that holds this app, ``../..``). Weights are read
  from ``<bundle_dir>/models/model.pt`` (VQ-VAE) and ``<bundle_dir>/models/prior/prior.pt`` (prior).
- ``models``: ``reconstruct``, ``generate``, ``reconstruct,generate`` or ``all`` (default ``all``).
- ``overrides``: JSON object of ``configs/inference.json`` IDs, for weights trained with other network sizes,
  e.g. ``'{"num_embeddings": 512}'`` (the same overrides that were given to training).
- ``preload``: ``true`` to build the reconstruction network at start (MONAI Label's own option).
"""

from __future__ import annotations

import json
import logging
import os

from monailabel.interfaces.app import MONAILabelApp

from lib.bundle_config import bundle_dir_from_conf, ensure_importable, overrides_from_conf
from lib.infers import GenerateInfer, ReconstructInfer

logger = logging.getLogger(__name__)

TASKS = {"reconstruct": ReconstructInfer, "generate": GenerateInfer}


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
            description="Reconstruction (VQ-VAE) and generation (PixelCNN prior) of 2D pelvic MRI slices",
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
                    "(train first: python -m monai.bundle run training --config_file configs/train.json)"
                )
        return infers

    def init_trainers(self):
        return {}  # training runs through the bundle's own workflows (configs/train.json)
