"""Which images a similarity measurement uses: a seeded random sample, stratified by class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METHOD = (
    "seeded random sample without replacement (numpy default_rng); medical images stratified "
    "by class with proportional allocation by largest remainder, at least one per class"
)


def stratified_sample(labels: Sequence[str], n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a random sample of ``n`` items (all when ``n`` is None or too large).

    Each class gets its proportional share of ``n`` (floors, then largest remainders), and at
    least one item whenever ``n`` is at least the number of classes. Written here because
    scikit-learn's stratified splitters can give a small class no item at all.
    """
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / counts.sum()
    take = np.floor(quota).astype(int)
    by_remainder = np.argsort(-(quota - take), kind="stable")
    take[by_remainder[: n - take.sum()]] += 1
    if n >= len(classes):
        for empty in np.flatnonzero(take == 0):
            take[np.argmax(take)] -= 1
            take[empty] = 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen))
