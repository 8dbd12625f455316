"""Detection metrics over pixels and images.

Pixel-level average precision and best achievable Dice come from one precision-recall curve, computed with
``torch`` sorting and cumulative sums (millions of pixels in seconds); its average precision is the one of
``monai.metrics.compute_average_precision`` (and scikit-learn's ``average_precision_score``), whose Python loop is
too slow for whole test sets of pixels. Image-level AUROC is MONAI's ``compute_roc_auc``.
"""

from __future__ import annotations

import torch
from monai.metrics import compute_roc_auc

__all__ = ["precision_recall_curve", "average_precision", "best_dice", "image_auroc"]


def precision_recall_curve(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives and predicted positives at every distinct score taken as a threshold (``score >= t``).

    Args:
        scores: any shape, higher means more anomalous.
        labels: the same shape, 1 (or True) for anomalous.

    Returns:
        ``(thresholds, true_positives, predicted_positives, num_positives)``: the first three ``[T]`` for the ``T``
        distinct scores in decreasing order, float64; ``num_positives`` a scalar.

    Raises:
        ValueError: when the shapes differ or there is nothing to score.
    """
    if scores.shape != labels.shape or scores.numel() == 0:
        raise ValueError(f"scores and labels must share a non-empty shape, got {scores.shape} and {labels.shape}.")
    order = torch.argsort(scores.flatten().double(), descending=True, stable=True)
    ordered = scores.flatten().double()[order]
    hits = labels.flatten()[order].double().cumsum(0)
    # the last index of each run of equal scores: a threshold admits all of them at once
    last = torch.nonzero(torch.diff(ordered, append=ordered.new_tensor([float("-inf")])) != 0).flatten()
    return ordered[last], hits[last], (last + 1).double(), hits[-1]


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the precision-recall curve as ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds.

    Args:
        scores: any shape, higher means more anomalous.
        labels: the same shape, 1 for anomalous.

    Returns:
        Average precision in ``[0, 1]``; NaN without positives.
    """
    _, true_positives, predicted, positives = precision_recall_curve(scores, labels)
    if positives == 0:
        return float("nan")
    recall_steps = torch.diff(true_positives, prepend=true_positives.new_zeros(1)) / positives
    return float((recall_steps * true_positives / predicted).sum())


def best_dice(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The best Dice of ``scores >= t`` against ``labels`` over every threshold ``t``, and that threshold.

    Args:
        scores: any shape, higher means more anomalous.
        labels: the same shape, 1 for anomalous.

    Returns:
        ``(dice, threshold)``; ``(nan, nan)`` without positives.
    """
    thresholds, true_positives, predicted, positives = precision_recall_curve(scores, labels)
    if positives == 0:
        return float("nan"), float("nan")
    dice = 2.0 * true_positives / (predicted + positives)
    best = int(torch.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of per-image scores (MONAI's ``compute_roc_auc``; ties count one half).

    Args:
        scores: ``[N]``.
        labels: ``[N]``, 1 for anomalous images.

    Returns:
        AUROC in ``[0, 1]``; NaN when only one class is present.
    """
    return float(compute_roc_auc(scores.flatten().double(), labels.flatten().long()))
