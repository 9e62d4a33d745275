"""The detection family: one run on the trainer (``medxfer.training.trainer``).

boxes -> detector -> epochs -> run folder: ``config.json``, ``history.csv`` (per epoch: train
losses, validation mAP), ``model.pt`` (best epoch by validation mAP@0.5, with its
``DetectorSpec``), ``predictions.csv`` (every test box, true and predicted: the paired
comparisons of a study recompute mAP from it), and ``metrics.json`` last (selected epoch, test
mAP overall and per class with 95% intervals, clipped/dropped box counts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from medxfer.detection.data import (
    DetectionData,
    box_loader,
    box_scales,
    decode_split,
    load_detection_data,
)
from medxfer.detection.engine import detect, evaluate, train_one_epoch
from medxfer.detection.metrics import (
    SUMMARY,
    DetectionScores,
    align,
    box_table,
    detection_intervals,
    match_boxes,
    mean_average_precision,
    paired_detection,
)
from medxfer.detection.model import DetectorSpec, anchors_from_boxes, build_detector
from medxfer.detection.options import DetectionOptions, options_from_dict
from medxfer.detection.trained import TrainedDetector
from medxfer.device import Runtime
from medxfer.errors import MedxferError
from medxfer.evaluation.paired import minus
from medxfer.storage.folder import RunFolder
from medxfer.storage.model_file import ModelFile
from medxfer.training.trainer import EpochState, Family, Log, SeededJob, Trainer

TASK = "detection"


def train_detection(
    options: DetectionOptions, *, log: Callable[[str], None] = print, overwrite: bool = False
) -> Path:
    """Train (resume, or skip if finished) the detection run of ``options``; return its folder.

    Bad input stops the run before anything is written.
    """
    options.validate()
    return Trainer(FAMILY, options, log=log, overwrite=overwrite).run().path


class DetectionJob(SeededJob):
    """One detection run for the trainer: Faster R-CNN on the factory backbone."""

    def __init__(self, options: DetectionOptions, runtime: Runtime, log: Log) -> None:
        self.options, self.runtime = options, runtime
        self.data = data = load_detection_data(options.data, options.classes, options.limit)
        self.tensors = {s: decode_split(data, s, options.image_size) for s in data.splits}
        scale_of = {p: sc for imgs in self.tensors.values() for p, sc in imgs[2].items()}
        anchor_sizes, ratios = anchors_from_boxes(box_scales(data.splits["train"], scale_of))
        self.spec = DetectorSpec(
            arch=options.arch,
            mode=options.mode,
            classes=data.classes,
            image_size=options.image_size,
            anchor_sizes=anchor_sizes,
            aspect_ratios=ratios,
            weights=options.weights,
            fpn_channels=options.fpn_channels,
        )
        torch.manual_seed(options.seed)
        self.network = self.trainable = build_detector(self.spec).to(runtime.device)
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = _optimizer(options, trainable)
        self.val_loader = box_loader(self.tensors["val"], options.batch_size)

    def resolved(self) -> dict:
        return _resolved(self.spec, self.data, self.runtime.device)

    def train_one_epoch(self, epoch: int) -> dict:
        # every random draw of the epoch (order, flips, the detector's box sampling) from the
        # seed and the epoch alone, so that a resumed run is the uninterrupted one
        seed = self.options.seed * 1000 + epoch
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        loader = box_loader(
            self.tensors["train"],
            self.options.batch_size,
            augment=self.options.augment,
            generator=generator,
        )
        losses = train_one_epoch(self.network, self.optimizer, loader, self.runtime.device)
        return {f"train_{k}": v for k, v in losses.items()}

    def evaluate(self, epoch: int) -> dict:
        val = evaluate(self.network, self.val_loader, self.runtime.device, list(self.data.classes))
        # no validation box found at all: mAP undefined, ranked below any defined value
        score = val["map_50"] if val["map_50"] is not None else float("-inf")
        return {"val_map_50": val["map_50"], "val_map": val["map"], "score": score}

    def finish(self, folder: RunFolder, state: EpochState) -> dict:
        test = None
        if self.data.splits.get("test"):
            boxes = detect(
                self.network,
                box_loader(self.tensors["test"], self.options.batch_size),
                self.runtime.device,
            )
            scores = DetectionScores(self.data.classes)
            scores.update(*boxes)
            files = [str(item.path) for item in self.data.splits["test"]]
            table = _test_table(files, boxes, self.data.classes)
            folder.write_predictions(table)
            test = _with_intervals(scores.compute(), table, self.data.classes, self.options)
        extra = {"spec": self.spec.to_dict()}
        saved = ModelFile(TASK, asdict(self.options), self.network.state_dict(), extra)
        saved.save(folder.file(RunFolder.MODEL))
        return _metrics(state, self.data, test, self.runtime.device)

    def epoch_line(self, row: dict) -> str:
        return (
            f"epoch {row['epoch']}: loss {row['train_loss']:.4f}  "
            f"val mAP@0.5 {row['val_map_50'] or 0:.4f} ({row['seconds']:.0f} s)"
        )


def _paired(folders: tuple[RunFolder, RunFolder], resamples: int, seed: int) -> list:
    """Test mAP of both runs recomputed from their box tables, the difference with a
    paired image bootstrap (COCO's matching on each resample)."""
    classes = [f.read_resolved()["detector"]["classes"] for f in folders]
    if classes[0] != classes[1]:
        raise MedxferError(f"other classes ({classes[0]} and {classes[1]})")
    a, b = (match_boxes(f.read_predictions("test"), classes[0]) for f in folders)
    if resamples:
        found = paired_detection(a, b, resamples=resamples, seed=seed)
    else:  # no bootstrap asked for: the values and their difference only
        found = {
            "values_a": mean_average_precision(a),
            "values_b": mean_average_precision(align(a, b)),
        }
    rows = []
    for metric in SUMMARY:
        low, high = (found.get("intervals") or {}).get(metric) or (None, None)
        value_a, value_b = found["values_a"][metric], found["values_b"][metric]
        rows.append(
            {
                "metric": metric,
                "value_a": value_a,
                "value_b": value_b,
                "diff": minus(value_b, value_a),
                "ci_low": low,
                "ci_high": high,
                "p_value": (found.get("p_values") or {}).get(metric),
                "test": "paired bootstrap" if resamples else None,
                "interval": f"{found['method']}, {resamples} resamples" if resamples else None,
            }
        )
    return rows


FAMILY = Family(TASK, options_from_dict, DetectionJob, TrainedDetector.from_file, _paired)


def _optimizer(options: DetectionOptions, params) -> torch.optim.Optimizer:
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    return torch.optim.SGD(params, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)


def _metrics(state: EpochState, data: DetectionData, test: dict | None, device) -> dict:
    row = state.history[state.best_epoch - 1]
    return {
        "task": TASK,
        "selected_epoch": state.best_epoch,
        "selection": "val_map_50",
        "val": {"map_50": row["val_map_50"], "map": row["val_map"]},
        "test": test,
        "boxes": {s: asdict(c) for s, c in data.counts.items()},
        "images": {s: len(items) for s, items in data.splits.items()},
        "device": str(device),
    }


def _resolved(spec: DetectorSpec, data: DetectionData, device) -> dict:
    return {
        "detector": spec.to_dict(),
        "images": {s: len(items) for s, items in data.splits.items()},
        "image_size": spec.image_size,
        "device": str(device),
    }


def _test_table(files: list[str], boxes: tuple[list, list], classes: list[str]):
    """Every true and predicted test box (``predictions.csv``), with its split."""
    table = box_table(files, boxes[0], boxes[1], classes)
    table.insert(0, "split", "test")
    return table


def _with_intervals(test: dict, table, classes: list[str], options: DetectionOptions) -> dict:
    """Test mAP with 95% intervals over images (COCO's matching, recomputed per resample)."""
    if not options.bootstrap:
        return test
    matches = match_boxes(table, classes)
    found = detection_intervals(matches, resamples=options.bootstrap, seed=options.seed)
    method = {k: found[k] for k in ("method", "clusters", "resamples", "level")}
    return {**test, "ci95": found["intervals"], "interval_method": method}
