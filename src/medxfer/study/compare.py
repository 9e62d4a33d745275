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

A ``[study.baseline]`` (the options of a reference experiment) adds, for every experiment whose
copy with the baseline's values is also in the study, the same rows against that copy, however
many options differ (``option = baseline``, ``a``/``b`` naming them), unless the two are already
a one-option pair above (whose order, and so whose sign, is kept).

With several seeds/folds, a pooled row per metric gives the mean of the per-replicate
differences with a t-interval and a one-sample t-test across replicates (``test`` names it).
Replicates are separate trainings scored on one shared test set, so their spread is the
training-to-training (and fold-to-fold) variation of the difference; the per-replicate rows
carry the test-sample variation. With few replicates the t-interval is wide, as it should be.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from medxfer.atomic import write_json, write_with
from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import PRIMARY
from medxfer.evaluation.paired import holm
from medxfer.families import family, family_of
from medxfer.storage.folder import RunFolder
from medxfer.study.table import EXPERIMENT, as_text, collect, experiment_of, label, varying

FILE = "comparisons.csv"
SETTINGS = "study.json"
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


def write_comparisons(
    study_dir: Path, compare: list[str] | None = None, baseline: dict | None = None
) -> Path:
    """Compute the study's comparisons and write ``comparisons.csv`` atomically; ``compare``
    and ``baseline`` default to the study's (``study.json``)."""
    settings = _settings(study_dir)
    compare = _compare_options(settings.get("compare", []) if compare is None else compare)
    baseline = settings.get("baseline", {}) if baseline is None else baseline
    table = comparisons(study_dir, compare, baseline)
    path = Path(study_dir) / FILE
    write_with(path, lambda tmp: table.to_csv(tmp, index=False))
    return path


def save_settings(study_dir: Path, *, name: str, compare: list[str], baseline: dict) -> None:
    """What the report needs to know of the study file (which options are compared, and
    against which baseline)."""
    settings = {"name": name, "compare": compare, "baseline": baseline}
    write_json(Path(study_dir) / SETTINGS, settings)


def _settings(study_dir: Path) -> dict:
    path = Path(study_dir) / SETTINGS
    return json.loads(path.read_text()) if path.exists() else {}


def read_comparisons(study_dir: Path) -> pd.DataFrame:
    """``comparisons.csv`` if it is newer than every finished run, else computed afresh."""
    path = Path(study_dir) / FILE
    runs = list((Path(study_dir) / "runs").glob(f"*/{RunFolder.METRICS}"))
    if not path.exists() or any(r.stat().st_mtime > path.stat().st_mtime for r in runs):
        write_comparisons(study_dir)
    return pd.read_csv(path)


def comparisons(study_dir: Path, compare: list[str], baseline: dict | None = None) -> pd.DataFrame:
    """Every row of ``comparisons.csv`` (see the module docstring)."""
    frame = collect(study_dir)
    rows: list[dict] = []
    if not frame.empty:
        keys = frame.apply(experiment_of, axis=1)
        context = varying(frame)
        experiments = list(dict.fromkeys(keys))
        pairs = list(_pairs(experiments, compare))
        pairs += _baseline_pairs(experiments, baseline or {}, {(a, b) for a, b, _ in pairs})
        for key_a, key_b, option in pairs:
            runs_a, runs_b = frame[keys == key_a], frame[keys == key_b]
            header = _header(runs_a.iloc[0], runs_b.iloc[0], option, context)
            rows += _pair(Path(study_dir), runs_a, runs_b, header)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _header(run_a: pd.Series, run_b: pd.Series, option: str | list[str], context: list) -> dict:
    """What a pair's rows say of it: the option and both values of a one-option pair, or
    ``baseline`` with ``key=value`` of every option a baseline pair differs in."""
    if isinstance(option, list):
        name, a, b = "baseline", label(run_a, option), label(run_b, option)
    else:
        name, a, b = option, run_a[option], run_b[option]
    differ = option if isinstance(option, list) else [option]
    return {
        "option": name,
        "a": a,
        "b": b,
        "shared": label(run_a, [k for k in context if k not in differ]),
    }


def _compare_options(compare: list[str]) -> list[str]:
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


def _baseline_pairs(experiments: list[tuple], baseline: dict, paired: set) -> list:
    """(b, x, options) for each experiment x whose copy with ``baseline``'s values, b, is also an
    experiment of the study, unless the two are already paired: everything against the
    reference protocol, however many of its options x changes."""
    found = set(experiments)
    at = {EXPERIMENT.index(k): as_text(v) for k, v in baseline.items()}
    pairs = []
    for x in experiments:
        b = tuple(at.get(i, value) for i, value in enumerate(x))
        if b != x and b in found and (b, x) not in paired and (x, b) not in paired:
            pairs.append((b, x, [k for k, u, v in zip(EXPERIMENT, b, x, strict=True) if u != v]))
    return pairs


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
    """One seed/fold of a pair: the task family's paired comparison of the two runs' test
    predictions (``Family.paired``), Holm-adjusted here; a pair that cannot be paired gets a
    note."""
    folders = tuple(RunFolder(study_dir / "runs" / run.cell) for run in (run_a, run_b))
    task = run_a.task
    if not all(f.file(RunFolder.PREDICTIONS).exists() for f in folders):
        return [{**common, "task": task, "note": "a run has no test predictions; not paired"}]
    resamples = int(min(run_a.bootstrap, run_b.bootstrap))
    try:
        found = family(family_of({"task": task})).paired(folders, resamples, int(run_a.seed))
    except MedxferError as exc:
        return [{**common, "task": task, "note": f"{exc}; not paired"}]
    rows = [
        {**common, "task": task, **row, "primary": row["metric"] == PRIMARY[task]} for row in found
    ]
    return _adjust(rows)


def _adjust(rows: list[dict]) -> list[dict]:
    """Holm over the non-primary rows that have a p-value; the primary keeps its own."""
    tested = [r for r in rows if not r["primary"] and _has(r["p_value"])]
    if tested:
        for row, adjusted in zip(tested, holm([r["p_value"] for r in tested]), strict=True):
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


def _has(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))
