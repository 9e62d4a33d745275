"""Operating points chosen on validation data: a fixed number, Youden's J or a sensitivity.

A row is predicted positive iff its probability >= the threshold. Candidate thresholds are the
distinct probabilities themselves: ``sklearn.metrics.roc_curve`` is not used because it drops
intermediate points (``drop_intermediate``) and so can miss the highest threshold that reaches
a sensitivity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medxfer.errors import MedxferError


def choose_threshold(rule: str, y, prob) -> float:
    """``0.5`` (or any number), ``youden`` (the threshold maximising sensitivity +
    specificity - 1; on ties the highest) or ``sens=0.95`` (the highest threshold whose
    sensitivity reaches 0.95), from validation labels ``y`` (NaN: unknown, left out) and
    probabilities ``prob``."""
    if is_fixed(rule):
        return float(rule)
    check_threshold_rule(rule)
    if y is not None and prob is not None:  # unknown entries (NaN) choose nothing
        known = ~np.isnan(np.asarray(y, dtype=np.float64))
        y, prob = np.asarray(y)[known], np.asarray(prob)[known]
    if y is None or prob is None or len(np.unique(y)) < 2:
        raise MedxferError(f"--threshold {rule}: needs a validation split with both classes")
    pos = np.asarray(y) == 1
    cuts, tp, fp = _operating_points(pos, np.asarray(prob, dtype=np.float64))
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if rule == "youden":
        # J = tp / P - fp / N, compared as the integer tp N - fp P so that equal values tie
        # exactly; the first maximum is the highest threshold
        return float(cuts[int(np.argmax(tp * n_neg - fp * n_pos))])
    target = float(rule.removeprefix("sens="))
    return float(cuts[int(np.flatnonzero(tp / n_pos >= target)[0])])


def choose_thresholds(rule: str, y, prob, labels: Sequence[str]) -> np.ndarray:
    """One threshold per label of multi-label targets ``y`` (N, L): ``choose_threshold`` on
    each column."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=np.float64)
    if y.ndim != 2 or y.shape != prob.shape or y.shape[1] != len(labels):
        raise MedxferError(
            f"--threshold {rule}: targets {y.shape} and probabilities {prob.shape} must both be"
            f" (N, {len(labels)})"
        )
    out = np.empty(len(labels))
    for j, name in enumerate(labels):
        try:
            out[j] = choose_threshold(rule, y[:, j], prob[:, j])
        except MedxferError as error:
            raise MedxferError(f"label {name}: {error}") from None
    return out


def is_fixed(rule: str) -> bool:
    """A rule that is a number: it needs no validation data."""
    try:
        float(rule)
    except ValueError:
        return False
    return True


def check_threshold_rule(rule: str) -> None:
    """Refuse a ``--threshold`` that ``choose_threshold`` would not understand."""
    try:
        if rule == "youden" or 0 < float(rule.removeprefix("sens=")) <= 1:
            return
    except ValueError:
        pass
    raise MedxferError(f"--threshold {rule!r}: use a number in (0, 1], 'youden' or 'sens=0.95'")


def _operating_points(pos: np.ndarray, prob: np.ndarray):
    """Distinct probabilities in decreasing order with the true and false positive counts of
    the rule ``prob >= cut`` at each."""
    cuts, inverse = np.unique(prob, return_inverse=True)
    cuts, inverse = cuts[::-1], len(cuts) - 1 - inverse.reshape(-1)
    tp = np.cumsum(np.bincount(inverse[pos], minlength=len(cuts)))
    fp = np.cumsum(np.bincount(inverse[~pos], minlength=len(cuts)))
    return cuts, tp, fp
