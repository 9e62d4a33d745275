"""A trained detector as ONNX: one RGB image in, its boxes, labels and scores out.

The graph takes ``image`` float32 (3, H, W) in [0, 1] with its longer side at the run's
working resolution S (a client resizes as ``detection.data.decode_rgb`` does and divides by
255; the detector normalises inside) and returns ``boxes`` (N, 4) in those pixels (x1, y1,
x2, y2), ``labels`` (N,) int64 (class ``classes[label - 1]``) and ``scores`` (N,).

It is written by torch's TorchScript-based exporter (``dynamo=False``, opset 17): the
``torch.export`` path refuses Faster R-CNN's data-dependent shapes (the number of boxes that
survive NMS; measured with torch 2.14), while the traced graph is the one torchvision's own
ONNX tests exercise. The export is kept only if onnxruntime agrees with PyTorch on real-sized
inputs: the same number of boxes, boxes within ``BOX_TOLERANCE`` pixels and scores within
``SCORE_TOLERANCE`` (measured gaps: about 1e-5 px and 1e-7).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medxfer.atomic import write_json, write_with
from medxfer.detection.model import DetectorSpec
from medxfer.errors import MedxferError

OPSET = 17
BOX_TOLERANCE = 1e-3  # pixels at the working resolution
SCORE_TOLERANCE = 1e-4
OUTPUTS = ("boxes", "labels", "scores")


class ImageDetector(nn.Module):
    """``image (3, S, S) -> boxes, labels, scores`` of torchvision's list-of-dicts detector."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        found = self.detector([image])[0]
        return found["boxes"], found["labels"], found["scores"]


def export_onnx(detector: nn.Module, spec: DetectorSpec, out: Path) -> Path:
    """Write ``out`` and ``out.json``; refuse (one line) an export onnxruntime disagrees with."""
    wrapper = ImageDetector(detector.cpu().float()).eval()
    size = spec.image_size
    examples = _check_images(size)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():  # the tracer's notes on Python control flow
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (examples[0],),
                str(tmp),
                input_names=["image"],
                output_names=list(OUTPUTS),
                dynamic_axes={"image": {1: "height", 2: "width"}},
                opset_version=OPSET,
                dynamo=False,
            )
        for image in examples:
            check_agreement(tmp, wrapper, image, name=out)

    out = Path(out)
    write_with(out, write)
    write_json(out.with_suffix(out.suffix + ".json"), _sidecar(spec))
    return out


def check_agreement(
    path: Path, wrapper: nn.Module, image: torch.Tensor, name: Path | None = None
) -> None:
    """onnxruntime's detections for ``image`` are PyTorch's (within tolerance), matched one
    to one whatever their order: detections of equal score may come out in either order.
    ``name`` is the file the message names (``path`` may be a temporary file)."""
    got = run_onnx(path, image)
    with torch.inference_mode():
        want = [t.numpy() for t in wrapper(image)]
    name = name or path
    if got[0].shape != want[0].shape:
        raise MedxferError(
            f"{name}: ONNX found {len(got[0])} boxes where PyTorch found {len(want[0])}"
        )
    gaps = _unmatched_gaps(got, want)
    if gaps:
        raise MedxferError(f"{name}: ONNX output differs from PyTorch ({gaps}, labels checked)")


def _unmatched_gaps(got: list[np.ndarray], want: list[np.ndarray]) -> dict | None:
    """None when every PyTorch detection has its own ONNX detection of the same label with
    the box and score within tolerance; else the gaps of the first one that has none."""
    free = np.ones(len(got[0]), dtype=bool)
    for box, label, score in zip(*want, strict=True):
        box_gap = np.abs(got[0] - box).max(axis=1, initial=0.0)
        score_gap = np.abs(got[2] - score)
        fits = free & (got[1] == label) & (box_gap <= BOX_TOLERANCE)
        fits &= score_gap <= SCORE_TOLERANCE
        if not fits.any():
            near = int(np.argmin(box_gap + np.where(got[1] == label, 0.0, np.inf)))
            return {"boxes": float(box_gap[near]), "scores": float(score_gap[near])}
        free[np.flatnonzero(fits)[0]] = False
    return None


def run_onnx(path: Path, image: torch.Tensor) -> list[np.ndarray]:
    """The graph's (boxes, labels, scores) for one image, in onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(list(OUTPUTS), {"image": image.numpy()})


def _check_images(size: int) -> list[torch.Tensor]:
    """Inputs the export is traced on and checked with: smooth noise, square and at a
    microscope's 4:3 (many candidate boxes), and a flat grey field (few or none), so that the
    box count, the values and a second input shape are all compared."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(3, max(size // 16, 1), max(size // 16, 1), generator=generator)

    def noise(height: int) -> torch.Tensor:
        scaled = nn.functional.interpolate(coarse[None], size=(height, size), mode="bilinear")
        return scaled[0].clamp(0, 1)

    return [noise(size), noise(size * 3 // 4), torch.full((3, size, size), 0.5)]


def _sidecar(spec: DetectorSpec) -> dict:
    size = spec.image_size
    return {
        "format": "onnx",
        "opset": OPSET,
        "input": {
            "name": "image",
            "shape": [3, "height", "width"],
            "dtype": "float32",
            "range": [0, 1],
            "preprocessing": f"rgb, longer side resized to {size}, /255",
        },
        "outputs": {
            "boxes": "(N, 4) x1, y1, x2, y2 in the working resolution's pixels",
            "labels": "(N,) int64; class name = classes[label - 1]",
            "scores": "(N,) float32",
        },
        "classes": list(spec.classes),
        "arch": spec.arch,
        "mode": spec.mode,
        "image_size": size,
        "notice": "Research use only, not a medical device.",
    }
