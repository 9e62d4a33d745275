"""Probability calibration: expected calibration error, reliability diagram, temperature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width bins over the positive-class probability: the mean, weighted by
    bin size, of |fraction of positives - mean predicted probability|."""
    y, prob = np.asarray(y, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(y[mask].mean() - prob[mask].mean())
    return float(total / len(y))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 minimising the BCE of sigmoid(logits / T) (Guo et al. 2017)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    t = torch.as_tensor(y, dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def reliability_diagram(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 15
) -> None:
    """Plot observed frequency against predicted probability for each (y, prob) curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls=":", label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for name, (y, prob) in curves.items():
        which = np.minimum((prob * bins).astype(int), bins - 1)
        xs, ys = [], []
        for b in range(bins):
            mask = which == b
            if mask.any():
                xs.append(prob[mask].mean())
                ys.append(y[mask].mean())
        ece = expected_calibration_error(y, prob, bins)
        ax.plot(xs, ys, "o-", label=f"{name} (ECE {ece:.3f})")
    ax.set_xticks(edges[::3])
    ax.set_xlabel("predicted probability of the positive class")
    ax.set_ylabel("observed fraction of positives")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=150)
    plt.close(fig)
