"""Boxes for new images from a trained detection run: a PNG per image with the boxes drawn,
and every box in ``detections.csv`` and ``detections.json`` (original-image pixels). An input
that cannot be read gets a row with its ``error``; the others are still answered."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from medxfer.atomic import write_text, write_with
from medxfer.detection.data import decode_rgb
from medxfer.detection.model import DetectorSpec, build_detector
from medxfer.device import select_device
from medxfer.errors import MedxferError
from medxfer.inference.predict import unique_stem
from medxfer.run.folder import RunFolder

COLUMNS = ["file", "label", "score", "xmin", "ymin", "xmax", "ymax", "error"]
COLOURS = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "white"]


def load_detector(run: Path) -> tuple[torch.nn.Module, DetectorSpec]:
    path = Path(run) / RunFolder.MODEL
    if not path.exists():
        raise MedxferError(f"{run}: no finished detection run ({RunFolder.MODEL} missing)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if "spec" not in saved:
        raise MedxferError(f"{path}: not a detection model")
    spec = DetectorSpec.from_dict(saved["spec"])
    model = build_detector(spec, load_weights=False)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), spec


@torch.inference_mode()
def predict_boxes(
    run: Path, files: list[Path], out: Path, *, min_score: float = 0.5, device: str = "auto"
) -> pd.DataFrame:
    """Detect on ``files``; write ``out/NAME.png`` per image and ``out/detections.{csv,json}``.

    Boxes are in the pixels of the original image; ``min_score`` drops weaker detections.
    Inputs sharing a name get ``NAME.png``, ``NAME_2.png``, ... in the order given. A file
    that cannot be read gets one row with ``error`` set (and no PNG); the others go on.
    """
    model, spec = load_detector(run)
    dev = select_device(device)
    model.to(dev)
    rows: list[list] = []
    stems: set[str] = set()
    for file in files:
        try:
            image, scale = decode_rgb(file, spec.image_size)
        except MedxferError as exc:
            rows.append([str(file)] + [None] * 6 + [str(exc).removeprefix(f"{file}: ")])
            continue
        found = model([image.to(dev).float().div(255)])[0]
        keep = found["scores"] >= min_score
        boxes, scores = found["boxes"][keep].cpu(), found["scores"][keep].cpu()
        names = [spec.classes[i - 1] for i in found["labels"][keep].tolist()]
        stem = unique_stem(file.stem, stems)
        stems.add(stem)
        _draw(image, boxes, names, scores, spec=spec, target=out / f"{stem}.png")
        for name, score, box in zip(names, scores.tolist(), (boxes / scale).tolist(), strict=True):
            rows.append([str(file), name, round(score, 4), *(round(v, 1) for v in box), None])
    frame = pd.DataFrame(rows, columns=COLUMNS)
    write_with(out / "detections.csv", lambda tmp: frame.to_csv(tmp, index=False))
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    write_text(out / "detections.json", json.dumps(records, indent=1) + "\n")
    return frame


def _draw(image, boxes, names, scores, *, spec: DetectorSpec, target: Path) -> None:
    """The boxes at the working resolution (the image as the detector saw it)."""
    colours = [COLOURS[spec.classes.index(n) % len(COLOURS)] for n in names]
    labels = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist(), strict=True)]
    drawn = draw_bounding_boxes(image, boxes, labels=labels, colors=colours, width=1)
    picture = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    write_with(target, lambda tmp: picture.save(tmp, format="PNG"))
