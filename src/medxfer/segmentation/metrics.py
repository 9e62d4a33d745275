"""Segmentation metrics per image and over a set: Dice, IoU, pixel accuracy, HD95.

Per image, Dice and IoU are computed per foreground class and averaged over the classes.
Empty masks: when a class is absent from both prediction and truth its Dice and IoU are 1 and
its HD95 is 0 (nothing to find, nothing found); when it is absent from exactly one of them
Dice and IoU are 0 and HD95 is undefined (NaN: no surface to measure a distance to). HD95 is
MONAI's ``compute_hausdorff_distance`` at the 95th percentile (symmetric: the larger of the
two directed percentiles), in pixels of the working resolution.

Over a set: the mean of the per-image values with a 95% percentile bootstrap interval from
``medxfer.evaluation.intervals`` (the one bootstrap of the project): whole patients are
resampled when patient ids are known, images otherwise (lung_seg has one image per patient).
HD95's mean is over the images where it is defined; ``hd95_undefined`` counts the others.
Two runs on the same images are compared by ``paired_segmentation``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from medxfer.errors import MedxferError
from medxfer.evaluation.intervals import bootstrap_intervals
from medxfer.evaluation.paired import holm, paired_bootstrap

METRICS = ("dice", "iou", "pixel_accuracy", "hd95")
PRIMARY = "dice"  # the metric two runs are compared on first


def per_image(
    pred: torch.Tensor, truth: torch.Tensor, num_classes: int, *, hd95: bool = True
) -> dict[str, np.ndarray]:
    """``pred``, ``truth``: class indices (N, H, W). Returns each metric as an array (N,)
    (HD95 only if asked: it is the slow one)."""
    pred, truth = pred.long().cpu(), truth.long().cpu()
    p = F.one_hot(pred, num_classes).permute(0, 3, 1, 2)[:, 1:]  # (N, K-1, H, W), foreground
    t = F.one_hot(truth, num_classes).permute(0, 3, 1, 2)[:, 1:]
    inter = (p & t).sum(dim=(2, 3)).double()
    p_sum, t_sum = p.sum(dim=(2, 3)).double(), t.sum(dim=(2, 3)).double()
    union = p_sum + t_sum - inter
    both_empty = (p_sum == 0) & (t_sum == 0)
    one_empty = (p_sum == 0) ^ (t_sum == 0)
    dice = torch.where(both_empty, 1.0, 2 * inter / (p_sum + t_sum).clamp(min=1))
    iou = torch.where(both_empty, 1.0, inter / union.clamp(min=1))
    rows = {
        "dice": dice.mean(dim=1).numpy(),
        "iou": iou.mean(dim=1).numpy(),
        "pixel_accuracy": (pred == truth).double().mean(dim=(1, 2)).numpy(),
    }
    if hd95:
        dist = torch.where(both_empty, 0.0, torch.where(one_empty, float("nan"), _hd95(p, t)))
        rows["hd95"] = _nanmean_rows(dist.numpy())
    return rows


def summarize(
    rows: Mapping[str, ArrayLike],
    *,
    groups: ArrayLike | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Mean of each per-image metric (HD95's over the images where it is defined) and, unless
    ``resamples`` is 0, ``ci95``: 95% percentile intervals of those means from
    ``medxfer.evaluation.intervals.bootstrap_intervals`` (whole patients with ``groups``, a
    patient id per image), described by ``interval_method`` as in classification's metrics."""
    values = metric_arrays(rows)
    out: dict = {"images": len(values["dice"])}
    out.update({name: _finite_mean(v) for name, v in values.items()})
    if "hd95" in values:
        out["hd95_undefined"] = int(np.sum(~np.isfinite(values["hd95"])))
    if resamples:

        def score(picked: np.ndarray) -> dict[str, float | None]:
            return {name: _finite_mean(v[picked], empty=None) for name, v in values.items()}

        result = bootstrap_intervals(
            score, out["images"], groups=groups, resamples=resamples, seed=seed
        )
        out["ci95"] = result.pop("intervals")
        out["interval_method"] = result
    return out


def paired_segmentation(
    rows_a: Mapping[str, ArrayLike],
    rows_b: Mapping[str, ArrayLike],
    *,
    groups: ArrayLike | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """Run b against run a on the same test images in the same order: one row per metric with
    the means (``value_a``, ``value_b``), ``diff`` = b - a, a paired bootstrap interval of the
    mean difference (whole patients with ``groups``), ``p_value`` and ``p_adjusted``.

    Dice, the primary metric, is tested with the Wilcoxon signed-rank test (two-sided) on the
    paired differences, which uses every image rather than a resampled mean. Images of one
    patient are not independent, so with ``groups`` the test takes one difference per patient
    (the mean over its images) instead of one per image. The other metrics take the paired
    bootstrap's p-value, Holm-adjusted among themselves; Dice keeps its own. HD95 counts only
    the images where both runs have a finite value (``note`` says how many)."""
    a, b = metric_arrays(rows_a), metric_arrays(rows_b)
    n = len(a["dice"])
    if len(b["dice"]) != n:
        raise MedxferError(
            f"paired segmentation: {n} and {len(b['dice'])} images; both runs must score the"
            " same test images in the same order"
        )
    if groups is not None and np.shape(groups) != (n,):
        raise MedxferError(f"paired segmentation: {np.size(groups)} patient ids for {n} images")
    names = [name for name in METRICS if name in a and name in b]

    def score(picked: np.ndarray) -> dict[str, float | None]:
        return {name: _mean_difference(a[name][picked], b[name][picked]) for name in names}

    boot = (
        paired_bootstrap(score, n, groups=groups, resamples=resamples, seed=seed)
        if resamples
        else None
    )
    rows = [_paired_row(name, (a[name], b[name]), boot, groups) for name in names]
    family = [r for r in rows if not r["primary"] and r["p_value"] is not None]
    for row, adjusted in zip(family, holm([r["p_value"] for r in family]), strict=True):
        row["p_adjusted"] = float(adjusted)
    return rows


def signed_rank_p(differences: np.ndarray, groups: ArrayLike | None = None) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired ``differences`` (scipy's defaults:
    zero differences dropped), on per-patient mean differences with ``groups``. No non-zero
    difference at all is no evidence of one: 1."""
    from scipy.stats import wilcoxon

    differences = np.asarray(differences, dtype=np.float64)
    if groups is not None:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        inverse = inverse.reshape(-1)
        differences = np.bincount(inverse, weights=differences) / np.bincount(inverse)
    if not np.any(differences != 0):
        return 1.0
    return float(wilcoxon(differences).pvalue)


def metric_arrays(rows: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """The metrics of ``METRICS`` that ``rows`` holds, as float arrays of one length."""
    values = {k: np.asarray(rows[k], dtype=np.float64).reshape(-1) for k in METRICS if k in rows}
    if "dice" not in values:
        raise MedxferError(f"segmentation rows: no 'dice' (have {', '.join(rows)})")
    lengths = {k: len(v) for k, v in values.items()}
    if len(set(lengths.values())) > 1 or not lengths["dice"]:
        raise MedxferError(f"segmentation rows: need one value per image of each, got {lengths}")
    return values


def _paired_row(name: str, pair: tuple[np.ndarray, np.ndarray], boot: dict | None, groups) -> dict:
    """One metric's row of ``paired_segmentation`` (``p_adjusted`` is the caller's)."""
    a, b = pair
    both = np.isfinite(a) & np.isfinite(b)
    primary = name == PRIMARY
    value_a, value_b = _finite_mean(a[both], empty=None), _finite_mean(b[both], empty=None)
    interval = (boot["intervals"].get(name) if boot else None) or (None, None)
    if primary:
        p_value = signed_rank_p(b - a, groups)
        test = "Wilcoxon signed-rank" + (" on patient means" if groups is not None else "")
    else:
        p_value = boot["p_values"].get(name) if boot else None
        p_value = None if p_value is None else float(p_value)
        test = "paired bootstrap" if boot else None
    return {
        "metric": name,
        "primary": primary,
        "value_a": value_a,
        "value_b": value_b,
        "diff": None if value_a is None else value_b - value_a,
        "ci_low": interval[0],
        "ci_high": interval[1],
        "p_value": p_value,
        "test": test,
        "interval": f"{boot['method']}, {boot['resamples']} resamples" if boot else None,
        "p_adjusted": p_value if primary else None,
        "note": (
            f"HD95 over the {int(both.sum())} of {len(a)} images where both runs have a finite"
            " value"
            if name == "hd95"
            else None
        ),
    }


def _mean_difference(a: np.ndarray, b: np.ndarray) -> float | None:
    """mean(b) - mean(a) over the images where both are finite; None where there are none."""
    both = np.isfinite(a) & np.isfinite(b)
    return float(b[both].mean() - a[both].mean()) if both.any() else None


def _finite_mean(values: np.ndarray, empty: float | None = float("nan")) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else empty


def _hd95(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():  # MONAI warns on empty masks (handled by the caller) and
        warnings.simplefilter("ignore")  # on an argument it deprecates internally
        return compute_hausdorff_distance(
            p.float(), t.float(), include_background=True, percentile=95
        ).double()


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=1)
    count = finite.sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
