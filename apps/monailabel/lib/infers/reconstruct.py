"""``reconstruct``: the request image through the bundle's VQ-VAE, as MONAI Label's ``BundleInferTask`` runs it."""

from __future__ import annotations

import logging
from typing import Any

from monai.transforms import SaveImaged
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.bundle_config import apply_overrides
from lib.compat import import_bundle_infer_task
from lib.nifti import write_like_input

BundleInferTask = import_bundle_infer_task()
logger = logging.getLogger(__name__)


class ReconstructInfer(BundleInferTask):
    """``configs/inference.json`` unchanged: its ``network_def`` (VQVAE with ``return_loss: false``, so one
    tensor out), ``preprocessing`` (load, 2D check, pad/crop to ``image_size``, percentile scaling),
    ``inferer`` and ``postprocessing`` (``Invertd`` back to the input's size, clamp to [0, 1]; MONAI Label
    removes its ``SaveImaged``). Weights: ``<bundle>/models/model.pt``, loaded with ``load_strict=True``.

    What differs from a plain ``BundleInferTask``: the type is ``others`` (not segmentation), no label-map
    ``Restored`` step (``Invertd`` already restores the size), network-size ``overrides`` from the app conf,
    and a writer that keeps the input's shape and affine (MONAI Label's ITK writer loses a 2D affine).
    """

    def __init__(self, bundle_dir: str, conf: dict[str, str], overrides: dict[str, Any] | None = None, **kwargs: Any):
        self.overrides = dict(overrides or {})
        super().__init__(
            bundle_dir,
            conf,
            type=InferType.OTHERS,
            post_filter=[SaveImaged],
            add_post_restore=False,
            load_strict=True,
            **kwargs,
        )
        if self.is_valid():
            self.description = "VQ-VAE reconstruction of the image (float NIfTI in [0, 1], the input's size and affine)"

    def _load_bundle_config(self, path, config):
        return apply_overrides(super()._load_bundle_config(path, config), self.overrides)

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[str, dict[str, Any]]:
        return write_like_input(data, self.key_pred, prefix="reconstruct"), {}
