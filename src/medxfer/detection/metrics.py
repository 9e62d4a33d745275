"""COCO mean average precision, overall and per class, via torchmetrics (pycocotools backend)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.detection import MeanAveragePrecision


class DetectionScores:
    """Accumulates predictions and targets; ``compute`` gives mAP@0.5 and mAP@[.5:.95].

    torchmetrics reports per-class AP only at @[.5:.95], so a second metric restricted to
    IoU 0.5 supplies the per-class mAP@0.5. A class with no ground truth in the data gets
    ``None`` (COCO's -1), a class never detected gets 0.
    """

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self._all = MeanAveragePrecision(box_format="xyxy", class_metrics=True)
        self._at50 = MeanAveragePrecision(
            box_format="xyxy", class_metrics=True, iou_thresholds=[0.5]
        )

    def update(self, predictions: list[dict], targets: list[dict]) -> None:
        """Boxes xyxy; labels are class indices from 1 as the detector emits them."""
        preds = [
            {k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in predictions
        ]
        gts = [{k: t[k].detach().cpu() for k in ("boxes", "labels")} for t in targets]
        self._all.update(preds, gts)
        self._at50.update(preds, gts)

    def compute(self) -> dict:
        full, at50 = self._all.compute(), self._at50.compute()
        return {
            "map_50": _value(full["map_50"]),
            "map": _value(full["map"]),
            "per_class": {
                name: {"map_50": _per_class(at50, i + 1), "map": _per_class(full, i + 1)}
                for i, name in enumerate(self.classes)
            },
        }


def _per_class(result: dict, label: int) -> float | None:
    classes = torch.atleast_1d(result["classes"]).tolist()
    if label not in classes:
        return None
    return _value(torch.atleast_1d(result["map_per_class"])[classes.index(label)])


def _value(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if v < 0 else v
