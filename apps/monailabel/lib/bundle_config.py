"""Where the bundle is and how its ``configs/inference.json`` is read, shared by both infer tasks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

APP_DIR = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE_DIR = APP_DIR.parents[1]  # apps/monailabel -> the bundle (repository) root


def bundle_dir_from_conf(conf: dict[str, str]) -> str:
    """``--conf bundle_dir PATH`` (absolute, or relative to the server's working directory) or the repository root."""
    path = Path(conf.get("bundle_dir") or DEFAULT_BUNDLE_DIR).expanduser().resolve()
    if not (path / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"bundle_dir {path} has no configs/inference.json (--conf bundle_dir: the bundle root)")
    return str(path)


def overrides_from_conf(conf: dict[str, str]) -> dict[str, Any]:
    """``--conf overrides '{"channels": [16, 32], "num_embeddings": 64}'``: IDs of ``configs/inference.json``.

    The same network-size overrides that were given to training (the README's "pass the same size overrides
    to every workflow that loads those weights"); ``load_strict`` rejects weights that do not fit.
    """
    text = conf.get("overrides") or ""
    if not text.strip():
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--conf overrides must be a JSON object, got {text!r}: {error}") from error
    if not isinstance(overrides, dict):
        raise ValueError(f"--conf overrides must be a JSON object, got {text!r}")
    return overrides


def apply_overrides(parser: ConfigParser, overrides: dict[str, Any]) -> ConfigParser:
    """Sets each ID of ``overrides`` in ``parser``; an ID the config lacks is an error (a typo would be ignored)."""
    for key, value in overrides.items():
        if key not in parser:
            raise KeyError(f"override '{key}' is not an ID of configs/inference.json")
        parser[key] = value
    return parser


def ensure_importable(bundle_dir: str) -> None:
    """The configs' ``_target_``s and ``$import bundle...`` need the bundle root on ``sys.path``."""
    if bundle_dir not in sys.path:
        sys.path.insert(0, bundle_dir)


def sampling_temperature(bundle_dir: str) -> float:
    """The default sampling temperature of the bundle: ``temperature`` in ``configs/sample.json``."""
    return float(ConfigParser.load_config_file(os.path.join(bundle_dir, "configs", "sample.json"))["temperature"])


def inference_config(bundle_dir: str, overrides: dict[str, Any]) -> ConfigParser:
    """``configs/inference.json`` with ``bundle_root`` set to ``bundle_dir`` (its paths are then absolute)."""
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser["bundle_root"] = bundle_dir
    return apply_overrides(parser, overrides)
