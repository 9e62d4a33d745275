"""Figures of a run that are not part of a study report: the reliability diagram."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medxfer.evaluation.calibration import BINS, expected_calibration_error, reliability_bins


def reliability_diagram(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = BINS
) -> None:
    """Plot observed frequency against predicted probability for each (y, prob) curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls=":", label="perfect calibration")
    for name, (y, prob) in curves.items():
        mean_prob, observed, _ = reliability_bins(y, prob, bins)
        ece = expected_calibration_error(y, prob, bins)
        ax.plot(mean_prob, observed, "o-", label=f"{name} (ECE {ece:.3f})")
    ax.set_xticks(np.linspace(0, 1, bins + 1)[::3])
    ax.set_xlabel("predicted probability of the positive class")
    ax.set_ylabel("observed fraction of positives")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=150)
    plt.close(fig)
