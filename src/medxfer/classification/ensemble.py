"""``medxfer ensemble``: the mean probability of classification runs scored on the same images
(seeds, folds, architectures), written as a run-like folder and compared with its best member.

Everything is read from the members' ``predictions.csv`` (no model is run again), so any
finished runs whose val and test rows match can be combined. The operating point is chosen
again on the averaged validation probabilities with the members' rule; the best member is the
one with the highest validation value of the task's primary metric (the test set chooses
nothing).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medxfer.classification.paired import paired_rows, stored_targets
from medxfer.errors import MedxferError
from medxfer.evaluation.intervals import bootstrap_intervals
from medxfer.evaluation.metrics import PRIMARY, scalar_metrics, task_metrics
from medxfer.evaluation.thresholds import choose_threshold
from medxfer.storage.folder import RunFolder, known_patients
from medxfer.tasks import TASKS, make_task

COMPARISON = "comparison.csv"
SPLITS = ("val", "test")


def ensemble(
    runs: Sequence[str | Path], out: str | Path, *, resamples: int = 1000, seed: int = 0
) -> dict:
    """Average the runs' probabilities, choose the operating point on validation, score the
    test split with intervals and compare with the best member; returns metrics.json."""
    if len(runs) < 2:
        raise MedxferError("ensemble: give at least two runs")
    paths = [Path(r).resolve() for r in runs]
    twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    if twice is not None:
        raise MedxferError(f"ensemble: {twice} is given twice")
    folder = RunFolder(out)
    if folder.path.exists() and (not folder.path.is_dir() or any(folder.path.iterdir())):
        raise MedxferError(f"{folder}: exists and is not an empty folder (choose a new --out)")
    members = [_member(RunFolder(r)) for r in runs]
    first = members[0]
    task = make_task(first["task"], first["classes"])
    frames = {s: _mean_frame(members, s, task) for s in SPLITS if _has(members, s)}
    if "test" not in frames:
        raise MedxferError("ensemble: the runs have no test predictions")
    shared = len(frames["val"]) if "val" in frames else 0
    thresholds = _thresholds(first, task, frames.get("val"))
    arrays = {s: _arrays(f, task) for s, f in frames.items()}
    cut = None if thresholds is None else thresholds[0] if task.name == "binary" else thresholds
    test = task_metrics(task.name, *arrays["test"], cut, task.classes)
    if resamples:
        test["ci95"], test["interval_method"] = _intervals(
            task, arrays["test"], cut, frames["test"], resamples, seed
        )
    best = max(members, key=lambda m: _val_primary(m, task.name))
    metrics = {
        "task": task.name,
        "classes": list(task.classes),
        "mode": "ensemble",
        "arch": "+".join(sorted({str(m["metrics"].get("arch")) for m in members})),
        "positive": first["metrics"].get("positive"),
        "negative": first["metrics"].get("negative"),
        "members": [str(m["folder"].path) for m in members],
        "best_member": str(best["folder"].path),
        "combination": "mean of the members' probabilities",
        "thresholds": thresholds,
        "threshold": thresholds[0] if thresholds and task.name == "binary" else None,
        "threshold_rule": first["rule"],
        "test": test,
        "val": task_metrics(task.name, *arrays["val"], cut, task.classes) if shared else None,
        "val_images_shared": shared,  # held out by every member (folds share none)
    }
    predictions = pd.concat([_decided(frames[s], task, thresholds) for s in frames])
    _write(folder, best["folder"], metrics, predictions, (resamples, seed))
    return metrics


def _write(folder: RunFolder, best: RunFolder, metrics: dict, predictions, paired) -> None:
    """Every file in a staging folder beside ``folder``, then one rename: an interrupted
    ensemble leaves nothing that looks finished."""
    folder.path.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.path.parent.glob(f".{folder.path.name}.*"):  # a killed ensemble's
        shutil.rmtree(stale, ignore_errors=True)
    staging = RunFolder(tempfile.mkdtemp(dir=folder.path.parent, prefix=f".{folder.path.name}."))
    umask = os.umask(0)
    os.umask(umask)
    staging.path.chmod(0o777 & ~umask)  # a run folder's permissions, not mkdtemp's 0700
    try:
        staging.write_predictions(predictions)
        staging.write_metrics(metrics)
        comparison = pd.DataFrame(paired_rows((best, staging), *paired))
        staging.write_table(COMPARISON, comparison)
        staging.write_model_card(_card(metrics, comparison))
        if folder.path.exists():
            folder.path.rmdir()  # empty, checked before
        os.rename(staging.path, folder.path)
    except BaseException:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise


def _member(folder: RunFolder) -> dict:
    if not folder.is_complete():
        raise MedxferError(f"{folder}: not a finished run (no {RunFolder.METRICS})")
    if folder.has_run() and folder.family() != "classification":
        raise MedxferError(f"{folder}: a {folder.family()} run; ensembles combine classifiers")
    metrics = folder.read_metrics()
    if metrics.get("task") not in TASKS or metrics.get("mode") == "ensemble":
        raise MedxferError(f"{folder}: not a classification run")
    return {
        "folder": folder,
        "metrics": metrics,
        "task": metrics["task"],
        "classes": list(metrics["classes"]),
        "rule": metrics.get("threshold_rule"),
        "predictions": folder.read_predictions(None),
    }


def _has(members: list[dict], split: str) -> bool:
    present = [bool((m["predictions"].split == split).any()) for m in members]
    if any(present) and not all(present):
        raise MedxferError(f"ensemble: only some runs have {split} predictions")
    return all(present)


def _mean_frame(members: list[dict], split: str, task) -> pd.DataFrame:
    """The first member's rows of ``split`` with every probability column averaged over the
    members (rows matched by file); one line saying why where the runs do not match. The test
    images must be the same; of the validation images, those every member held out (runs
    with other seeds carve other validation sets, and an image one member trained on would
    flatter the averaged probabilities)."""
    first = members[0]
    base = first["predictions"][first["predictions"].split == split].reset_index(drop=True)
    if split == "val":
        shared = set.intersection(
            *(set(m["predictions"].file[m["predictions"].split == "val"]) for m in members)
        )
        base = base[base.file.isin(shared)].reset_index(drop=True)
    columns = _probability_columns(task)
    total = base[columns].to_numpy(np.float64, copy=True)
    for m in members[1:]:
        where = m["folder"]
        if (m["task"], m["classes"]) != (first["task"], first["classes"]):
            raise MedxferError(
                f"{where}: task {m['task']} with classes {m['classes']}, but {first['folder']} "
                f"has {first['task']} with {first['classes']}"
            )
        if m["rule"] != first["rule"]:
            raise MedxferError(
                f"{where}: threshold rule {m['rule']}, but {first['folder']} uses {first['rule']}"
            )
        rows = m["predictions"][m["predictions"].split == split]
        if split == "val":
            rows = rows[rows.file.isin(set(base.file))]
        if not rows.file.is_unique or set(rows.file) != set(base.file):
            raise MedxferError(f"{where}: its {split} images differ from {first['folder']}'s")
        rows = rows.set_index("file").loc[base.file].reset_index()
        if not (rows.label.to_numpy() == base.label.to_numpy()).all():
            raise MedxferError(f"{where}: the same {split} images carry other labels")
        total += rows[columns].to_numpy(np.float64)
    keep = [c for c in ("split", "file", "patient", "label", "unknown") if c in base]
    frame = base[keep].copy()
    frame[columns] = total / len(members)
    return frame


def _probability_columns(task) -> list[str]:
    if task.name == "binary":
        return ["probability"]
    return [f"probability_{c}" for c in task.classes]


def _arrays(frame: pd.DataFrame, task) -> tuple[np.ndarray, np.ndarray]:
    """(targets, probabilities) of a frame, as the task's metrics take them."""
    prob = frame[_probability_columns(task)].to_numpy(np.float64)
    classes = list(task.classes)
    y = stored_targets(frame, task.name, classes, classes[-1])  # binary: [negative, positive]
    return y, prob[:, 0] if task.name == "binary" else prob


def _thresholds(first: dict, task, val: pd.DataFrame | None) -> list[float] | None:
    """The members' rule applied to the averaged validation probabilities."""
    if not task.uses_thresholds:
        return None
    rule = first["rule"] or "0.5"
    y, prob = _arrays(val, task) if val is not None and len(val) else (None, None)
    try:
        if task.name == "binary":
            return [choose_threshold(rule, y, prob)]
        return [
            choose_threshold(
                rule, None if y is None else y[:, j], None if prob is None else prob[:, j]
            )
            for j in range(task.outputs)
        ]
    except MedxferError as error:
        shared = 0 if val is None else len(val)
        raise MedxferError(
            f"ensemble: the members share {shared} validation images (runs with other seeds "
            f"carve other validation sets); {error}"
        ) from None


def _intervals(task, arrays, cut, frame: pd.DataFrame, resamples: int, seed: int):
    y, prob = arrays
    names = scalar_metrics(task.name)

    def score(rows: np.ndarray) -> dict:
        m = task_metrics(task.name, y[rows], prob[rows], cut, task.classes)
        return {k: m[k] for k in names}

    result = bootstrap_intervals(
        score, len(y), groups=known_patients(frame), resamples=resamples, seed=seed
    )
    return result["intervals"], {k: v for k, v in result.items() if k != "intervals"}


def _val_primary(member: dict, task: str) -> float:
    value = (member["metrics"].get("val") or {}).get(PRIMARY[task])
    if value is None:
        raise MedxferError(
            f"{member['folder']}: no validation {PRIMARY[task]} to choose the best member by"
        )
    return float(value)


def _decided(frame: pd.DataFrame, task, thresholds) -> pd.DataFrame:
    """Prediction rows as a run writes them: probabilities, ranking scores (the mean
    probabilities themselves) and the decision at the ensemble's operating point."""
    out = frame.copy()
    columns = _probability_columns(task)
    for c in columns:
        out[c.replace("probability", "score", 1)] = out[c]
    prob = out[columns].to_numpy(np.float64)
    out["predicted"] = task.names(
        task.decide(prob[:, 0] if task.name == "binary" else prob, thresholds)
    )
    return out


def _card(metrics: dict, comparison: pd.DataFrame) -> str:
    test, intervals = metrics["test"], metrics["test"].get("ci95") or {}
    lines = [
        f"# Ensemble of {len(metrics['members'])} runs ({metrics['task']})",
        "",
        "For research use only. Not for diagnosis or any clinical decision.",
        "",
        f"- Combination: {metrics['combination']}; operating point rule "
        f"{metrics['threshold_rule']} on the averaged validation probabilities",
        f"- Members: {', '.join(Path(m).name for m in metrics['members'])}",
        f"- Best member (highest validation {PRIMARY[metrics['task']]}): "
        f"{Path(metrics['best_member']).name}",
        "",
        "| metric | ensemble | 95% interval | best member | difference | p-value |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in comparison.itertuples():
        ci = intervals.get(row.metric) or (None, None)
        lines.append(
            f"| {row.metric} | {_num(test.get(row.metric))} | {_num(ci[0])} – {_num(ci[1])} "
            f"| {_num(row.value_a)} | {_num(row.diff)} | {_num(row.p_value)} |"
        )
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return (
        "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4f}"
    )
