"""A trained detection run: the detector with its spec and options, and what a user does
with it (``medxfer.load(run)``): boxes for new images, ONNX export, mAP on other data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from medxfer.detection.model import DetectorSpec, build_detector
from medxfer.detection.options import DetectionOptions, options_from_dict
from medxfer.device import select_device
from medxfer.storage.model_file import ModelFile, Reloadable


@dataclass
class TrainedDetector(Reloadable):
    FAMILY: ClassVar[str] = "detection"

    model: torch.nn.Module  # eval mode
    spec: DetectorSpec
    options: DetectionOptions | None  # None for model files of the first layout
    source: Path | None = None  # the run folder, if loaded from one

    @classmethod
    def from_file(cls, saved: ModelFile, path: Path) -> TrainedDetector:
        spec = DetectorSpec.from_dict(saved.extra["spec"])
        model = build_detector(spec, load_weights=False)
        model.load_state_dict(saved.state_dict)
        options = options_from_dict(saved.options) if saved.options else None
        return cls(model.eval(), spec, options, path if path.is_dir() else path.parent)

    def predict(
        self, inputs: list, out: str | Path, *, min_score: float = 0.5, device: str = "auto"
    ):
        """``NAME_boxes.png`` per image and every box in ``detections.csv``/``.json``."""
        from medxfer.detection.predict import predict_boxes

        return predict_boxes(self, inputs, Path(out), min_score=min_score, device=device)

    def export(self, path: str | Path | None = None) -> Path:
        """ONNX (checked in onnxruntime), by default ``RUN/model.onnx``."""
        from medxfer.detection.export import export_onnx

        out = Path(path) if path else Path(self.source) / "model.onnx"
        return export_onnx(self.model, self.spec, out)

    def evaluate(self, data: str | Path, split: str = "test", *, device: str = "auto") -> dict:
        """mAP@0.5 and mAP@[.5:.95], overall and per class, on ``split`` of a VOC folder or
        box CSV with this detector's classes."""
        from medxfer.detection.data import box_loader, decode_split, load_detection_data
        from medxfer.detection.engine import evaluate

        found = load_detection_data(data, list(self.spec.classes), needs=(split,))
        dev = select_device(device)
        batch = self.options.batch_size if self.options else 4
        images = box_loader(decode_split(found, split, self.spec.image_size), batch)
        scores = evaluate(self.model.to(dev), images, dev, list(self.spec.classes))
        return {
            "data": str(data),
            "split": split,
            "task": "detection",
            "n": len(found.splits[split]),
            **scores,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "task": "detection",
            "classes": list(self.spec.classes),
            "arch": self.spec.arch,
            "mode": self.spec.mode,
            "image_size": self.spec.image_size,
        }


def load_detector(run: str | Path) -> tuple[torch.nn.Module, DetectorSpec]:
    """The trained detector of a run folder (eval mode, CPU) and its spec."""
    trained = TrainedDetector.load(run)
    return trained.model, trained.spec
