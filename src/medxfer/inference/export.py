"""``medxfer export``: ONNX or TorchScript models that carry their own preprocessing.

The exported graph takes a gray batch (B, 1, S, S), float in [0, 1] (a client only resizes to
S x S and divides by 255), replicates and normalises it inside, and returns the calibrated
positive-class probability (B,).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from medxfer.atomic import write_json, write_with
from medxfer.errors import MedxferError
from medxfer.models.classifier import XrayClassifier
from medxfer.rundir import saved_resolution


class ProbabilityModel(nn.Module):
    def __init__(self, model: XrayClassifier, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model.eval()
        self.temperature = float(temperature)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(gray) / self.temperature)


def export_model(
    model: XrayClassifier, saved: dict, out: Path, fmt: str, dynamic_batch: bool = True
) -> Path:
    """Write the model as ``fmt`` (onnx | torchscript) to ``out``, plus ``out``.json metadata."""
    cfg = saved["config"]
    size = saved_resolution(saved)
    wrapper = ProbabilityModel(model.cpu().float(), saved.get("temperature", 1.0)).eval()
    example = torch.rand(2, 1, size, size)
    out = Path(out)
    if fmt == "onnx":
        write_with(out, lambda tmp: _onnx(wrapper, example, tmp, dynamic_batch))
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example)
        write_with(out, lambda tmp: traced.save(str(tmp)))
    else:
        raise MedxferError(f"--format {fmt!r}: choose onnx or torchscript")
    write_json(
        out.with_suffix(out.suffix + ".json"),
        {
            "format": fmt,
            "input": {
                "name": "gray",
                "shape": ["batch" if dynamic_batch else 2, 1, size, size],
                "dtype": "float32",
                "range": [0, 1],
                "preprocessing": f"grayscale, resize to {size}x{size}, /255",
            },
            "output": {
                "name": "probability",
                "shape": ["batch"],
                "meaning": f"probability of {saved['positive']!r}",
            },
            "threshold": saved["threshold"],
            "positive": saved["positive"],
            "negative": saved["negative"],
            "temperature": saved.get("temperature", 1.0),
            "arch": cfg["arch"],
            "mode": cfg["mode"],
        },
    )
    return out


def _onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> None:
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = {"gray": {0: torch.export.Dim("batch", min=1, max=4096)}}
    program = torch.onnx.export(
        wrapper,
        (example,),
        input_names=["gray"],
        output_names=["probability"],
        dynamo=True,
        verbose=False,
        **kwargs,
    )
    program.save(str(path))


def metadata(path: Path) -> dict:
    return json.loads(Path(str(path) + ".json").read_text())
