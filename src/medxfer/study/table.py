"""A study's tables: ``results.csv`` (a row per finished run) and ``summary.csv`` (a row per
experiment: mean ± sd over its seeds and folds, with how many there were).

An *experiment* is everything that defines what a run computes: every run option except where
files go (``out``, ``cache_dir``), how fast it runs (``device``, ``eval_batch_size``), how many
bootstrap resamples its intervals use (``bootstrap``), and the replicate it is (``seed``,
``fold``). ``data`` and ``weights`` are part of the experiment: another dataset or another
weights file is another experiment; so is the threshold *rule*, not the value each replicate
chose with it. Runs that share an experiment are replicates and are
averaged; runs that differ in any other option are never averaged together.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd

from medxfer.atomic import write_with
from medxfer.evaluation.metrics import HEADLINE, scalar_metrics
from medxfer.families import FAMILIES, options_class
from medxfer.storage.folder import RunFolder

TABLE = "results"
SUMMARY = "summary"
REPLICATES = ("seed", "fold")
NOT_EXPERIMENT = (
    *("out", "cache_dir", "device", "eval_batch_size", "bootstrap", "feature_cache"),
    *REPLICATES,
)
# Column of each option in the results: ``threshold`` holds the chosen value there, its rule
# (what the experiment set) is ``threshold_rule``.
COLUMN_OF = {"threshold": "threshold_rule"}
# every option of every kind of run (classification's first); a kind's rows leave the others'
# options empty, and ``task`` tells the kinds apart
EXPERIMENT = tuple(
    dict.fromkeys(
        COLUMN_OF.get(f.name, f.name)
        for family in FAMILIES
        for f in fields(options_class(family))
        if f.name not in NOT_EXPERIMENT
    )
)


def collect(out: Path) -> pd.DataFrame:
    """A row per complete run under ``out/runs``: its options, task, threshold rule and chosen
    value, every test metric with its 95% interval, selected epoch, wall time and device.
    Unfinished runs are not counted."""
    rows = [_row(RunFolder(run)) for run in sorted((Path(out) / "runs").glob("*"))]
    return pd.DataFrame([r for r in rows if r is not None])


def _row(folder: RunFolder) -> dict[str, Any] | None:
    if not folder.is_complete():
        return None
    if folder.family() != "classification":
        return _task_row(folder)
    metrics = folder.read_metrics()
    task = metrics.get("task", "binary")
    row = {"cell": folder.path.name, **folder.read_config().to_dict(), "task": task}
    row["image_size"] = folder.read_resolved()["image_size"]
    test = metrics["test"]
    row.update(_test_values(test, scalar_metrics(task)))
    thresholds = metrics.get("thresholds")
    row.update(
        {
            "threshold_rule": metrics.get("threshold_rule"),
            "threshold": (
                "|".join(f"{t:g}" for t in thresholds)
                if task == "multilabel" and thresholds
                else metrics.get("threshold")
            ),
            "selected_epoch": metrics["selected_epoch"],
            "seconds": metrics["seconds"]["total"],
            "device": metrics["device"],
            "torch": folder.read_environment().get("torch"),
        }
    )
    return row


def _task_row(folder: RunFolder) -> dict[str, Any]:
    """A segmentation or detection run: its options and its task's headline test metrics."""
    metrics = folder.read_metrics()
    task, test = metrics["task"], metrics.get("test") or {}
    row = {"cell": folder.path.name, **folder.read_options(), "task": task}
    row["image_size"] = folder.read_resolved().get("image_size", row.get("image_size"))
    row.update(_test_values(test, HEADLINE[task]))
    for name, values in (test.get("per_class") or {}).items():  # detection: AP per class
        row[f"ap50_{name}"] = values.get("map_50")
    row.update(
        selected_epoch=metrics["selected_epoch"],
        seconds=metrics["seconds"]["total"],
        device=metrics["device"],
        torch=folder.read_environment().get("torch"),
    )
    return row


def _test_values(test: dict, names) -> dict[str, Any]:
    """Each test metric of ``names`` with its 95% interval (``NAME_ci_low``/``_high``)."""
    values: dict[str, Any] = {}
    for key in names:
        values[key] = test.get(key)
        interval = (test.get("ci95") or {}).get(key)
        values[f"{key}_ci_low"], values[f"{key}_ci_high"] = interval or (None, None)
    return values


def experiment_of(row: pd.Series | dict) -> tuple[str, ...]:
    """The experiment a run belongs to, as comparable text (None and NaN alike)."""
    return tuple(as_text(row.get(k)) for k in EXPERIMENT)


def varying(frame: pd.DataFrame) -> list[str]:
    """The experiment options that take more than one value in ``frame``."""
    return [k for k in EXPERIMENT if k in frame.columns and frame[k].map(as_text).nunique() > 1]


def label(row: pd.Series | dict, keys: list[str]) -> str:
    """``key=value`` of ``keys`` for one run: what tells its experiment apart in this study."""
    return ", ".join(f"{k}={as_text(row.get(k))}" for k in keys)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """A row per experiment, in the order runs were found: its options, ``replicates`` (runs
    averaged) with the seeds and folds they were, and ``METRIC_mean``, ``METRIC_sd`` (sample
    sd; empty with one replicate) of every headline metric of its task."""
    if frame.empty:
        return pd.DataFrame()
    keys = frame.apply(experiment_of, axis=1)
    rows = []
    for key in dict.fromkeys(keys):
        runs = frame[keys == key]
        first = runs.iloc[0]
        row = {k: first.get(k) for k in EXPERIMENT}
        row.update(
            task=first.task,
            replicates=len(runs),
            seeds=" ".join(sorted({as_text(v) for v in runs.seed})),
            folds=" ".join(sorted({as_text(v) for v in runs.get("fold", [None])})),
            cells=" ".join(runs.cell),
        )
        for metric in HEADLINE[first.task]:
            values = pd.to_numeric(runs[metric], errors="coerce")
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_sd"] = values.std() if len(runs) > 1 else None
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(out: Path, study=None) -> Path:
    """``results.csv`` / ``.parquet`` (a row per run) and ``summary.csv`` (per experiment)."""
    frame = collect(out)
    csv = Path(out) / f"{TABLE}.csv"
    write_with(csv, lambda tmp: frame.to_csv(tmp, index=False))
    summary = summarize(frame)
    write_with(Path(out) / f"{SUMMARY}.csv", lambda tmp: summary.to_csv(tmp, index=False))
    if not frame.empty:
        write_with(
            Path(out) / f"{TABLE}.parquet",
            lambda tmp: frame.astype({c: "string" for c in _mixed(frame)}).to_parquet(
                tmp, index=False
            ),
        )
    return csv


def as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "None"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # an integer column that pandas made float by a missing value
    return str(value)


def _mixed(frame: pd.DataFrame) -> list[str]:
    """Object columns that Parquet cannot store as one type (None mixed with text)."""
    return [c for c in frame.columns if frame[c].dtype == object]
