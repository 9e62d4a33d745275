"""The assess stage: everything chosen on validation data (temperature, operating points),
then the test metrics with patient-level intervals, calibration, and the predictions of both
splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from medxfer.classification.context import Assessment, Context, Inputs
from medxfer.classification.trained import TrainedModel
from medxfer.config import RunConfig
from medxfer.data.prepared import PreparedData
from medxfer.errors import MedxferError
from medxfer.evaluation.calibration import expected_calibration_error, fit_temperature
from medxfer.evaluation.intervals import bootstrap_intervals
from medxfer.evaluation.metrics import scalar_metrics, task_metrics
from medxfer.evaluation.thresholds import choose_threshold, choose_thresholds
from medxfer.models.classifier import XrayClassifier
from medxfer.tasks import Task
from medxfer.training.loop import view_logits
from medxfer.training.trainer import EpochState


def assess(ctx: Context, network: XrayClassifier, inputs: Inputs, state: EpochState) -> Assessment:
    """Everything chosen on validation data (temperature, operating points), then the test
    metrics with intervals, the predictions of both splits, and the trained model."""
    cfg, data, task = ctx.cfg, ctx.data, ctx.task
    splits = {s: data.splits[s] for s in ("val", "test") if s in data.splits}
    # (V, N, ...): every test-time view (--tta; one by default)
    views = {s: view_logits(inputs.trainable, inputs.source, idx) for s, idx in splits.items()}
    logits = {s: z[0] for s, z in views.items()}  # the images themselves
    truth = {s: data.targets[idx].numpy() for s, idx in splits.items()}
    temperature = _temperature(cfg, task, logits.get("val"), truth.get("val"))
    prob = {s: task.mean_probabilities(z, temperature) for s, z in views.items()}
    scores = {s: task.mean_scores(z, temperature) for s, z in views.items()}  # ranks, no ties
    thresholds = _thresholds(cfg, task, truth.get("val"), prob.get("val"))
    cut = metric_thresholds(task, thresholds)
    test = task_metrics(
        task.name, truth["test"], prob["test"], cut, task.classes, scores=scores["test"]
    )
    if cfg.bootstrap:
        test["ci95"], test["interval_method"] = _intervals(
            ctx, truth["test"], prob["test"], scores["test"], thresholds
        )
    model = TrainedModel(network.cpu().eval(), cfg, task, thresholds, temperature, data.color)
    calibration, curves = _calibration(cfg, task, logits, truth, temperature)
    metrics = {
        "task": task.name,
        "classes": list(task.classes),
        "arch": cfg.arch,
        "mode": cfg.mode,
        "bn": cfg.bn,
        "positive": data.positive,
        "negative": data.negative,
        "thresholds": thresholds,
        "threshold": thresholds[0] if task.name == "binary" else None,
        "threshold_rule": cfg.threshold_rule if task.uses_thresholds else None,
        "calibration": calibration,
        "head": cfg.head,
        "probe_strength": _chosen_strength(cfg, state),
        "selected_epoch": state.best_epoch,
        "selection": cfg.select,
        "test": test,
        "val": (
            task_metrics(
                task.name, truth["val"], prob["val"], cut, task.classes, scores=scores["val"]
            )
            if "val" in prob
            else None
        ),
        **_data_facts(ctx),
    }
    predictions = pd.concat(
        [
            _prediction_rows(ctx, s, splits[s], model, prob=prob[s], scores=scores[s])
            for s in splits
        ],
        ignore_index=True,
    )
    return Assessment(model, metrics, predictions, curves)


def _data_facts(ctx: Context) -> dict:
    """What metrics.json says of the data a run saw and where it was scored."""
    data = ctx.data
    return {
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "class_counts": _class_counts(data, ctx.task),
        "unknown_counts": unknown_counts(data),
        "labelling": data.imageset.labelling,
        "skipped_inputs": [{"file": f, "reason": r} for f, r in data.skipped],
        "device": str(ctx.runtime.device),
        "evaluation_precision": "float32",
    }


def _chosen_strength(cfg: RunConfig, state: EpochState) -> float | None:
    """``--head logreg``: the strength C of the selected epoch."""
    if cfg.head != "logreg" or not state.best_epoch:
        return None
    return state.history[state.best_epoch - 1].get("C")


def _temperature(cfg: RunConfig, task: Task, val_logits, val_y) -> float:
    if cfg.calibrate != "temperature":
        return 1.0
    if val_logits is None:
        raise MedxferError("--calibrate temperature: needs a validation split")
    if task.name == "multilabel":  # every known label entry
        known = ~np.isnan(val_y)
        return fit_temperature(val_logits[known], val_y[known])
    return fit_temperature(val_logits, val_y)


def _thresholds(cfg: RunConfig, task: Task, val_y, val_prob) -> list[float] | None:
    """Operating points chosen on validation data: one (binary) or one per label."""
    if not task.uses_thresholds:
        return None
    rule = cfg.threshold_rule
    if task.name == "binary":
        return [choose_threshold(rule, val_y, val_prob)]
    if val_y is None or val_prob is None:
        return [choose_threshold(rule, None, None) for _ in range(task.outputs)]
    return choose_thresholds(rule, val_y, val_prob, task.classes).tolist()  # names a label


def metric_thresholds(task: Task, thresholds: list[float] | None):
    """Thresholds as ``task_metrics`` takes them: one number (binary) or one per label."""
    if thresholds is None:
        return None
    return thresholds[0] if task.name == "binary" else np.asarray(thresholds)


def _intervals(
    ctx: Context, y: np.ndarray, prob: np.ndarray, scores: np.ndarray, thresholds
) -> tuple[dict, dict]:
    """Bootstrap intervals of the test metrics, resampling patients where they are known."""
    task, cfg = ctx.task, ctx.cfg
    patients = [ctx.data.patients[i] for i in ctx.data.splits["test"].tolist()]
    known = any(not p.startswith("file:") for p in patients)
    names = scalar_metrics(task.name)
    cut = metric_thresholds(task, thresholds)

    def score(rows: np.ndarray) -> dict:
        m = task_metrics(task.name, y[rows], prob[rows], cut, task.classes, scores=scores[rows])
        return {k: m[k] for k in names}

    result = bootstrap_intervals(
        score,
        len(y),
        groups=np.asarray(patients) if known else None,
        resamples=cfg.bootstrap,
        seed=cfg.seed,
    )
    method = {k: v for k, v in result.items() if k != "intervals"}
    return result["intervals"], method


def _calibration(cfg: RunConfig, task: Task, logits: dict, truth: dict, temperature: float):
    """ECE (15 bins) before and after the temperature, on what the task decides with: the
    positive-class probability (binary), the top label (multiclass), every label entry
    (multilabel). Returns the summary and the curves of the reliability diagram."""

    def view(split: str, t: float) -> tuple[np.ndarray, np.ndarray]:
        p = task.probabilities(logits[split], t)
        y = truth[split]
        if task.name == "multiclass":
            return (p.argmax(1) == y).astype(np.float64), p.max(1)
        if task.name == "multilabel":
            known = ~np.isnan(y)
            return y[known].astype(np.float64), p[known]
        return np.ravel(y).astype(np.float64), np.ravel(p)

    summary = {
        "method": cfg.calibrate,
        "temperature": temperature,
        "bins": 15,
        "measured_on": {
            "binary": "positive-class probability",
            "multiclass": "top label",
            "multilabel": "every label entry",
        }[task.name],
        "test_ece_uncalibrated": expected_calibration_error(*view("test", 1.0)),
        "test_ece": expected_calibration_error(*view("test", temperature)),
    }
    if "val" in logits:
        summary["val_ece_uncalibrated"] = expected_calibration_error(*view("val", 1.0))
        summary["val_ece"] = expected_calibration_error(*view("val", temperature))
        val_loss = task_metrics(
            task.name, truth["val"], task.probabilities(logits["val"]), None, task.classes
        )["loss"]
        summary["val_nll_uncalibrated"] = val_loss
        summary["val_nll"] = task_metrics(
            task.name,
            truth["val"],
            task.probabilities(logits["val"], temperature),
            None,
            task.classes,
        )["loss"]
    curves = {"test, uncalibrated": view("test", 1.0)}
    if temperature != 1.0:
        curves[f"test, temperature {temperature:.2f}"] = view("test", temperature)
    return summary, curves


def _class_counts(data: PreparedData, task: Task) -> dict[str, dict[str, int]]:
    """Images per class in each split (a multi-label image counts once per label it has)."""
    counts = {}
    for split, idx in data.splits.items():
        targets = data.targets[idx]
        if task.name == "multilabel":
            per = targets.nan_to_num().sum(0).round().long().tolist()  # known positives
        else:
            per = torch.bincount(targets, minlength=len(task.classes)).tolist()
        counts[split] = dict(zip(task.classes, per, strict=True))
    return counts


def unknown_counts(data: PreparedData) -> dict[str, dict[str, int]] | None:
    """Unknown label entries (masked out) per split and label; None when every entry is
    known."""
    if data.task != "multilabel" or not data.targets.isnan().any():
        return None
    return {
        split: dict(zip(data.classes, data.targets[idx].isnan().sum(0).tolist(), strict=True))
        for split, idx in data.splits.items()
    }


def _prediction_rows(
    ctx: Context,
    split: str,
    idx: torch.Tensor,
    model: TrainedModel,
    *,
    prob: np.ndarray,
    scores: np.ndarray,
) -> pd.DataFrame:
    """One row per image: split, file, patient, true label, probabilities, ranking scores
    (exact where a probability rounds to 0 or 1; see ``Task.scores``), decision."""
    task, data = ctx.task, ctx.data
    rows = idx.tolist()
    truth = data.targets[idx].numpy()
    frame = pd.DataFrame(
        {
            "split": split,
            "file": [data.records[i].source for i in rows],
            "patient": [data.patients[i] for i in rows],
            "label": task.names(np.nan_to_num(truth).astype(np.int64)),
        }
    )
    if task.name == "multilabel" and np.isnan(truth).any():
        frame["unknown"] = task.names(np.isnan(truth))
    if task.name == "binary":
        frame["probability"], frame["score"] = prob, scores
    else:
        for j, name in enumerate(task.classes):
            frame[f"probability_{name}"] = prob[:, j]
        for j, name in enumerate(task.classes):
            frame[f"score_{name}"] = scores[:, j]
    frame["predicted"] = task.names(model.decide(prob))
    return frame
