"""A trained segmentation run: the network with its options and mask labels, and what a
user does with it (``medxfer.load(run)``): masks for new images, ONNX export, metrics on
other data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from medxfer.device import inference_batch_size, select_device
from medxfer.segmentation.model import SegmentationModel
from medxfer.segmentation.options import SegmentationOptions, options_from_dict
from medxfer.storage.model_file import ModelFile, Reloadable


@dataclass
class TrainedSegmenter(Reloadable):
    FAMILY: ClassVar[str] = "segmentation"

    model: SegmentationModel  # eval mode
    options: SegmentationOptions
    labels: list[int]  # mask value of each class index
    source: Path | None = None  # the run folder, if loaded from one

    @classmethod
    def from_file(cls, saved: ModelFile, path: Path) -> TrainedSegmenter:
        options = options_from_dict(saved.options)
        labels = list(saved.extra["labels"])
        model = SegmentationModel(
            options.model_spec, len(labels), options.decoder_width, load_weights=False
        )
        model.load_state_dict(saved.state_dict)
        folder = path if path.is_dir() else path.parent
        return cls(model.eval(), options, labels, folder)

    def predict(self, inputs: list[str], out_dir: str | Path, *, device: str = "auto"):
        """``NAME_mask.png`` and ``NAME_overlay.png`` per input and ``masks.csv``."""
        from medxfer.segmentation.inference import predict_masks

        return predict_masks(self, inputs, out_dir, device_name=device)

    def export(self, path: str | Path | None = None) -> Path:
        """ONNX (checked in onnxruntime), by default ``RUN/model.onnx``."""
        from medxfer.segmentation.inference import export_onnx

        return export_onnx(self, path)

    def evaluate(self, data: str | Path, split: str = "test", *, device: str = "auto") -> dict:
        """Per-image Dice, IoU, pixel accuracy and HD95 of ``split`` of a manifest, averaged
        (the same numbers a run's ``metrics.json`` reports for its own test split)."""
        from medxfer.segmentation.data import load_segmentation
        from medxfer.segmentation.engine import Loader, evaluate
        from medxfer.segmentation.losses import SegmentationLoss
        from medxfer.segmentation.metrics import per_image, summarize

        size, labels = self.options.image_size, tuple(self.labels)
        found = load_segmentation(data, size, labels=labels, needs=(split,))
        dev = select_device(device)
        batch = inference_batch_size(self.options.eval_batch_size, dev)
        rows_of = found.splits[split]
        loader = Loader(found.images, found.masks, rows_of, batch)
        o = self.options
        criterion = SegmentationLoss(o.criterion, ce_weight=o.ce_weight, dice_weight=o.dice_weight)
        loss, pred = evaluate(self.model.to(dev), criterion, loader, device=dev)
        rows = per_image(pred, found.masks[rows_of], found.num_classes)
        metrics: dict[str, Any] = {"loss": loss, **summarize(rows, resamples=0)}
        return {
            "data": str(data),
            "split": split,
            "task": "segmentation",
            "n": len(rows_of),
            **metrics,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "task": "segmentation",
            "labels": self.labels,
            "arch": self.options.arch,
            "mode": self.options.mode,
            "image_size": self.options.image_size,
        }
