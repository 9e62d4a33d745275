"""Using a trained segmentation run: masks and overlays for new images, and ONNX export.

The exported graph takes a gray batch (B, 1, S, S) of floats in [0, 1] and returns per-pixel
class probabilities (B, K, S, S) (softmax over the K classes; for binary masks channel 1 is
the foreground). The export is checked in onnxruntime against PyTorch before it is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medxfer.atomic import write_json, write_with
from medxfer.data.images import read_gray, resize_square
from medxfer.device import select_device
from medxfer.errors import MedxferError
from medxfer.inference.predict import check_outputs_apart, expand_inputs, unique_stem
from medxfer.segmentation.model import SegmentationModel

if TYPE_CHECKING:
    from medxfer.segmentation.trained import TrainedSegmenter

OVERLAY_RGB = (255, 40, 40)
OVERLAY_ALPHA = 0.4
ONNX_TOLERANCE = 1e-4
MASKS_CSV = "masks.csv"  # predict's table of inputs and what was written for each


class ProbabilityModel(nn.Module):
    """``gray (B, 1, S, S) -> softmax probabilities (B, K, S, S)``."""

    def __init__(self, model: SegmentationModel) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(gray), dim=1)


def predict_masks(
    trained: TrainedSegmenter,
    inputs: list[str],
    out_dir: str | Path,
    *,
    device_name: str = "auto",
) -> pd.DataFrame:
    """Write ``NAME_mask.png`` (the run's label values, at the input's own size) and
    ``NAME_overlay.png`` for every readable input image, and ``masks.csv``: a row per input
    with ``file``, ``mask`` and ``overlay`` (names within ``out_dir``; empty for a failed
    input) and ``error`` (empty unless the input could not be read). An unreadable input does
    not stop the others, as in classification's ``predict_files``. Returns that table."""
    check_outputs_apart(out_dir, inputs)
    size = trained.options.image_size
    labels = np.asarray(trained.labels, dtype=np.int64)
    if labels.max() > 255 or labels.min() < 0:
        raise MedxferError(
            f"{trained.source}: label values {labels.tolist()} do not fit an 8-bit PNG"
        )
    wrapper = ProbabilityModel(trained.model.to(select_device(device_name)))
    out_dir = Path(out_dir)
    rows, used = [], set()
    for path in expand_inputs(inputs):
        row = {"file": str(path), "mask": None, "overlay": None, "error": None}
        try:
            gray = read_gray(path)
        except MedxferError as exc:
            rows.append({**row, "error": str(exc).removeprefix(f"{path}: ")})
            continue
        stem = unique_stem(path.stem, used)
        used.add(stem)
        rows.append({**row, **_write_mask(wrapper, gray, (size, labels), out_dir / stem)})
    table = pd.DataFrame(rows, columns=["file", "mask", "overlay", "error"])
    write_with(out_dir / MASKS_CSV, lambda tmp: table.to_csv(tmp, index=False))
    return table


def _write_mask(
    wrapper: ProbabilityModel, gray: np.ndarray, spec: tuple[int, np.ndarray], prefix: Path
) -> dict[str, str]:
    """Predict one gray image at the run's ``size``, write ``PREFIX_mask.png`` (``labels``
    values) and ``PREFIX_overlay.png`` at the image's own size; return their names."""
    size, labels = spec
    device = next(wrapper.parameters()).device
    x = torch.from_numpy(np.array(resize_square(gray, size))).float().div(255.0)[None, None]
    with torch.inference_mode():
        prob = wrapper(x.to(device))
        prob = F.interpolate(prob, size=gray.shape, mode="bilinear", align_corners=False)
    classes = prob.argmax(dim=1)[0].cpu().numpy()
    images = {
        "mask": labels[classes].astype(np.uint8),
        "overlay": _overlay(gray, classes > 0),
    }
    names = {}
    for kind, pixels in images.items():
        target = prefix.with_name(f"{prefix.name}_{kind}.png")
        write_with(target, lambda tmp, p=pixels: Image.fromarray(p).save(tmp, format="PNG"))
        names[kind] = target.name
    return names


def export_onnx(trained: TrainedSegmenter, out: str | Path | None = None) -> Path:
    """Write ``RUN/model.onnx`` (dynamic batch) and its ``.json``; verify it in onnxruntime."""
    size = trained.options.image_size
    wrapper = ProbabilityModel(trained.model.cpu().float())
    out = Path(out) if out else Path(trained.source) / "model.onnx"
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))

    def write(tmp: Path) -> None:
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=["gray"],
            output_names=["probabilities"],
            dynamic_shapes={"gray": {0: torch.export.Dim("batch", min=1, max=4096)}},
            dynamo=True,
            verbose=False,
        )
        program.save(str(tmp))
        gap = onnx_gap(tmp, wrapper, torch.rand(3, 1, size, size))
        if gap > ONNX_TOLERANCE:
            raise MedxferError(f"{out}: ONNX output differs from PyTorch by {gap:.2e}")

    write_with(out, write)
    write_json(
        out.with_suffix(out.suffix + ".json"),
        {
            "format": "onnx",
            "input": {"name": "gray", "shape": ["batch", 1, size, size], "range": [0, 1]},
            "output": {
                "name": "probabilities",
                "shape": ["batch", len(trained.labels), size, size],
                "meaning": "softmax over classes; class i is mask value labels[i]",
            },
            "labels": trained.labels,
            "arch": trained.options.arch,
            "mode": trained.options.mode,
        },
    )
    return out


def onnx_gap(path: Path, wrapper: nn.Module, gray: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime and PyTorch on ``gray``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"gray": gray.numpy()})[0]
    with torch.inference_mode():
        want = wrapper(gray).numpy()
    return float(np.abs(got - want).max())


def _overlay(gray: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    tint = np.asarray(OVERLAY_RGB, dtype=np.float32)
    rgb[foreground] = (1 - OVERLAY_ALPHA) * rgb[foreground] + OVERLAY_ALPHA * tint
    return np.round(rgb).astype(np.uint8)
