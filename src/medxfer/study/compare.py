"""Paired comparisons of a study's runs: ``comparisons.csv``.

Two runs scored on the same test images are paired data. For every pair of experiments that
differ in exactly one option, and that option is ``mode`` or one named in ``[study] compare``,
each seed/fold of one is compared with the same seed/fold of the other on the test rows of their
``predictions.csv``, matched by ``file`` (a pair whose test sets are not the same images with
the same labels is refused with a note). Per metric of the task's headline set:

- the difference ``diff = value_b - value_a`` with a paired bootstrap 95% interval that resamples
  whole patients (images where patients are unknown), both runs on the same resample;
- a p-value: DeLong's test for binary ROC AUC (the primary metric), the exact McNemar test for
  accuracy at each run's stored operating point, the paired bootstrap otherwise. Multi-class and
  multi-label macro ROC AUC (their primary metric) take the bootstrap p-value, since DeLong's
  test is for one binary AUC;
- ``p_adjusted``: Holm's correction over the non-primary metrics of the same row set (one
  seed/fold of one pair, or the pooled rows of one pair); the primary metric is a family of
  one and keeps its p-value.

With several seeds/folds, a pooled row per metric gives the mean of the per-replicate
differences with a t-interval and a one-sample t-test across replicates (``test`` names it).
Replicates are separate trainings scored on one shared test set, so their spread is the
training-to-training (and fold-to-fold) variation of the difference; the per-replicate rows
carry the test-sample variation. With few replicates the t-interval is wide, as it should be.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from medxfer.atomic import write_json, write_with
from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import HEADLINE, task_metrics
from medxfer.evaluation.paired import delong_test, holm, mcnemar_exact, paired_bootstrap
from medxfer.run.folder import RunFolder
from medxfer.study.table import EXPERIMENT, collect, experiment_of, label, varying

FILE = "comparisons.csv"
SETTINGS = "study.json"
PRIMARY = {
    "binary": "roc_auc",
    "multiclass": "macro_roc_auc",
    "multilabel": "macro_roc_auc",
    "segmentation": "dice",
    "detection": "map_50",
}
MODE_ORDER = ("scratch", "transfer", "finetune", "partial")
POOLED = "pooled"
COLUMNS = (
    "option",
    "a",
    "b",
    "shared",
    "replicate",
    "cell_a",
    "cell_b",
    "task",
    "metric",
    "primary",
    "value_a",
    "value_b",
    "diff",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjusted",
    "test",
    "interval",
    "note",
)


@dataclass(frozen=True)
class Side:
    """One run's test rows, in the row order shared with the run it is compared with."""

    y: np.ndarray
    prob: np.ndarray
    cut: float | np.ndarray | None  # binary: one threshold; multilabel: one per label
    classes: list[str]
    score: np.ndarray  # ranking scores (logits; probabilities for runs that stored none)


def write_comparisons(study_dir: Path, compare: list[str] | None = None) -> Path:
    """Compute the study's comparisons and write ``comparisons.csv`` atomically."""
    table = comparisons(study_dir, _compare_options(study_dir, compare))
    path = Path(study_dir) / FILE
    write_with(path, lambda tmp: table.to_csv(tmp, index=False))
    return path


def save_settings(study_dir: Path, *, name: str, compare: list[str]) -> None:
    """What the report needs to know of the study file (which options are compared)."""
    write_json(Path(study_dir) / SETTINGS, {"name": name, "compare": compare})


def read_comparisons(study_dir: Path) -> pd.DataFrame:
    """``comparisons.csv`` if it is newer than every finished run, else computed afresh."""
    path = Path(study_dir) / FILE
    runs = list((Path(study_dir) / "runs").glob(f"*/{RunFolder.METRICS}"))
    if not path.exists() or any(r.stat().st_mtime > path.stat().st_mtime for r in runs):
        write_comparisons(study_dir)
    return pd.read_csv(path)


def comparisons(study_dir: Path, compare: list[str]) -> pd.DataFrame:
    """Every row of ``comparisons.csv`` (see the module docstring)."""
    frame = collect(study_dir)
    rows: list[dict] = []
    if not frame.empty:
        keys = frame.apply(experiment_of, axis=1)
        context = varying(frame)
        for key_a, key_b, option in _pairs(list(dict.fromkeys(keys)), compare):
            runs_a, runs_b = frame[keys == key_a], frame[keys == key_b]
            header = {
                "option": option,
                "a": runs_a.iloc[0][option],
                "b": runs_b.iloc[0][option],
                "shared": label(runs_a.iloc[0], [k for k in context if k != option]),
            }
            rows += _pair(Path(study_dir), runs_a, runs_b, header)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _compare_options(study_dir: Path, compare: list[str] | None) -> list[str]:
    if compare is None:
        path = Path(study_dir) / SETTINGS
        compare = json.loads(path.read_text()).get("compare", []) if path.exists() else []
    return list(dict.fromkeys(["mode", *compare]))


def _pairs(experiments: list[tuple], compare: list[str]):
    """(a, b, option) for experiments that differ in exactly one option, one of ``compare``;
    ``a`` is the earlier value (``MODE_ORDER`` for modes, ascending otherwise)."""
    for x, y in itertools.combinations(experiments, 2):
        differ = [k for k, u, v in zip(EXPERIMENT, x, y, strict=True) if u != v]
        if len(differ) == 1 and differ[0] in compare:
            option = differ[0]
            i = EXPERIMENT.index(option)
            yield (x, y, option) if _order(option, x[i]) <= _order(option, y[i]) else (y, x, option)


def _order(option: str, value: str) -> tuple:
    if option == "mode" and value in MODE_ORDER:
        return (0, MODE_ORDER.index(value), "")
    try:
        return (1, float(value), "")
    except ValueError:
        return (2, 0.0, value)


def _pair(study_dir: Path, runs_a: pd.DataFrame, runs_b: pd.DataFrame, header: dict) -> list:
    """Rows of one pair of experiments: per shared seed/fold, then pooled over them."""
    by_b = {_replicate(r): r for _, r in runs_b.iterrows()}
    rows, per_replicate = [], []
    for _, run_a in runs_a.iterrows():
        run_b = by_b.get(_replicate(run_a))
        if run_b is None:
            continue
        common = {**header, "replicate": _replicate(run_a), "cell_a": run_a.cell}
        common["cell_b"] = run_b.cell
        found = _replicate_rows(study_dir, run_a, run_b, common)
        rows += found
        if len(found) > 1:
            per_replicate.append(found)
    if len(per_replicate) > 1:
        rows += _pooled(per_replicate, {**header, "replicate": POOLED})
    return rows


def _replicate(run: pd.Series) -> str:
    """Which replicate a run is: its seed, and its fold under cross-validation."""
    fold = f" fold={int(run.fold)}" if _has(run.get("fold")) else ""
    return f"seed={int(run.seed)}{fold}"


def _replicate_rows(study_dir: Path, run_a: pd.Series, run_b: pd.Series, common: dict) -> list:
    folder_a, folder_b = (
        RunFolder(study_dir / "runs" / run_a.cell),
        RunFolder(study_dir / "runs" / run_b.cell),
    )
    if run_a.task in ("segmentation", "detection"):
        return _task_pair_rows((folder_a, folder_b), (run_a, run_b), common)
    refusal, aligned = _align(folder_a, folder_b)
    if refusal:
        return [{**common, "task": run_a.task, "note": refusal}]
    (side_a, side_b), patients = aligned
    task = run_a.task
    metric_names = HEADLINE[task]
    values_a, values_b = (_metrics(task, s) for s in (side_a, side_b))
    resamples = int(min(run_a.bootstrap, run_b.bootstrap))
    boot = (
        paired_bootstrap(
            _difference(task, side_a, side_b),
            len(side_a.y),
            groups=patients,
            resamples=resamples,
            seed=int(run_a.seed),
        )
        if resamples
        else None
    )
    rows = []
    for metric in metric_names:
        p_value, test = _p_value(task, metric, (side_a, side_b), boot)
        interval = (boot["intervals"].get(metric) if boot else None) or (None, None)
        rows.append(
            {
                **common,
                "task": task,
                "metric": metric,
                "primary": metric == PRIMARY[task],
                "value_a": values_a[metric],
                "value_b": values_b[metric],
                "diff": _minus(values_b[metric], values_a[metric]),
                "ci_low": interval[0],
                "ci_high": interval[1],
                "p_value": p_value,
                "test": test,
                "interval": f"{boot['method']}, {resamples} resamples" if boot else None,
            }
        )
    return _adjust(rows)


def _task_pair_rows(folders: tuple, runs: tuple, common: dict) -> list[dict]:
    """Segmentation or detection: the task's own paired comparison of the two runs' test
    predictions (``medxfer.segmentation.metrics``, ``medxfer.detection.metrics``)."""
    task = runs[0].task
    resamples = int(min(runs[0].bootstrap, runs[1].bootstrap))
    if not all(f.file(RunFolder.PREDICTIONS).exists() for f in folders):
        return [{**common, "task": task, "note": "a run has no test predictions; not paired"}]
    tables = [f.read_predictions("test") for f in folders]
    try:
        if task == "segmentation":
            rows = _segmentation_pair(tables, resamples, int(runs[0].seed))
        else:
            rows = _detection_pair(folders, tables, resamples, int(runs[0].seed))
    except MedxferError as exc:
        return [{**common, "task": task, "note": f"{exc}; not paired"}]
    return [{**common, "task": task, **row} for row in rows]


def _segmentation_pair(tables: list[pd.DataFrame], resamples: int, seed: int) -> list[dict]:
    from medxfer.segmentation.metrics import paired_segmentation

    pa, pb = tables
    if not (pa.file.is_unique and pb.file.is_unique) or set(pa.file) != set(pb.file):
        raise MedxferError(f"not the same test images ({len(pa)} and {len(pb)})")
    pb = pb.set_index("file").loc[pa.file].reset_index()
    return paired_segmentation(pa, pb, groups=_known_patients(pa), resamples=resamples, seed=seed)


def _detection_pair(folders, tables: list[pd.DataFrame], resamples: int, seed: int) -> list:
    """Test mAP of both runs recomputed from their box tables, the difference with a paired
    image bootstrap (COCO's matching on each resample); mAP@0.5 is the primary metric."""
    from medxfer.detection.metrics import (
        SUMMARY,
        align,
        match_boxes,
        mean_average_precision,
        paired_detection,
    )

    classes = [f.read_resolved()["detector"]["classes"] for f in folders]
    if classes[0] != classes[1]:
        raise MedxferError(f"other classes ({classes[0]} and {classes[1]})")
    a, b = (match_boxes(t, classes[0]) for t in tables)
    if resamples:
        found = paired_detection(a, b, resamples=resamples, seed=seed)
    else:  # no bootstrap asked for: the values and their difference only
        values_b = mean_average_precision(align(a, b))
        found = {"values_a": mean_average_precision(a), "values_b": values_b}
    rows = []
    for metric in SUMMARY:
        low, high = (found.get("intervals") or {}).get(metric) or (None, None)
        value_a, value_b = found["values_a"][metric], found["values_b"][metric]
        rows.append(
            {
                "metric": metric,
                "primary": metric == PRIMARY["detection"],
                "value_a": value_a,
                "value_b": value_b,
                "diff": _minus(value_b, value_a),
                "ci_low": low,
                "ci_high": high,
                "p_value": (found.get("p_values") or {}).get(metric),
                "test": "paired bootstrap" if resamples else None,
                "interval": f"{found['method']}, {resamples} resamples" if resamples else None,
            }
        )
    return _adjust(rows)


def _align(a: RunFolder, b: RunFolder) -> tuple[str | None, tuple | None]:
    """Both runs' test rows in one order (matched by ``file``), or why they cannot be paired."""
    pa, pb = a.read_predictions("test"), b.read_predictions("test")
    for folder, p in ((a, pa), (b, pb)):
        if not p.file.is_unique:
            return f"{folder.path.name}: test files are not unique; not paired", None
    only = set(pa.file) ^ set(pb.file)
    if only:
        return (
            f"not the same test set ({len(pa)} and {len(pb)} images, {len(only)} in one only,"
            f" e.g. {sorted(only)[0]}); not paired",
            None,
        )
    pb = pb.set_index("file").loc[pa.file].reset_index()
    if not (pa.label.fillna("").astype(str) == pb.label.fillna("").astype(str)).all():
        return "the same test files carry different labels in the two runs; not paired", None
    sides = tuple(_side(p, f.read_metrics()) for p, f in ((pa, a), (pb, b)))
    return None, (sides, _known_patients(pa))


def _known_patients(predictions: pd.DataFrame) -> np.ndarray | None:
    """The test rows' patients for a cluster bootstrap; None where every row is its own
    patient (``file:NAME``, what runs write when patients are unknown)."""
    if "patient" not in predictions:
        return None
    patients = predictions.patient.astype(str).to_numpy()
    return None if all(p.startswith("file:") for p in patients) else patients


def _side(predictions: pd.DataFrame, metrics: dict) -> Side:
    task, classes = metrics.get("task", "binary"), list(metrics.get("classes") or [])
    labels = predictions.label.fillna("").astype(str)
    thresholds = metrics.get("thresholds")
    if task == "binary":
        positive = str(metrics.get("positive") or classes[1])
        cut = float(thresholds[0] if thresholds else metrics.get("threshold") or 0.5)
        prob = predictions.probability.to_numpy()
        score = predictions["score"].to_numpy() if "score" in predictions else prob
        return Side((labels == positive).to_numpy(np.int64), prob, cut, classes, score)
    prob = predictions[[f"probability_{c}" for c in classes]].to_numpy(np.float64)
    score_columns = [f"score_{c}" for c in classes]
    score = (
        predictions[score_columns].to_numpy(np.float64) if score_columns[0] in predictions else prob
    )
    if task == "multiclass":
        y = labels.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
        return Side(y, prob, None, classes, score)
    y = np.array([[c in set(s.split("|")) for c in classes] for s in labels], dtype=np.int64)
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
        return {k: _minus(mb[k], ma[k]) for k in ma}

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


def _adjust(rows: list[dict]) -> list[dict]:
    """Holm over the non-primary rows that have a p-value; the primary keeps its own."""
    family = [r for r in rows if not r["primary"] and _has(r["p_value"])]
    if family:
        for row, adjusted in zip(family, holm([r["p_value"] for r in family]), strict=True):
            row["p_adjusted"] = float(adjusted)
    for row in rows:
        if row["primary"]:
            row["p_adjusted"] = row["p_value"]
    return rows


def _pooled(per_replicate: list[list[dict]], header: dict) -> list[dict]:
    """Per metric: mean difference over replicates, t-interval and one-sample t-test."""
    rows = []
    for metric_rows in zip(*per_replicate, strict=True):
        first = metric_rows[0]
        diffs = np.array([r["diff"] for r in metric_rows if _has(r["diff"])], dtype=np.float64)
        n = len(diffs)
        low = high = p_value = None
        if n >= 2 and diffs.std(ddof=1) > 0:
            result = stats.ttest_1samp(diffs, 0.0)
            low, high = result.confidence_interval(0.95)
            p_value = float(result.pvalue)
        rows.append(
            {
                **header,
                "task": first["task"],
                "metric": first["metric"],
                "primary": first["primary"],
                "cell_a": " ".join(r["cell_a"] for r in metric_rows),
                "cell_b": " ".join(r["cell_b"] for r in metric_rows),
                "value_a": _mean(r["value_a"] for r in metric_rows),
                "value_b": _mean(r["value_b"] for r in metric_rows),
                "diff": float(diffs.mean()) if n else None,
                "ci_low": low,
                "ci_high": high,
                "p_value": p_value,
                "test": f"one-sample t-test over {n} replicates",
                "interval": f"t-interval over {n} replicates (mean difference)",
                "note": None if p_value is not None else "too few replicates or no spread",
            }
        )
    return _adjust(rows)


def _mean(values) -> float | None:
    kept = [v for v in values if _has(v)]
    return float(np.mean(kept)) if kept else None


def _minus(b, a) -> float | None:
    return None if not _has(a) or not _has(b) else float(b) - float(a)


def _has(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))
