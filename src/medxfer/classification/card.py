"""The model card: what a trained run is, what it was trained and tested on, where it decides and
how well it did, in a short ``model_card.md`` beside the model. One summary (``card_summary``)
feeds the card, the export's metadata and the serve page, so all three say the same."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from medxfer.config import RunConfig
from medxfer.evaluation.metrics import HEADLINE
from medxfer.storage.folder import RunFolder

if TYPE_CHECKING:
    from medxfer.classification.context import Assessment
    from medxfer.classification.trained import TrainedModel

NOTICE = "Research use only, not a medical device."
MODES = {
    "transfer": "ImageNet weights, frozen backbone, new head trained",
    "scratch": "random initialisation, every layer trained",
    "finetune": "ImageNet weights, every layer trained",
    "partial": "ImageNet weights, the last stages trained",
}


def card_summary(
    cfg: RunConfig, metrics: dict[str, Any], counts: dict[str, dict[str, int]] | None = None
) -> dict[str, Any]:
    """The card's facts as JSON-able values; ``counts`` per split and class where known."""
    test = metrics.get("test") or {}
    intervals = test.get("ci95") or {}
    task = metrics.get("task", "binary")
    calibration = metrics.get("calibration") or {}
    return {
        "notice": NOTICE,
        "arch": cfg.arch,
        "mode": cfg.mode,
        "mode_meaning": MODES.get(cfg.mode, cfg.mode),
        "task": task,
        "classes": metrics.get("classes"),
        "positive": metrics.get("positive"),
        "image_size": cfg.resolution,
        "training_data": {
            "source": Path(cfg.data).name,
            "split_sizes": metrics.get("split_sizes"),
            "class_counts": counts,
            "unknown_counts": metrics.get("unknown_counts"),
            "labelling": metrics.get("labelling"),
        },
        "operating_point": {
            "thresholds": metrics.get("thresholds"),
            "rule": metrics.get("threshold_rule"),
            "chosen_on": "validation data",
        },
        "calibration": {
            "method": calibration.get("method"),
            "temperature": calibration.get("temperature"),
            "test_ece": calibration.get("test_ece"),
            "test_ece_uncalibrated": calibration.get("test_ece_uncalibrated"),
        },
        "test_metrics": {
            name: {"value": test.get(name), "ci95": intervals.get(name)}
            for name in HEADLINE.get(task, ())
            if name in test
        },
        "selected_epoch": metrics.get("selected_epoch"),
        "epochs": cfg.epochs,
        "head": metrics.get("head", "paper"),
        "probe_strength": metrics.get("probe_strength"),
    }


def model_summary(model: TrainedModel) -> dict[str, Any]:
    """The summary of a loaded model: from its run folder's results when it has them, else
    what the model itself knows (the notice always)."""
    folder = RunFolder(model.source) if model.source else None
    if folder is not None and folder.is_complete():
        return card_summary(model.config, folder.read_metrics(), _folder_counts(folder))
    return {"notice": NOTICE, **model.describe()}


def render(summary: dict[str, Any]) -> str:
    """The card as Markdown."""
    data, point, cal = summary["training_data"], summary["operating_point"], summary["calibration"]
    lines = [
        f"# Model card: {summary['arch']}, {summary['mode']}",
        "",
        f"**{NOTICE}** Not for diagnosis or any clinical decision.",
        "",
        "## Model",
        f"- Architecture: {summary['arch']}; mode {summary['mode']} ({summary['mode_meaning']})",
        f"- Task: {summary['task']}; classes {', '.join(summary['classes'] or [])}"
        + (f"; positive {summary['positive']}" if summary.get("positive") else ""),
        f"- Input: {summary['image_size']} x {summary['image_size']} px",
        _head_line(summary),
        f"- Selected epoch: {summary['selected_epoch']} of {summary['epochs']}",
        "",
        "## Data",
        f"- Source: {data['source']}",
        "- Images per split: "
        + ", ".join(f"{k} {v}" for k, v in (data["split_sizes"] or {}).items()),
    ]
    for split, per_class in (data["class_counts"] or {}).items():
        lines.append(f"- {split} per class: " + ", ".join(f"{k} {v}" for k, v in per_class.items()))
    if data.get("labelling"):
        lines.append("- Labels: " + _labelling(data["labelling"]))
    for split, per_label in (data.get("unknown_counts") or {}).items():
        lines.append(
            f"- {split} unknown label entries (uncertain or not mentioned; masked out of the "
            "loss, class weights, metrics and thresholds): "
            + ", ".join(f"{k} {v}" for k, v in per_label.items())
        )
    lines += ["", "## Operating point"]
    if point["thresholds"]:
        shown = ", ".join(f"{t:.4f}" for t in point["thresholds"])
        lines.append(f"- Threshold {shown} (rule {point['rule']}, chosen on validation data)")
    else:
        lines.append("- The most probable class")
    lines += [
        "",
        "## Calibration",
        f"- Method: {cal['method']}, temperature {_num(cal['temperature'])}",
    ]
    lines.append(
        f"- Test expected calibration error (15 bins): {_num(cal['test_ece'])} "
        f"(before the temperature: {_num(cal['test_ece_uncalibrated'])})"
    )
    lines += ["", "## Test metrics", "", "| metric | value | 95% interval |", "|---|---:|---:|"]
    for name, m in summary["test_metrics"].items():
        ci = m["ci95"]
        interval = f"{_num(ci[0])} – {_num(ci[1])}" if ci and None not in ci else "–"
        lines.append(f"| {name} | {_num(m['value'])} | {interval} |")
    lines += [
        "",
        "## Limitations",
        "- Measured on one test set; other scanners, hospitals and populations may differ.",
        "- A Grad-CAM map shows where the network looked, not why, and is coarse.",
        "",
    ]
    return "\n".join(lines)


POLICIES = {
    "ones": "positive (U-Ones)",
    "zeros": "negative (U-Zeros)",
    "ignore": "unknown, masked out (U-Ignore)",
    "negative": "negative",
}


def _labelling(about: dict[str, Any]) -> str:
    """How a collection manifest's labels were made, in words."""
    text = f"{about.get('collection')} table, view {about.get('view', 'all')}"
    if "uncertain" in about:
        uncertain = POLICIES.get(about["uncertain"], about["uncertain"])
        missing = "unknown, masked out" if about.get("missing") == "ignore" else "negative"
        text += f"; uncertain (-1) entries {uncertain}; blank entries {missing}"
    return text


def _head_line(summary: dict[str, Any]) -> str:
    head = summary.get("head") or "paper"
    if head == "logreg":
        return (
            f"- Head: logreg (L2 logistic regression on standardised features, C = "
            f"{_num(summary.get('probe_strength'))}, chosen on validation; one C per epoch)"
        )
    return {"mlp": "- Head: mlp (one hidden layer of 512)"}.get(head, "- Head: paper (linear)")


def write_model_card(folder: RunFolder, outcome: Assessment) -> None:
    """The run's ``model_card.md``, from the results about to be written."""
    counts = outcome.metrics.get("class_counts") or class_counts(
        outcome.predictions, outcome.model.classes
    )
    folder.write_model_card(render(card_summary(outcome.model.config, outcome.metrics, counts)))


def class_counts(predictions: pd.DataFrame, classes: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Images per class in each split of ``predictions`` (a multi-label image counts once for
    each of its labels)."""
    out = {}
    for split, rows in predictions.groupby("split", sort=False):
        labels = rows.label.fillna("").astype(str).str.split("|")
        out[str(split)] = {c: int(labels.map(lambda names, c=c: c in names).sum()) for c in classes}
    return out


def _folder_counts(folder: RunFolder) -> dict[str, dict[str, int]] | None:
    try:
        metrics = folder.read_metrics()
        return class_counts(folder.read_predictions(None), tuple(metrics["classes"]))
    except (OSError, KeyError, ValueError):
        return None


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}"
