"""``anomaly``: the anomaly map of the request image (``bundle.anomaly``), or its thresholded mask as a label."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Sequence

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Invertd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.bundle_config import apply_overrides, ensure_importable
from lib.errors import RequestError
from lib.nifti import write_like_input

logger = logging.getLogger(__name__)

RESULTS = ("map", "mask")
DEFAULT_MASK_THRESHOLD = 0.1


def anomaly_config(bundle_dir: str, overrides: dict[str, Any]) -> ConfigParser:
    """``configs/inference.json`` with ``configs/anomaly.json`` over it, ``bundle_root`` set to ``bundle_dir``."""
    parser = ConfigParser()
    parser.read_config([os.path.join(bundle_dir, "configs", name) for name in ("inference.json", "anomaly.json")])
    parser["bundle_root"] = bundle_dir
    return apply_overrides(parser, overrides)


def _number(value: Any, name: str) -> float:
    """A finite number from a request param (UI params may arrive as strings); 422 otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise RequestError(422, f"{name} must be a number, got {value!r}") from error
    if not math.isfinite(number):
        raise RequestError(422, f"{name} must be a finite number, got {value!r}")
    return number


def _result(value: Any) -> str:
    if value not in RESULTS:
        raise RequestError(422, f"result must be one of {list(RESULTS)}, got {value!r}")
    return value


def _mask_threshold(value: Any) -> float:
    threshold = _number(value, "mask_threshold")
    if threshold < 0:
        raise RequestError(422, f"mask_threshold must be >= 0, got {value!r}")
    return threshold


def _nll_threshold(value: Any) -> float | None:
    """The ``threshold`` param in bits; absent, ``None`` or negative: the calibrated thresholds."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    threshold = _number(value, "threshold")
    return None if threshold < 0 else threshold


class AnomalyInfer(BasicInferTask):
    """Healing-based anomaly map of the request image (``bundle.anomaly.detection.AnomalyDetector`` with the
    settings of ``configs/anomaly.json``), with the input's size and affine.

    Request params: ``result`` (``"map"``, the default: the float map; ``"mask"``: the map above
    ``mask_threshold`` as a 0/1 label, which MONAI Label stores as the image's label with
    ``{"save_label": true, "label_tag": "anomaly"}``), ``mask_threshold`` (map value, default 0.1), ``threshold``
    (NLL threshold in bits for both levels; -1 or absent: the calibrated ones).
    The result JSON gives the image's score (bits), the thresholds used and the fraction of pixels resampled and
    masked.
    Weights: ``models/model.pt``, ``models/prior/prior.pt`` and the calibration ``models/anomaly_threshold.json``
    (``python -m monai.bundle run calibrating``), all made for the same weights.
    """

    def __init__(self, bundle_dir: str, conf: dict[str, str], overrides: dict[str, Any] | None = None, **kwargs: Any):
        ensure_importable(bundle_dir)
        self.bundle_dir = bundle_dir
        self.overrides = dict(overrides or {})
        parser = anomaly_config(bundle_dir, self.overrides)
        self.vqvae_path = parser.get_parsed_content("ckpt_path")
        self.prior_path = parser.get_parsed_content("prior_ckpt_path")
        self.threshold_path = parser.get_parsed_content("threshold_path")
        self._settings = {
            "levels": parser.get_parsed_content("heal_levels"),
            "gated": parser.get_parsed_content("gated"),
            "sigma": parser.get_parsed_content("smooth_sigma"),
            "temperature": parser.get_parsed_content("heal_temperature"),
            "seed": parser.get_parsed_content("seed"),
            "score_codes": parser.get_parsed_content("score_codes"),
        }
        # one instance: Invertd undoes the transforms recorded by this very Compose
        self._preprocessing = parser.get_parsed_content("preprocessing")
        super().__init__(
            path=[self.vqvae_path, self.prior_path],
            network=None,
            type=InferType.OTHERS,
            labels={"anomaly": 1},
            dimension=2,
            description="Anomaly map of the image: |image - healed image|, where the codes the prior finds unlikely "
            "are resampled (result 'map'), or that map above mask_threshold (result 'mask')",
            config={"result": "map", "mask_threshold": DEFAULT_MASK_THRESHOLD, "threshold": -1},
            load_strict=True,
            **kwargs,
        )
        self._networks: dict[str, tuple[torch.nn.Module, torch.nn.Module, tuple[float, ...]]] = {}

    def is_valid(self) -> bool:
        return all(os.path.isfile(path) for path in (self.vqvae_path, self.prior_path, self.threshold_path))

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [self._preprocessing]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [Invertd(keys="pred", transform=self._preprocessing, orig_keys="image", nearest_interp=False)]

    def _load_networks(self, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        from bundle.engine.weights import load_weights

        stamp = tuple(os.stat(path).st_mtime for path in (self.vqvae_path, self.prior_path, self.threshold_path))
        cached = self._networks.get(device)
        if cached is None or cached[2] != stamp:  # (re)load when a weight file changes, like BasicInferTask
            parser = anomaly_config(self.bundle_dir, self.overrides)
            vqvae = load_weights(parser.get_parsed_content("network_def"), self.vqvae_path, device)
            prior = load_weights(parser.get_parsed_content("prior_def"), self.prior_path, device)
            cached = self._networks[device] = (vqvae, prior, stamp)
        return cached[0], cached[1]

    def _thresholds(self, override: float | None) -> tuple[float, float]:
        from bundle.anomaly.threshold import resolve_thresholds

        def stale() -> dict:
            raise RuntimeError(
                f"{self.threshold_path} was calibrated for other weights: run "
                "`python -m monai.bundle run calibrating` with configs/inference.json and configs/anomaly.json"
            )

        return resolve_thresholds(override, self.threshold_path, stale, [self.vqvae_path, self.prior_path])

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cpu") -> dict[str, Any]:
        from bundle.anomaly.detection import AnomalyDetector

        result = _result(data.get("result", "map"))
        mask_threshold = _mask_threshold(data.get("mask_threshold", DEFAULT_MASK_THRESHOLD))
        thresholds = self._thresholds(_nll_threshold(data.get("threshold")))
        detector = AnomalyDetector(*self._load_networks(device), thresholds, **self._settings)
        image = data["image"]
        found = detector(torch.as_tensor(image).float()[None])
        anomaly_map = found.anomaly_map[0]
        mask = (anomaly_map > mask_threshold).float()
        data["pred"] = MetaTensor(anomaly_map if result == "map" else mask)
        data["result"] = {
            "result": result,
            "score_bits": float(found.score[0]),
            "thresholds_bits": list(thresholds),
            "mask_threshold": mask_threshold,
            "resampled_fraction": float(found.resampled[0].mean()),
            "mask_fraction": float(mask.mean()),
        }
        logger.info(f"Anomaly {result}: score {data['result']['score_bits']:.3f} bits, thresholds {thresholds}")
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[str, dict[str, Any]]:
        return write_like_input(data, "pred", prefix="anomaly"), dict(data["result"])
