"""Calibration: reliability bins, expected calibration error, temperature scaling.

Binary models are judged on the positive-class probability, multi-class models on the
top label (the probability of the argmax class against whether the argmax is right).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from medxfer.errors import MedxferError

BINS = 15


def reliability_bins(y, prob, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width bin of ``prob`` in [0, 1]: mean predicted probability,
    observed fraction of ``y == 1`` and row count (probability 1 falls in the last bin)."""
    y, prob = np.asarray(y, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    which = np.clip((prob * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    used = count > 0
    mean_prob = np.bincount(which, weights=prob, minlength=bins)[used] / count[used]
    observed = np.bincount(which, weights=y, minlength=bins)[used] / count[used]
    return mean_prob, observed, count[used]


def expected_calibration_error(y, prob, bins: int = BINS) -> float:
    """ECE over the positive-class probability: the mean, weighted by bin size, of
    |fraction of positives - mean predicted probability| over ``bins`` equal-width bins."""
    mean_prob, observed, count = reliability_bins(y, prob, bins)
    return float(np.sum(count * np.abs(observed - mean_prob)) / np.sum(count))


def top_label_ece(y, prob, bins: int = BINS) -> float:
    """Top-label ECE of class probabilities ``prob`` (N, K) for labels ``y``: bins of the
    highest probability, accuracy of the argmax class in each bin."""
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2 or len(prob) != len(y):
        raise MedxferError(
            f"top-label ECE: probabilities of shape {prob.shape} for {len(y)} labels"
        )
    correct = prob.argmax(axis=1) == np.asarray(y)
    return expected_calibration_error(correct, prob.max(axis=1), bins)


def fit_temperature(logits, y) -> float:
    """The temperature T > 0 minimising the validation log-loss of ``logits / T`` (Guo et al.
    2017): sigmoid of one logit per row for 1-D ``logits`` with 0/1 ``y``, softmax for (N, K)
    ``logits`` with class indices ``y``. Searched over log T in [-5, 5]."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if z.ndim not in (1, 2) or len(z) != len(y) or len(y) == 0:
        raise MedxferError(f"temperature: logits of shape {z.shape} for {len(y)} labels")
    loss = _binary_nll if z.ndim == 1 else _softmax_nll
    best = minimize_scalar(
        lambda log_t: loss(z / np.exp(log_t), y),
        bounds=(-5.0, 5.0),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(best.x))


def _binary_nll(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _softmax_nll(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(len(y)), y]))
