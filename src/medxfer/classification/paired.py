"""Paired comparison of two classification runs scored on the same test images: what
``medxfer.study.compare`` asks this family for (``ClassificationFamily.paired``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import HEADLINE, task_metrics
from medxfer.evaluation.paired import delong_test, mcnemar_exact, minus, paired_bootstrap
from medxfer.storage.folder import RunFolder, known_patients


@dataclass(frozen=True)
class Side:
    """One run's test rows, in the row order shared with the run it is compared with."""

    y: np.ndarray
    prob: np.ndarray
    cut: float | np.ndarray | None  # binary: one threshold; multilabel: one per label
    classes: list[str]
    score: np.ndarray  # ranking scores (logits; probabilities for runs that stored none)


def paired_rows(folders: tuple[RunFolder, RunFolder], resamples: int, seed: int) -> list[dict]:
    """Run b against run a on the same test images: per headline metric the values, the
    difference with a paired bootstrap interval over patients, and a p-value (DeLong for
    binary ROC AUC, exact McNemar for accuracy, the paired bootstrap otherwise)."""
    (side_a, side_b), patients = _align(*folders)
    task = folders[0].read_metrics().get("task", "binary")
    values_a, values_b = (_metrics(task, s) for s in (side_a, side_b))
    boot = (
        paired_bootstrap(
            _difference(task, side_a, side_b),
            len(side_a.y),
            groups=patients,
            resamples=resamples,
            seed=seed,
        )
        if resamples
        else None
    )
    rows = []
    for metric in HEADLINE[task]:
        p_value, test = _p_value(task, metric, (side_a, side_b), boot)
        interval = (boot["intervals"].get(metric) if boot else None) or (None, None)
        rows.append(
            {
                "metric": metric,
                "value_a": values_a[metric],
                "value_b": values_b[metric],
                "diff": minus(values_b[metric], values_a[metric]),
                "ci_low": interval[0],
                "ci_high": interval[1],
                "p_value": p_value,
                "test": test,
                "interval": f"{boot['method']}, {resamples} resamples" if boot else None,
            }
        )
    return rows


def _align(a: RunFolder, b: RunFolder) -> tuple[tuple[Side, Side], np.ndarray | None]:
    """Both runs' test rows in one order (matched by ``file``), or one line saying why they
    cannot be paired."""
    pa, pb = a.read_predictions("test"), b.read_predictions("test")
    for folder, p in ((a, pa), (b, pb)):
        if not p.file.is_unique:
            raise MedxferError(f"{folder.path.name}: test files are not unique")
    only = set(pa.file) ^ set(pb.file)
    if only:
        raise MedxferError(
            f"not the same test set ({len(pa)} and {len(pb)} images, {len(only)} in one only,"
            f" e.g. {sorted(only)[0]})"
        )
    pb = pb.set_index("file").loc[pa.file].reset_index()
    if not (pa.label.fillna("").astype(str) == pb.label.fillna("").astype(str)).all():
        raise MedxferError("the same test files carry different labels in the two runs")
    sides = tuple(_side(p, f.read_metrics()) for p, f in ((pa, a), (pb, b)))
    return sides, known_patients(pa)


def stored_targets(
    predictions: pd.DataFrame, task: str, classes: list[str], positive: str
) -> np.ndarray:
    """The targets of predictions.csv rows as the task's metrics take them: 0/1 (binary),
    class indices (multiclass), a 0/1 matrix with NaN for the entries the run masked out
    (multilabel: its ``unknown`` column)."""
    labels = predictions.label.fillna("").astype(str)
    if task == "binary":
        return (labels == positive).to_numpy(np.int64)
    if task == "multiclass":
        return labels.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    y = np.array([[c in set(s.split("|")) for c in classes] for s in labels], dtype=np.float64)
    if "unknown" in predictions:
        unknown = predictions["unknown"].fillna("").astype(str)
        y[np.array([[c in set(s.split("|")) for c in classes] for s in unknown])] = np.nan
    return y


def _side(predictions: pd.DataFrame, metrics: dict) -> Side:
    task, classes = metrics.get("task", "binary"), list(metrics.get("classes") or [])
    thresholds = metrics.get("thresholds")
    positive = str(metrics.get("positive") or (classes[1] if len(classes) > 1 else ""))
    y = stored_targets(predictions, task, classes, positive)
    if task == "binary":
        cut = float(thresholds[0] if thresholds else metrics.get("threshold") or 0.5)
        prob = predictions.probability.to_numpy()
        score = predictions["score"].to_numpy() if "score" in predictions else prob
        return Side(y, prob, cut, classes, score)
    prob = predictions[[f"probability_{c}" for c in classes]].to_numpy(np.float64)
    score_columns = [f"score_{c}" for c in classes]
    score = (
        predictions[score_columns].to_numpy(np.float64) if score_columns[0] in predictions else prob
    )
    if task == "multiclass":
        return Side(y, prob, None, classes, score)
    cut = np.asarray(thresholds if thresholds else [0.5] * len(classes), dtype=np.float64)
    return Side(y, prob, cut, classes, score)


def _metrics(task: str, side: Side, rows: np.ndarray | None = None) -> dict:
    rows = slice(None) if rows is None else rows
    values = task_metrics(
        task, side.y[rows], side.prob[rows], side.cut, side.classes, scores=side.score[rows]
    )
    return {k: values[k] for k in HEADLINE[task]}


def _difference(task: str, a: Side, b: Side):
    """The bootstrap's score: b - a of every headline metric on the resampled rows."""

    def score(rows: np.ndarray) -> dict:
        ma, mb = _metrics(task, a, rows), _metrics(task, b, rows)
        return {k: minus(mb[k], ma[k]) for k in ma}

    return score


def _p_value(task: str, metric: str, sides: tuple[Side, Side], boot: dict | None):
    a, b = sides
    if task == "binary" and metric == "roc_auc":
        return delong_test(a.y, a.score, b.score)["p_value"], "DeLong"
    if metric == "accuracy" and task in ("binary", "multiclass"):
        return mcnemar_exact(_correct(task, a), _correct(task, b))["p_value"], "exact McNemar"
    p_value = boot["p_values"].get(metric) if boot else None
    return p_value, "paired bootstrap" if boot else None


def _correct(task: str, side: Side) -> np.ndarray:
    """Whether each row is decided right: binary at the run's stored threshold, else argmax."""
    if task == "binary":
        return (side.prob >= side.cut).astype(np.int64) == side.y
    return side.prob.argmax(axis=1) == side.y
