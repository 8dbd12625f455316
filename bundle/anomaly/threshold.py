"""The NLL threshold above which a code is resampled: a quantile of the per-code NLL of normal slices, stored beside
the weights it was calibrated for."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.anomaly.healing import code_nll
from bundle.engine.io import atomic_write_json
from bundle.stage2_prior.two_level import LEVELS, TwoLevelPrior

__all__ = ["calibrate", "weights_digests", "parse_threshold", "resolve_thresholds", "save_calibration"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def calibrate(prior: TwoLevelPrior, encoded: dict[str, Any], quantile: float = 0.95, batch_size: int = 16) -> dict:
    """Per-level thresholds: the ``quantile`` of the per-code NLL of normal code maps.

    Args:
        prior: the two-level prior.
        encoded: codes of normal slices as :func:`bundle.stage2_prior.codes.encode_dataset` returns them
            (``top``, ``bottom``, ``labels``).
        quantile: in ``(0, 1)``; a fraction ``1 - quantile`` of normal codes lies above the threshold.
        batch_size: maps per forward pass.

    Returns:
        ``{"top": bits, "bottom": bits, "quantile": q, "num_images": n, "mean_nll": {"top": .., "bottom": ..}}``.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}.")
    top_codes, bottom_codes = encoded["top"], encoded["bottom"]
    if len(top_codes) == 0:
        raise ValueError("no code maps to calibrate on.")
    labels = encoded.get("labels")
    use_labels = labels is not None and len(labels) and getattr(prior, "num_classes", 0)
    nll: dict[str, list[np.ndarray]] = {level: [] for level in LEVELS}
    for start in range(0, len(top_codes), batch_size):
        batch = slice(start, start + batch_size)
        batch_labels = labels[batch] if use_labels else None
        for level, values in zip(LEVELS, code_nll(prior, top_codes[batch], bottom_codes[batch], batch_labels)):
            nll[level].append(values.flatten().cpu().numpy())
    every = {level: np.concatenate(values) for level, values in nll.items()}
    result: dict[str, Any] = {level: float(np.quantile(every[level], quantile)) for level in LEVELS}
    result.update(
        quantile=float(quantile),
        num_images=int(len(top_codes)),
        mean_nll={level: float(values.mean()) for level, values in every.items()},
    )
    return result


def weights_digests(paths: Sequence[str | os.PathLike]) -> list[str]:
    """SHA-1 of each weights file, to tell whether a stored threshold was calibrated for these weights."""
    digests = []
    for path in paths:
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digests.append(digest.hexdigest())
    return digests


def parse_threshold(value: float | Sequence[float] | str) -> tuple[float, float]:
    """``(top, bottom)`` bits from one number (both levels), a pair, or their JSON text (command-line overrides).

    Raises:
        ValueError: for anything else.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"threshold must be a number or [top, bottom], got {value!r}.") from error
    pair = [value, value] if isinstance(value, (int, float)) else list(value)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair):
        raise ValueError(f"threshold must be a number or [top, bottom] in bits, got {value!r}.")
    return float(pair[0]), float(pair[1])


def save_calibration(path: str | os.PathLike, calibration: dict, weights: Sequence[str | os.PathLike]) -> dict:
    """Writes ``calibration`` with the digests of the weights it holds for to ``path`` (JSON, atomically).

    Returns:
        What was written.
    """
    content = {**calibration, "weights": dict(zip(("vqvae", "prior"), weights_digests(weights)))}
    atomic_write_json(path, content)
    logger.info(
        f"Anomaly thresholds {content['top']:.3f} (top) and {content['bottom']:.3f} (bottom) bits, the "
        f"{content['quantile']} quantile over {content['num_images']} normal slices, written to {Path(path).resolve()}"
    )
    return content


def _stored(path: str | os.PathLike, weights: Sequence[str | os.PathLike], settings: Mapping[str, Any]) -> dict | None:
    """The stored calibration if it is readable and was made for ``weights`` with ``settings``, else None."""
    if not Path(path).is_file():
        return None
    try:
        content = json.loads(Path(path).read_text())
        stored_for = [content["weights"]["vqvae"], content["weights"]["prior"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(f"Ignoring unreadable threshold file {path}: {error}")
        return None
    if stored_for != weights_digests(weights):
        logger.warning(f"{path} was calibrated for other weights: calibrating again.")
        return None
    changed = {key: content.get(key) for key, value in settings.items() if content.get(key) != value}
    if changed:
        logger.warning(f"{path} was calibrated with {changed}, not {dict(settings)}: calibrating again.")
        return None
    return content


def resolve_thresholds(
    override: float | Sequence[float] | str | None,
    path: str | os.PathLike,
    calibration: Callable[[], dict],
    weights: Sequence[str | os.PathLike],
    settings: Mapping[str, Any] | None = None,
) -> tuple[float, float]:
    """The ``(top, bottom)`` thresholds to use: the override, else the stored calibration of these weights and
    settings, else a new calibration (then stored).

    Args:
        override: the user's threshold (see :func:`parse_threshold`) or None.
        path: the threshold file beside the weights (``models/anomaly_threshold.json``).
        calibration: makes a calibration (:func:`calibrate`) when none is stored.
        weights: ``(VQ-VAE weights, prior weights)`` files.
        settings: entries the stored calibration must hold (e.g. ``{"quantile": 0.95, "split": "validate"}``);
            None accepts any.

    Returns:
        ``(top, bottom)`` bits.
    """
    if override is not None:
        return parse_threshold(override)
    content = _stored(path, weights, settings or {})
    if content is None:
        content = save_calibration(path, calibration(), weights)
    return float(content["top"]), float(content["bottom"])
