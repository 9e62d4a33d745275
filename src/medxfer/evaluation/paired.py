"""Paired comparisons of two models scored on the same test rows.

DeLong's test is written here (Sun & Xu 2014, midrank form) because neither scipy,
scikit-learn nor statsmodels provides it, and the few small packages that do are not
maintained libraries; it is checked against brute-force structural components and a
permutation test.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest, norm, rankdata

from medxfer.errors import MedxferError
from medxfer.evaluation.intervals import Score, draw, summarize
from medxfer.evaluation.metrics import SCALAR_METRICS, binary_metrics


def structural_components(y, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeLong's structural components of the AUCs of ``scores`` (k models, N rows) for 0/1
    labels ``y``: the AUCs (k,), V10 (k, positives): for each positive the fraction of
    negatives it outranks (ties one half), and V01 (k, negatives): for each negative the
    fraction of positives that outrank it. Midranks make this O(N log N) (Sun & Xu 2014)."""
    pos = np.asarray(y).reshape(-1) == 1
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n = int(pos.sum()), int((~pos).sum())
    if m == 0 or n == 0 or scores.shape[1] != len(pos):
        raise MedxferError(
            f"DeLong: needs both classes and one score per row ({m} positives, {n} negatives,"
            f" scores of shape {scores.shape})"
        )
    x, z = scores[:, pos], scores[:, ~pos]
    rank_all = rankdata(np.concatenate([x, z], axis=1), axis=1)
    v10 = (rank_all[:, :m] - rankdata(x, axis=1)) / n
    v01 = 1.0 - (rank_all[:, m:] - rankdata(z, axis=1)) / m
    return v10.mean(axis=1), v10, v01


def delong_covariance(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """The AUCs of ``scores`` (k, N) and DeLong's estimate of their (k, k) covariance,
    S10 / m + S01 / n with S10, S01 the sample covariances of the structural components."""
    aucs, v10, v01 = structural_components(y, scores)
    if min(v10.shape[1], v01.shape[1]) < 2:  # one positive or one negative: no variance
        return aucs, np.full((len(aucs), len(aucs)), np.nan)
    cov = np.atleast_2d(np.cov(v10)) / v10.shape[1] + np.atleast_2d(np.cov(v01)) / v01.shape[1]
    return aucs, cov


def delong_test(y, score_a, score_b) -> dict:
    """DeLong's test that two correlated ROC AUCs on the same rows are equal: ``diff`` is
    AUC(b) - AUC(a), ``se`` its standard error, ``z`` = diff / se, two-sided ``p_value``.

    Without an estimated variance (one positive or one negative, or every structural component
    constant, say a perfect model against a constant one on four images) the test says
    nothing: ``p_value`` is 1 for equal AUCs and NaN (undefined) otherwise, never 0."""
    (auc_a, auc_b), cov = delong_covariance(y, np.stack([score_a, score_b]))
    diff = float(auc_b - auc_a)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    se = math.sqrt(max(variance, 0.0)) if np.isfinite(variance) else math.nan
    if se > 0:
        z = diff / se
        p_value = float(2 * norm.sf(abs(z)))
    else:
        z, p_value = (0.0, 1.0) if diff == 0 else (math.nan, math.nan)
    return {
        "auc_a": float(auc_a),
        "auc_b": float(auc_b),
        "diff": diff,
        "se": se,
        "z": z,
        "p_value": p_value,
    }


def mcnemar_exact(correct_a, correct_b) -> dict:
    """Exact two-sided McNemar test on paired correctness: ``b`` rows only model a got right,
    ``c`` rows only model b got right; binomial test of b out of b + c at one half."""
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise MedxferError(f"McNemar: {a.size} and {b_.size} paired results differ in length")
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"b": b, "c": c, "p_value": float(p)}


def paired_bootstrap(
    score: Score,
    n: int,
    *,
    groups=None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Bootstrap of metric differences: ``score(rows)`` returns, for one resample of the shared
    test rows, b - a of every metric. Resampling as in ``bootstrap_intervals`` (whole
    patients with ``groups``). Adds ``p_values``: a two-sided test of no difference (see
    ``_two_sided``)."""
    samples = draw(score, n, groups=groups, resamples=resamples, seed=seed)
    result = summarize(samples, n, groups=groups, resamples=resamples, level=level)
    result["p_values"] = {
        k: _two_sided(v) if len(v) and result["clusters"] > 1 else None for k, v in samples.items()
    }
    return result


def _two_sided(samples: np.ndarray) -> float:
    """Twice the smaller share of resamples on either side of 0, each counted as
    (1 + count) / (B + 1) (Davison & Hinkley 1997): never 0, because B resamples cannot show
    a p-value below about 2 / B; identical runs (every difference 0) give 1."""
    b = len(samples)
    below, above = (1 + np.sum(samples <= 0)) / (b + 1), (1 + np.sum(samples >= 0)) / (b + 1)
    return float(min(1.0, 2 * min(below, above)))


def binary_differences(y, prob_a, prob_b, thresholds: tuple[float, float] = (0.5, 0.5)) -> Score:
    """A ``score`` for ``paired_bootstrap``: b - a of every scalar ``binary_metrics`` on the
    resampled rows (None where either is undefined), each model at its own threshold."""
    y, prob_a, prob_b = np.asarray(y), np.asarray(prob_a), np.asarray(prob_b)

    def score(rows: np.ndarray) -> dict[str, float | None]:
        ma = binary_metrics(y[rows], prob_a[rows], thresholds[0])
        mb = binary_metrics(y[rows], prob_b[rows], thresholds[1])
        return {
            k: None if ma[k] is None or mb[k] is None else mb[k] - ma[k] for k in SCALAR_METRICS
        }

    return score


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order: the i-th smallest is multiplied
    by (m - i + 1), made non-decreasing in that order, and capped at 1."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    if np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise MedxferError(f"Holm: p-values must lie in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def minus(b, a) -> float | None:
    """``b - a``, or None where either is missing (None or NaN): an undefined difference."""
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return None
    if isinstance(b, float) and math.isnan(b):
        return None
    return float(b) - float(a)
