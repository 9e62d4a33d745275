"""Binary, multi-class and multi-label metrics of predicted probabilities.

Decision rule everywhere: a row is predicted positive iff its probability >= the threshold.
Probabilities are used as given for ranking metrics (ROC AUC, average precision) and for
thresholds; they are clipped to [EPS, 1 - EPS] only inside the logarithm of the loss, since
clipping before ranking would create ties and change the AUC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    confusion_matrix,
    precision_recall_fscore_support,
)

from medxfer.errors import MedxferError

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] inside the log-loss only

TASKS = ("binary", "multiclass", "multilabel")

# The scalar metrics that studies, reports and comparisons show first, per task.
HEADLINE: dict[str, tuple[str, ...]] = {
    # the paper's six, then ranking quality and specificity
    "binary": (
        "loss",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "gmean",
        "roc_auc",
        "average_precision",
        "specificity",
    ),
    "multiclass": ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc"),
    "multilabel": ("macro_roc_auc", "macro_average_precision", "macro_f1"),
    # computed by medxfer.segmentation.metrics and medxfer.detection.metrics
    "segmentation": ("dice", "iou", "pixel_accuracy", "hd95"),
    "detection": ("map_50", "map"),
}

# the one metric that ranks runs of a task (a study's pooled comparison, an ensemble's best
# member)
PRIMARY = {
    "binary": "roc_auc",
    "multiclass": "macro_roc_auc",
    "multilabel": "macro_roc_auc",
    "segmentation": "dice",
    "detection": "map_50",
}

_SCALARS: dict[str, tuple[str, ...]] = {
    "binary": (
        "loss",
        "accuracy",
        "precision",
        "recall",
        "specificity",
        "f1",
        "gmean",
        "roc_auc",
        "average_precision",
    ),
    "multiclass": (
        "loss",
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "macro_roc_auc",
        "weighted_roc_auc",
    ),
    "multilabel": ("loss", "macro_roc_auc", "macro_average_precision", "macro_f1"),
}

SCALAR_METRICS = _SCALARS["binary"]  # every scalar of ``binary_metrics``


def scalar_metrics(task: str) -> tuple[str, ...]:
    """Every top-level scalar (float or None) of the metrics dict of ``task``."""
    _check_task(task)
    return _SCALARS[task]


def task_metrics(
    task: str,
    y,
    prob,
    thresholds=None,
    names: Sequence[str] | None = None,
    *,
    scores=None,
) -> dict:
    """The metrics dict of ``task``: ``binary`` (``thresholds`` one number, default 0.5),
    ``multiclass`` (``names`` the K classes; argmax decides, no threshold) or ``multilabel``
    (``thresholds`` one per label, ``names`` the L labels).

    ``scores`` (same shape as ``prob``), when given, rank the rows for ROC AUC and average
    precision: any order-preserving transform of ``prob`` that does not round, such as logits.
    Probabilities of confident models round to exactly 0 or 1 in float64 (a logit beyond
    about 37, or a small temperature), and those ties would change the AUC."""
    _check_task(task)
    if task == "binary":
        cut = 0.5 if thresholds is None else float(thresholds)
        return binary_metrics(y, prob, cut, scores=scores)
    if names is None:
        raise MedxferError(f"{task} metrics: need the class or label names")
    if task == "multiclass":
        return multiclass_metrics(y, prob, list(names), scores=scores)
    if thresholds is None:
        thresholds = np.full(len(names), 0.5)
    return multilabel_metrics(y, prob, thresholds, list(names), scores=scores)


def roc_auc(y, score) -> float | None:
    """Area under the ROC curve (ties count one half); None unless ``y`` has both classes.

    Computed from midranks (Mann-Whitney U) rather than with scikit-learn because bootstrap
    intervals and paired tests call it thousands of times, where scikit-learn's per-call input
    checks cost ~1 ms. Equal to ``sklearn.metrics.roc_auc_score`` (tested).
    """
    y = np.asarray(y) == 1
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return None
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(y, score) -> float | None:
    """Average precision, sum over distinct thresholds of (recall step) x precision, exactly as
    ``sklearn.metrics.average_precision_score`` (tested) but without its per-call overhead;
    None unless ``y`` has both classes."""
    y = np.asarray(y) == 1
    pos = int(y.sum())
    if pos == 0 or pos == len(y):
        return None
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="stable")
    s = score[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last row of each tie group
    tp = np.cumsum(y[order])[last]
    precision = tp / (last + 1)
    recall_step = np.diff(tp, prepend=0) / pos
    return float(np.sum(recall_step * precision))


def binary_metrics(y, prob, threshold: float = 0.5, *, scores=None) -> dict:
    """Metrics of probabilities ``prob`` for labels ``y`` (1 = positive) at ``threshold``.

    Degenerate cases have defined values: precision, recall, specificity and F1 are 0 when
    their denominator is 0; ROC AUC and average precision are None when ``y`` holds one class.
    Counted with numpy rather than scikit-learn for speed (bootstrap resamples call it
    thousands of times); every value is tested against scikit-learn.
    """
    y, prob = _binary_inputs(y, prob)
    rank = prob if scores is None else np.asarray(scores, dtype=np.float64)
    pred = prob >= threshold
    pos = y == 1
    tp, fn = int(np.sum(pred & pos)), int(np.sum(~pred & pos))
    fp, tn = int(np.sum(pred & ~pos)), int(np.sum(~pred & ~pos))
    recall, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    precision = _ratio(tp, tp + fp)
    return {
        "loss": _binary_log_loss(y, prob),
        "accuracy": _ratio(tp + tn, len(y)),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "gmean": math.sqrt(recall * specificity),
        "roc_auc": roc_auc(y, rank),
        "average_precision": average_precision(y, rank),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
        "n": len(y),
    }


def multiclass_metrics(y, prob, classes: list[str], *, scores=None) -> dict:
    """Metrics of class probabilities ``prob`` (N, K) for labels ``y`` in 0..K-1; the predicted
    class is the argmax. One-vs-rest ROC AUC per class is None where the class is absent or
    alone; the macro and prevalence-weighted means run over the classes where it is defined."""
    y, prob = _multiclass_inputs(y, prob, classes)
    k = len(classes)
    pred = prob.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=range(k), zero_division=0
    )
    rank = prob if scores is None else np.asarray(scores, dtype=np.float64)
    aucs = [roc_auc(y == c, rank[:, c]) for c in range(k)]
    defined = [c for c in range(k) if aucs[c] is not None]
    weights = support[defined]
    return {
        "loss": float(-np.mean(np.log(np.clip(prob[np.arange(len(y)), y], EPS, 1.0)))),
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(np.mean(recall[support > 0])),  # over classes present
        "macro_f1": float(np.mean(f1)),
        "macro_roc_auc": float(np.mean([aucs[c] for c in defined])) if defined else None,
        "weighted_roc_auc": (
            float(np.average([aucs[c] for c in defined], weights=weights)) if defined else None
        ),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "roc_auc": aucs[c],
                "support": int(support[c]),
            }
            for c, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=range(k)).tolist(),
        "n": len(y),
    }


def multilabel_metrics(y, prob, thresholds, labels: list[str], *, scores=None) -> dict:
    """Metrics of per-label probabilities ``prob`` (N, L) for 0/1 targets ``y`` (N, L), each
    label at its own threshold. NaN targets are unknown entries: each label is scored on its
    known rows, and the loss is the mean over known entries. A label's ROC AUC and average
    precision are None unless it has both values; its F1 is None when it has no positives and
    none are predicted. The macro means run over the labels where the metric is defined."""
    y, prob = _multilabel_inputs(y, prob, labels)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thresholds.shape != (len(labels),):
        raise MedxferError(
            f"multilabel metrics: {len(thresholds)} thresholds for {len(labels)} labels"
        )
    rank = prob if scores is None else np.asarray(scores, dtype=np.float64)
    known = ~np.isnan(y)
    per_label = {
        name: _label_metrics(y[k, j], prob[k, j], thresholds[j], rank[k, j])
        for j, name in enumerate(labels)
        for k in [known[:, j]]
    }
    clipped = np.clip(prob, EPS, 1 - EPS)[known]
    entries = y[known]
    loss = None  # a bootstrap resample may hold no known entry
    if known.any():
        loss = -float(np.mean(entries * np.log(clipped) + (1 - entries) * np.log1p(-clipped)))
    return {
        "loss": loss,
        "macro_roc_auc": _mean_defined(per_label, "roc_auc"),
        "macro_average_precision": _mean_defined(per_label, "average_precision"),
        "macro_f1": _mean_defined(per_label, "f1"),
        "per_label": per_label,
        "n": len(y),
    }


def _label_metrics(y: np.ndarray, prob: np.ndarray, threshold: float, rank: np.ndarray) -> dict:
    if not len(y):  # no known entry of this label: nothing to score
        empty = ("roc_auc", "average_precision", "f1", "precision", "recall")
        return {**dict.fromkeys(empty), "threshold": float(threshold), "support": 0}
    pred = prob >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp, fn = int(np.sum(pred)) - tp, int(np.sum(y == 1)) - tp
    return {
        "roc_auc": roc_auc(y, rank),
        "average_precision": average_precision(y, rank),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if tp + fp + fn else None,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "threshold": float(threshold),
        "support": tp + fn,
    }


def _mean_defined(per_label: dict[str, dict], key: str) -> float | None:
    values = [m[key] for m in per_label.values() if m[key] is not None]
    return float(np.mean(values)) if values else None


def _binary_log_loss(y: np.ndarray, prob: np.ndarray) -> float:
    clipped = np.clip(prob, EPS, 1 - EPS)
    return float(-np.mean(np.where(y == 1, np.log(clipped), np.log1p(-clipped))))


def _binary_inputs(y, prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1).astype(np.int64)
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y.shape != prob.shape:
        raise MedxferError(f"binary metrics: {len(y)} labels but {len(prob)} probabilities")
    if len(y) == 0:
        raise MedxferError("binary metrics: no rows to score")
    return y, prob


def _multiclass_inputs(y, prob, classes) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1).astype(np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    k = len(classes)
    if prob.ndim != 2 or prob.shape != (len(y), k):
        raise MedxferError(
            f"multiclass metrics: probabilities of shape {prob.shape}, expected ({len(y)}, {k})"
        )
    if len(y) == 0 or y.min() < 0 or y.max() >= k:
        raise MedxferError(f"multiclass metrics: labels must be in 0..{k - 1} (and not empty)")
    return y, prob


def _multilabel_inputs(y, prob, labels) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    if y.ndim != 2 or y.shape != prob.shape or y.shape[1] != len(labels) or len(y) == 0:
        raise MedxferError(
            f"multilabel metrics: targets {y.shape} and probabilities {prob.shape} must both be"
            f" (N, {len(labels)}) with N > 0"
        )
    if not (np.isin(y, (0, 1)) | np.isnan(y)).all():
        raise MedxferError("multilabel metrics: targets must be 0, 1 or NaN (unknown)")
    return y, prob


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise MedxferError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0
