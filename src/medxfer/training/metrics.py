"""Binary classification metrics (scikit-learn), bootstrap intervals and operating points."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from medxfer.errors import MedxferError

SCALAR_METRICS = (
    "loss",
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "gmean",
    "roc_auc",
    "average_precision",
)


def binary_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict:
    """Metrics of probabilities ``prob`` for labels ``y`` (1 = positive) at ``threshold``.

    Degenerate cases have defined values: precision is 0 when nothing is predicted positive,
    ROC AUC and average precision are None when ``y`` holds one class only.
    """
    y = np.asarray(y, dtype=np.int64)
    prob = np.clip(np.asarray(prob, dtype=np.float64), 1e-7, 1 - 1e-7)
    pred = (prob >= threshold).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    recall = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    precision = _ratio(tp, tp + fp)
    both = len(np.unique(y)) == 2
    return {
        "loss": float(log_loss(y, prob, labels=[0, 1])),
        "accuracy": _ratio(tp + tn, len(y)),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "gmean": math.sqrt(recall * specificity),
        "roc_auc": float(roc_auc_score(y, prob)) if both else None,
        "average_precision": float(average_precision_score(y, prob)) if both else None,
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
        "threshold": float(threshold),
        "n": len(y),
    }


def bootstrap_ci(
    y: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float | None]]:
    """Percentile bootstrap interval of every scalar metric (resampling images)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    samples: dict[str, list[float]] = {k: [] for k in SCALAR_METRICS}
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        m = binary_metrics(y[idx], prob[idx], threshold)
        for k in SCALAR_METRICS:
            if m[k] is not None:
                samples[k].append(m[k])
    alpha = (1 - level) / 2
    return {
        k: ([float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] if v else None)
        for k, v in samples.items()
    }


def choose_threshold(rule: str, y: np.ndarray | None, prob: np.ndarray | None) -> float:
    """``0.5`` (or any number), ``youden`` (max sensitivity + specificity - 1) or
    ``sens=0.95`` (the highest threshold whose sensitivity reaches 0.95), on validation data."""
    try:
        return float(rule)
    except ValueError:
        pass
    if y is None or prob is None or len(np.unique(y)) < 2:
        raise MedxferError(f"--threshold {rule}: needs a validation split with both classes")
    fpr, tpr, thresholds = roc_curve(y, prob)
    thresholds = np.clip(thresholds, 0.0, 1.0)
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if rule.startswith("sens="):
        target = float(rule[5:])
        reach = np.flatnonzero(tpr >= target)
        return float(thresholds[reach[0]])
    raise MedxferError(f"--threshold {rule!r}: use a number, 'youden' or 'sens=0.95'")


def check_threshold_rule(rule: str) -> None:
    """Refuse a ``--threshold`` that ``choose_threshold`` would not understand."""
    try:
        if rule == "youden" or 0 < float(rule.removeprefix("sens=")) <= 1:
            return
    except ValueError:
        pass
    raise MedxferError(f"--threshold {rule!r}: use a number in (0, 1], 'youden' or 'sens=0.95'")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0
