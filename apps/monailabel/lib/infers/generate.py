"""``generate``: a new slice sampled from the bundle's PixelCNN prior and decoded by its VQ-VAE.

MONAI Label's ``/infer`` always takes an image; this task uses it only for the output's geometry (size and
affine), never for its content.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from typing import Any, Callable, Sequence

import torch
from monai.transforms import LoadImaged, ResizeWithPadOrCrop
from monai.utils import convert_to_tensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.bundle_config import ensure_importable, inference_config, sampling_temperature
from lib.errors import RequestError
from lib.nifti import write_like_input

logger = logging.getLogger(__name__)


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds


def _optional_int(value: Any, name: str) -> int | None:
    """A whole-number request param; ``None``, ``""``, ``"none"`` and negative numbers mean "not given".

    Raises:
        RequestError: 422 when ``value`` is not a number (UI params may arrive as strings such as ``"7"``) or is
            above :data:`MAX_SEED`.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        number = int(float(value))
    except (TypeError, ValueError, OverflowError) as error:
        raise RequestError(422, f"{name} must be a whole number, got {value!r}") from error
    if number > MAX_SEED:
        raise RequestError(422, f"{name} must be at most {MAX_SEED}, got {value!r}")
    return None if number < 0 else number


def _temperature(value: Any) -> float:
    """The ``temperature`` request param; 422 unless it is a finite number >= 0."""
    try:
        temperature = float(value)
    except (TypeError, ValueError) as error:
        raise RequestError(422, f"temperature must be a number >= 0, got {value!r}") from error
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise RequestError(
            422, f"temperature must be a finite number >= 0 (0 picks the most likely code), got {value!r}"
        )
    return temperature


class GenerateInfer(BasicInferTask):
    """Samples one slice from the prior (``bundle.stage2_prior.generation.generate``), padded or cropped to the request
    image's size (as ``Invertd`` does for a reconstruction) and written with its affine.

    Request params: ``temperature`` (float, default: ``temperature`` in the bundle's ``configs/sample.json``),
    ``seed`` (int; -1 or absent: a fresh random seed, reported back in the result), ``label`` (class of a conditioned
    prior; -1 or absent: class 0; ignored when the prior has no classes).
    Weights: ``<bundle>/models/model.pt`` and ``<bundle>/models/prior/prior.pt``, loaded strictly.
    """

    def __init__(self, bundle_dir: str, conf: dict[str, str], overrides: dict[str, Any] | None = None, **kwargs: Any):
        ensure_importable(bundle_dir)
        self.bundle_dir = bundle_dir
        self.overrides = dict(overrides or {})
        parser = inference_config(bundle_dir, self.overrides)
        self.image_size = tuple(int(s) for s in parser.get_parsed_content("image_size"))
        self.latent_shapes = tuple(tuple(int(s) for s in shape) for shape in parser.get_parsed_content("latent_shapes"))
        self.num_classes = int(parser.get_parsed_content("num_classes"))
        self.vqvae_path = parser.get_parsed_content("ckpt_path")
        self.prior_path = parser.get_parsed_content("prior_ckpt_path")
        self.default_temperature = sampling_temperature(bundle_dir)
        config: dict[str, Any] = {"temperature": self.default_temperature, "seed": -1}
        if self.num_classes:
            config["label"] = -1
        super().__init__(
            path=[self.vqvae_path, self.prior_path],
            network=None,
            type=InferType.OTHERS,
            labels=None,
            dimension=2,
            description=f"A new {self.image_size[0]}x{self.image_size[1]} slice from the two-level PixelCNN prior "
            "(the image gives only the output's size and affine)",
            config=config,
            load_strict=True,
            **kwargs,
        )
        self._sampling_networks: dict[str, tuple[torch.nn.Module, torch.nn.Module, tuple[float, float]]] = {}

    def is_valid(self) -> bool:
        return os.path.isfile(self.vqvae_path) and os.path.isfile(self.prior_path)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        from bundle.data.transforms import EnsureSlice2Dd  # refuses 3D volumes, drops singleton axes

        return [LoadImaged(keys="image", image_only=False, ensure_channel_first=True), EnsureSlice2Dd(keys="image")]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def _load_networks(self, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        from bundle.engine.weights import load_weights

        stamp = (os.stat(self.vqvae_path).st_mtime, os.stat(self.prior_path).st_mtime)
        cached = self._sampling_networks.get(device)
        if cached is None or cached[2] != stamp:  # (re)load when the weight files change, like BasicInferTask
            parser = inference_config(self.bundle_dir, self.overrides)
            vqvae = load_weights(parser.get_parsed_content("network_def"), self.vqvae_path, device)
            prior = load_weights(parser.get_parsed_content("prior_def"), self.prior_path, device)
            cached = self._sampling_networks[device] = (vqvae, prior, stamp)
        return cached[0], cached[1]

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cpu") -> dict[str, Any]:
        import bundle.stage2_prior.generation

        temperature = _temperature(data.get("temperature", self.default_temperature))
        seed = _optional_int(data.get("seed"), "seed")
        seed = secrets.randbelow(2**31) if seed is None else seed
        label = _optional_int(data.get("label"), "label") if self.num_classes else None
        if self.num_classes and label is None:
            label = 0  # what bundle.stage2_prior.generation.generate picks for a single slice without a label
        if self.num_classes and label >= self.num_classes:
            raise RequestError(422, f"label must be below the prior's {self.num_classes} classes, got {label}")
        vqvae, prior = self._load_networks(device)
        images, _, _ = bundle.stage2_prior.generation.generate(
            vqvae, prior, 1, temperature, seed, label, latent_shapes=self.latent_shapes
        )
        size = tuple(data["image"].shape[1:])  # the request image, channel first and 2D after EnsureSlice2Dd
        image = images[0] if size == self.image_size else ResizeWithPadOrCrop(spatial_size=size)(images[0])
        data["pred"] = convert_to_tensor(image, track_meta=False)
        data["result"] = {"seed": seed, "temperature": temperature, "label": label}
        logger.info(f"Generated a slice with seed {seed}, temperature {temperature}, label {label}")
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[str, dict[str, Any]]:
        return write_like_input(data, "pred", prefix="generate"), dict(data["result"])
