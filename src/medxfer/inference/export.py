"""``medxfer export``: ONNX or TorchScript models that carry their own preprocessing.

The exported graph takes a batch (B, C, S, S), float in [0, 1] (C = 1 for gray models, 3 for
colour ones; a client only resizes to S x S and divides by 255), normalises it inside (and
replicates gray into RGB), and returns calibrated probabilities: (B,) of the positive class
(binary), (B, K) softmax (multi-class) or (B, L) sigmoids (multi-label).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from medxfer.atomic import write_json, write_with
from medxfer.errors import MedxferError

if TYPE_CHECKING:  # inference takes a trained model; it never loads one
    from medxfer.classification.trained import TrainedModel


class ProbabilityModel(nn.Module):
    """The network followed by the task's activation at the run's temperature."""

    def __init__(self, model: TrainedModel) -> None:
        super().__init__()
        self.network = model.network.eval()
        self.temperature = float(model.temperature)
        self.softmax = model.task.name == "multiclass"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.network(image) / self.temperature
        return torch.softmax(logits, dim=1) if self.softmax else torch.sigmoid(logits)


def export_model(
    model: TrainedModel, out: Path, fmt: str, card: dict, dynamic_batch: bool = True
) -> Path:
    """Write the model as ``fmt`` (onnx | torchscript) to ``out``, plus ``out``.json metadata
    with ``card``, the model card's summary (its ``notice`` first)."""
    size = model.resolution
    model.network.cpu().float()
    wrapper = ProbabilityModel(model).eval()
    example = torch.rand(2, model.channels, size, size)
    out = Path(out)
    if fmt == "onnx":
        write_with(out, lambda tmp: _onnx(wrapper, example, tmp, dynamic_batch))
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example)
        write_with(out, lambda tmp: traced.save(str(tmp)))
    else:
        raise MedxferError(f"--format {fmt!r}: choose onnx or torchscript")
    output_shape = ["batch"] if model.task.outputs == 1 else ["batch", model.task.outputs]
    meaning = {
        "binary": f"probability of {model.classes[1]!r}",
        "multiclass": f"softmax over the classes {list(model.classes)}",
        "multilabel": f"probability of each label {list(model.classes)}",
    }[model.task.name]
    write_json(
        out.with_suffix(out.suffix + ".json"),
        {
            "format": fmt,
            "input": {
                "name": "image",
                "shape": ["batch" if dynamic_batch else 2, model.channels, size, size],
                "dtype": "float32",
                "range": [0, 1],
                "preprocessing": f"{model.color}, resize to {size}x{size}, /255",
            },
            "output": {"name": "probability", "shape": output_shape, "meaning": meaning},
            **model.describe(),
            "test_time_views": {
                "run": model.config.tta,
                "graph": 1,
                "note": "the run's probabilities and thresholds average its test-time views; "
                "this graph scores one view (the image itself)",
            },
            "notice": card["notice"],
            "model_card": card,
        },
    )
    return out


def _onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> None:
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = {"image": {0: torch.export.Dim("batch", min=1, max=4096)}}
    program = torch.onnx.export(
        wrapper,
        (example,),
        input_names=["image"],
        output_names=["probability"],
        dynamo=True,
        verbose=False,
        **kwargs,
    )
    program.save(str(path))


def metadata(path: Path) -> dict:
    return json.loads(Path(str(path) + ".json").read_text())
