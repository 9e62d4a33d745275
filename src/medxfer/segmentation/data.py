"""Image/mask pairs for segmentation, decoded once into memory at the working resolution.

Two layouts, both read through one manifest table:

* a folder ``D`` with ``D/split.csv`` (the layout of ``../shared/data/lung_seg``): images and
  masks under ``D`` (usually ``images/NAME.png`` and ``masks/NAME.png``); without a ``mask``
  column the mask of ``images/NAME.png`` is ``masks/NAME.png``;
* a CSV manifest ``path,mask,split[,patient]``, paths relative to the CSV's folder.

Column names: ``path`` or ``image`` is the image (lung_seg's ``image``), ``mask`` its mask,
``split`` one of train/val/test, and an optional ``patient``: images of one patient are not
independent, so intervals resample whole patients when the column is there (an image with a
blank patient is its own patient, ``file:<path>``, as in classification). Other columns
(lung_seg's ``source`` and ``tb``) are ignored; lung_seg has no ``patient`` column: one image
per patient, so images are the units of the bootstrap.
Masks hold the declared label values (default ``0, 255``: binary); the i-th declared value
becomes class i.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from medxfer.data.images import read_gray, resize_square
from medxfer.errors import MedxferError

SPLITS = ("train", "val", "test")
BINARY = (0, 255)


@dataclass
class SegmentationData:
    """``images`` uint8 (N, S, S); ``masks`` uint8 class indices (N, S, S)."""

    images: torch.Tensor
    masks: torch.Tensor
    files: list[str]
    splits: dict[str, torch.Tensor]
    labels: tuple[int, ...]
    patients: list[str] | None = None  # one per image, from the manifest's ``patient`` column

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def load_segmentation(
    location: str | Path,
    size: int,
    *,
    labels: tuple[int, ...] = BINARY,
    needs: tuple[str, ...] = ("train", "test"),
) -> SegmentationData:
    """Read the manifest, decode every pair at ``size`` px; the splits ``needs`` must be there
    (training needs train and test; scoring a trained model, the split it scores). Raises
    MedxferError on bad input."""
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise MedxferError(f"labels {labels}: need at least two distinct mask values")
    table, root = read_manifest(Path(location))
    images, masks = [], []
    for row in table.itertuples(index=False):
        image, mask = load_pair(root / row.path, root / row.mask, size, labels)
        images.append(image)
        masks.append(mask)
    splits = {
        s: torch.from_numpy(np.flatnonzero(table["split"].to_numpy() == s))
        for s in SPLITS
        if (table["split"] == s).any()
    }
    for needed in needs:
        if needed not in splits:
            raise MedxferError(f"{location}: no {needed!r} rows in the split column")
    return SegmentationData(
        images=torch.from_numpy(np.stack(images)),
        masks=torch.from_numpy(np.stack(masks)),
        files=table["path"].tolist(),
        splits=splits,
        labels=tuple(labels),
        patients=patient_ids(table),
    )


def patient_ids(table: pd.DataFrame) -> list[str] | None:
    """The ``patient`` column, blanks as ``file:<path>`` (own cluster); None without it."""
    if "patient" not in table.columns:
        return None
    return [p.strip() or f"file:{f}" for p, f in zip(table["patient"], table["path"], strict=True)]


def read_manifest(location: Path) -> tuple[pd.DataFrame, Path]:
    """The table (columns path, mask, split[, patient]) and the folder its paths are relative
    to."""
    csv = location / "split.csv" if location.is_dir() else location
    if not csv.is_file():
        raise MedxferError(f"{csv}: not found (need a folder with split.csv, or a CSV manifest)")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MedxferError(f"{csv}: unreadable CSV ({exc})") from None
    table = table.rename(columns={"image": "path"})
    for column in ("path", "split"):
        if column not in table.columns:
            raise MedxferError(f"{csv}: no {column!r} column (have {', '.join(table.columns)})")
    if "mask" not in table.columns:
        if not location.is_dir():
            raise MedxferError(f"{csv}: no 'mask' column")
        table["mask"] = ["" if not p else f"masks/{Path(p).name}" for p in table["path"]]
        table.loc[[not (location / m).is_file() for m in table["mask"]], "mask"] = ""
    unknown = sorted(set(table["split"]) - set(SPLITS))
    if unknown:
        raise MedxferError(f"{csv}: unknown split {unknown[0]!r} (use train, val, test)")
    for path, mask in zip(table["path"], table["mask"], strict=True):
        if not mask:
            raise MedxferError(f"{csv.parent / path}: image with no mask")
    columns = ["path", "mask", "split"] + (["patient"] if "patient" in table.columns else [])
    return table[columns].reset_index(drop=True), csv.parent


def load_pair(
    image_path: Path, mask_path: Path, size: int, labels: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Gray uint8 image (bilinear) and class-index mask (nearest) at ``size`` x ``size``."""
    image = read_gray(image_path)
    raw = read_mask(mask_path)
    if raw.shape != image.shape:
        raise MedxferError(
            f"{mask_path}: mask size {raw.shape[1]}x{raw.shape[0]} differs from its image "
            f"{image_path.name} ({image.shape[1]}x{image.shape[0]})"
        )
    return resize_square(image, size), to_classes(raw, labels, mask_path, size)


def read_mask(path: Path) -> np.ndarray:
    """A single-channel mask as a 2-D integer array of its stored values."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "1":
                img = img.convert("L")
            if img.mode not in ("L", "P", "I", "I;16"):
                raise MedxferError(f"{path}: mask must be single-channel, got mode {img.mode}")
            return np.asarray(img).astype(np.int64)
    except FileNotFoundError:
        raise MedxferError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise MedxferError(f"{path}: unreadable mask ({exc})") from None


def to_classes(raw: np.ndarray, labels: tuple[int, ...], path: Path, size: int) -> np.ndarray:
    """Map label values to class indices, then resize with nearest neighbour."""
    lookup = {v: i for i, v in enumerate(labels)}
    values = np.unique(raw)
    bad = [int(v) for v in values if int(v) not in lookup]
    if bad:
        raise MedxferError(
            f"{path}: mask values {bad[:5]} outside the declared labels {list(labels)}"
        )
    classes = np.zeros(raw.shape, dtype=np.uint8)
    for value in values:
        classes[raw == value] = lookup[int(value)]
    if classes.shape == (size, size):
        return classes
    resized = Image.fromarray(classes).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=np.uint8)
