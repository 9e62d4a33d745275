"""Boxes for new images from a trained detection run: a PNG per image with the boxes drawn,
and every box in ``detections.csv`` and ``detections.json`` (original-image pixels). An input
that cannot be read gets a row with its ``error``; the others are still answered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from medxfer.atomic import write_text, write_with
from medxfer.detection.data import decode_rgb
from medxfer.detection.model import DetectorSpec
from medxfer.device import select_device
from medxfer.errors import MedxferError
from medxfer.inference.predict import check_outputs_apart, expand_inputs, unique_stem

if TYPE_CHECKING:
    from medxfer.detection.trained import TrainedDetector

COLUMNS = ["file", "picture", "label", "score", "xmin", "ymin", "xmax", "ymax", "error"]
COLOURS = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "white"]


@torch.inference_mode()
def predict_boxes(
    trained: TrainedDetector,
    inputs: list,
    out: Path,
    *,
    min_score: float = 0.5,
    device: str = "auto",
) -> pd.DataFrame:
    """Detect on ``inputs`` (files, folders, glob patterns). Writes ``out/NAME_boxes.png``
    per image (the boxes drawn on the image at its own size) and ``detections.{csv,json}``:
    a row per box in the original image's pixels, with the ``picture`` it is drawn on; an
    image with no box above ``min_score`` gets one row with an empty label, a file that
    cannot be read one row with its ``error`` (and no picture), and the others go on.
    Inputs sharing a name get ``NAME_boxes.png``, ``NAME_2_boxes.png``, ... in order."""
    check_outputs_apart(out, inputs)
    files = expand_inputs([str(i) for i in inputs])
    model, spec = trained.model, trained.spec
    dev = select_device(device)
    model.to(dev)
    rows: list[list] = []
    stems: set[str] = set()
    for file in files:
        try:
            image, scale = decode_rgb(file, spec.image_size)
            original, _ = decode_rgb(file, 0)
        except MedxferError as exc:
            rows.append([str(file), None] + [None] * 6 + [str(exc).removeprefix(f"{file}: ")])
            continue
        found = model([image.to(dev).float().div(255)])[0]
        keep = found["scores"] >= min_score
        boxes, scores = found["boxes"][keep].cpu() / scale, found["scores"][keep].cpu()
        names = [spec.classes[i - 1] for i in found["labels"][keep].tolist()]
        stem = unique_stem(file.stem, stems)
        stems.add(stem)
        picture = f"{stem}_boxes.png"
        _draw(original, (boxes, names, scores), spec=spec, target=out / picture)
        for name, score, box in zip(names, scores.tolist(), boxes.tolist(), strict=True):
            rows.append([str(file), picture, name, round(score, 4), *(round(v, 1) for v in box)])
            rows[-1].append(None)
        if not names:
            rows.append([str(file), picture] + [None] * 7)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    write_with(out / "detections.csv", lambda tmp: frame.to_csv(tmp, index=False))
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    write_text(out / "detections.json", json.dumps(records, indent=1) + "\n")
    return frame


def _draw(image: torch.Tensor, found: tuple, *, spec: DetectorSpec, target: Path) -> None:
    """``found`` (boxes in the image's pixels, class names, scores) drawn on ``image``."""
    boxes, names, scores = found
    if names:
        colours = [COLOURS[spec.classes.index(n) % len(COLOURS)] for n in names]
        labels = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist(), strict=True)]
        width = max(1, round(max(image.shape[-2:]) / 320))
        image = draw_bounding_boxes(image, boxes, labels=labels, colors=colours, width=width)
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    write_with(target, lambda tmp: picture.save(tmp, format="PNG"))
