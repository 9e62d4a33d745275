"""Percentile bootstrap intervals, resampling whole patients when patient ids are known.

Images of one patient are not independent: resampling images as if they were makes intervals
too narrow. With ``groups`` (a patient id per row) every resample draws patients with
replacement and takes all their rows (cluster bootstrap); without, it draws rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import SCALAR_METRICS, binary_metrics

Score = Callable[[np.ndarray], dict[str, float | None]]


def resample_rows(n: int, *, groups=None, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each bootstrap resample of ``n`` rows: ``resamples`` draws of as many
    clusters as there are, with replacement. Clusters are the distinct ``groups`` in sorted
    order, or single rows without ``groups``; either way draw ``r`` takes cluster indices
    ``rng.integers(0, clusters, clusters)`` from ``numpy.random.default_rng(seed)``."""
    starts, sizes, order = _clusters(n, groups)
    clusters = len(sizes)
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        picks = rng.integers(0, clusters, clusters)
        if groups is None:
            yield picks
            continue
        size = sizes[picks]
        # the rows of each picked cluster, concatenated: offsets into ``order``
        first = np.repeat(starts[picks] - (np.cumsum(size) - size), size)
        yield order[first + np.arange(size.sum())]


def bootstrap_intervals(
    score: Score,
    n: int,
    *,
    groups=None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Percentile intervals of every metric that ``score(rows)`` returns for resamples of
    ``n`` rows (whole patients with ``groups``). Resamples where a metric is None (say, one
    class only) are left out for it; ``used`` records how many counted where fewer did. With one
    cluster (one patient, or one image) there is no interval: every resample is the sample."""
    samples = draw(score, n, groups=groups, resamples=resamples, seed=seed)
    return summarize(samples, n, groups=groups, resamples=resamples, level=level)


def binary_intervals(
    y, prob, threshold: float, *, groups=None, resamples: int = 1000, seed: int = 0
) -> dict:
    """``bootstrap_intervals`` of the scalar ``binary_metrics`` at ``threshold`` (95%)."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=np.float64)

    def score(rows: np.ndarray) -> dict[str, float | None]:
        m = binary_metrics(y[rows], prob[rows], threshold)
        return {k: m[k] for k in SCALAR_METRICS}

    return bootstrap_intervals(score, len(y), groups=groups, resamples=resamples, seed=seed)


def draw(score: Score, n: int, *, groups=None, resamples: int, seed: int) -> dict[str, np.ndarray]:
    """The defined values of each metric of ``score`` over the resamples of ``resample_rows``."""
    if resamples < 1:
        raise MedxferError(f"bootstrap: resamples must be at least 1, not {resamples}")
    values: dict[str, list[float]] = {}
    for rows in resample_rows(n, groups=groups, resamples=resamples, seed=seed):
        for key, value in score(rows).items():
            values.setdefault(key, [])
            if value is not None:
                values[key].append(value)
    return {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}


def summarize(
    samples: dict[str, np.ndarray], n: int, *, groups, resamples: int, level: float
) -> dict:
    """Percentile intervals of ``draw``'s samples, with how they were resampled."""
    if not 0 < level < 1:
        raise MedxferError(f"bootstrap: level must be in (0, 1), not {level}")
    alpha = (1 - level) / 2
    clusters = n if groups is None else len(np.unique(np.asarray(groups)))
    result = {
        "method": "image bootstrap" if groups is None else "patient-cluster bootstrap",
        "clusters": clusters,
        "resamples": resamples,
        "level": level,
        "intervals": {
            # one cluster: every resample is the sample itself, a zero-width false certainty
            k: [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))]
            if len(v) and clusters > 1
            else None
            for k, v in samples.items()
        },
    }
    used = {k: len(v) for k, v in samples.items() if len(v) < resamples}
    if used:
        result["used"] = used
    return result


def _clusters(n: int, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, size) of each cluster's rows within ``order``, the rows sorted by cluster."""
    if n < 1:
        raise MedxferError("bootstrap: no rows to resample")
    if groups is None:
        return np.arange(n), np.ones(n, dtype=np.int64), np.arange(n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise MedxferError(f"bootstrap: {groups.size} patient ids for {n} rows")
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    starts = np.cumsum(sizes) - sizes
    return starts, sizes, order
