"""Segmentation metrics per image and over a set: Dice, IoU, pixel accuracy, HD95.

Per image, Dice and IoU are computed per foreground class and averaged over the classes.
Empty masks: when a class is absent from both prediction and truth its Dice and IoU are 1 and
its HD95 is 0 (nothing to find, nothing found); when it is absent from exactly one of them
Dice and IoU are 0 and HD95 is undefined (NaN: no surface to measure a distance to). HD95 is
MONAI's ``compute_hausdorff_distance`` at the 95th percentile (symmetric: the larger of the
two directed percentiles), in pixels of the working resolution.

Over a set: the mean of the per-image values with a 95% percentile bootstrap interval over
images (one image per patient in lung_seg, so images are the independent units). HD95's mean
is over the images where it is defined; ``hd95_undefined`` counts the others.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("dice", "iou", "pixel_accuracy", "hd95")


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


def summarize(rows: dict[str, np.ndarray], *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean of each per-image metric, with a 95% percentile bootstrap interval over images."""
    from scipy.stats import bootstrap

    out: dict = {"images": len(rows["dice"])}
    intervals = {}
    for name in METRICS:
        values = np.asarray(rows[name], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[name] = float(values.mean()) if len(values) else float("nan")
        if n_resamples and len(values) > 1 and np.ptp(values) > 0:
            res = bootstrap(
                (values,),
                np.mean,
                n_resamples=n_resamples,
                method="percentile",
                rng=np.random.default_rng(seed),
            )
            low, high = res.confidence_interval
            intervals[name] = [float(low), float(high)]
        elif len(values):
            intervals[name] = [out[name], out[name]]
    out["hd95_undefined"] = int(np.sum(~np.isfinite(np.asarray(rows["hd95"], dtype=float))))
    if n_resamples:
        out["ci95"] = intervals
    return out


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
