"""Box-annotated colour images: Pascal VOC folders or a CSV of boxes, split into train/val/test.

Two layouts are read:

1. **VOC**: ``Annotations/*.xml``, ``JPEGImages/`` and ``ImageSets/Main/{train,val,test}.txt``
   (the folder itself or its one sub-folder holding them, as in ``bccd/BCCD``).
2. **CSV**: ``path,split,label,xmin,ymin,xmax,ymax``, one row per box, paths relative
   to the CSV's folder.

Coordinates are pixel edges in the original image. A box reaching outside its image is clipped
to it; a box with no area after clipping (BCCD has two single-point boxes) is dropped; an image
left without boxes is skipped. All three are counted (``BoxCounts``) for the run's metrics.

An XML with no objects at all is an error, not a skip: on cell images it almost always means an
unfinished annotation, and training on it would teach the detector that its cells are
background. Remove it from the split lists (or annotate it).

Images stay in colour (RGB): microscope stains carry the class information.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from medxfer.errors import MedxferError

SPLITS = ("train", "val", "test")
CSV_COLUMNS = ("path", "split", "label", "xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True)
class Annotated:
    """One image and its boxes (xyxy, original pixels) with their class names."""

    path: Path
    boxes: np.ndarray
    labels: tuple[str, ...]


@dataclass
class BoxCounts:
    clipped: int = 0  # boxes that reached outside their image and were cut to it
    dropped: int = 0  # boxes with no area after clipping
    images_without_boxes: int = 0  # images skipped because all their boxes were dropped


@dataclass
class DetectionData:
    classes: tuple[str, ...]
    splits: dict[str, list[Annotated]]
    counts: dict[str, BoxCounts] = field(default_factory=dict)  # per split

    def label_ids(self, item: Annotated) -> torch.Tensor:
        """Class indices from 1 (0 is the detector's background)."""
        index = {c: i + 1 for i, c in enumerate(self.classes)}
        return torch.tensor([index[name] for name in item.labels], dtype=torch.int64)


def load_detection_data(
    source: str | Path,
    classes: list[str] | None = None,
    limit: int | None = None,
    *,
    needs: tuple[str, ...] = ("train", "val"),
) -> DetectionData:
    """Read, clip and check the annotations of ``source`` (VOC folder or CSV).

    ``classes``: the declared classes; default the classes of the training boxes (sorted).
    Any box of another class is an error naming its file. ``limit``: the first N images of
    each split only (quick looks, tests). ``needs``: the splits that must hold images
    (training needs train and val; scoring a trained model, the split it scores).
    """
    source = Path(source)
    if source.suffix.lower() == ".csv":
        raw = _read_csv(source)
    elif source.is_dir():
        raw = _read_voc(_voc_root(source))
    else:
        raise MedxferError(f"{source}: not a VOC folder or a .csv of boxes")
    if limit:
        raw = {split: items[:limit] for split, items in raw.items()}
    for split in needs:
        if not raw.get(split):
            raise MedxferError(f"{source}: no images in the {split} split")
    found = {n for a in raw.get("train", []) for n in a[2]}
    declared = tuple(classes) if classes else tuple(sorted(found))
    splits: dict[str, list[Annotated]] = {}
    counts: dict[str, BoxCounts] = {}
    for split, items in raw.items():
        counts[split] = BoxCounts()
        splits[split] = [
            a for a in (_clean(item, declared, counts[split]) for item in items) if a is not None
        ]
    return DetectionData(declared, splits, counts)


def decode_rgb(path: Path, size: int) -> tuple[torch.Tensor, float]:
    """The image as uint8 (3, h, w) with its longer side resized to ``size`` (0: as it is);
    and that scale."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MedxferError(f"{path}: unreadable image ({exc})") from None
    scale = size / max(rgb.size) if size else 1.0
    new = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    if new != rgb.size:
        rgb = rgb.resize(new, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1), scale


def box_scales(items: list[Annotated], scale_of: dict[Path, float]) -> np.ndarray:
    """sqrt(w * h) and h / w of every box at the working resolution, shape (N, 2)."""
    rows = [a.boxes * scale_of[a.path] for a in items if len(a.boxes)]
    boxes = np.concatenate(rows) if rows else np.zeros((0, 4))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.stack([np.sqrt(w * h), h / w], axis=1)


RawItem = tuple[Path, np.ndarray, list[str], str]  # image, boxes, names, where it was read


def _clean(item: RawItem, classes: tuple[str, ...], counts: BoxCounts) -> Annotated | None:
    path, boxes, names, origin = item
    for name in names:
        if name not in classes:
            raise MedxferError(f"{origin}: unknown class {name!r} (classes: {', '.join(classes)})")
    width, height = _image_size(path)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    changed = (clipped != boxes).any(axis=1)
    counts.clipped += int((changed & keep).sum())
    counts.dropped += int((~keep).sum())
    if not keep.any():
        counts.images_without_boxes += 1
        return None
    return Annotated(path, clipped[keep].astype(np.float32), tuple(np.array(names)[keep]))


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise MedxferError(f"{path}: image file not found") from None
    except (OSError, ValueError) as exc:
        raise MedxferError(f"{path}: unreadable image ({exc})") from None


def _voc_root(folder: Path) -> Path:
    if (folder / "Annotations").is_dir():
        return folder
    inner = [d for d in folder.iterdir() if (d / "Annotations").is_dir()]
    if len(inner) != 1:
        raise MedxferError(f"{folder}: no Annotations/ folder (VOC layout) in it or one level down")
    return inner[0]


def _read_voc(root: Path) -> dict[str, list[RawItem]]:
    raw: dict[str, list[RawItem]] = {}
    for split in SPLITS:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if listing.exists():
            names = listing.read_text().split()
            raw[split] = [_read_xml(root, root / "Annotations" / f"{n}.xml") for n in names]
    return raw


def _read_xml(root: Path, xml: Path) -> RawItem:
    try:
        tree = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as exc:
        raise MedxferError(f"{xml}: unreadable annotation ({exc})") from None
    objects = tree.findall("object")
    if not objects:
        raise MedxferError(
            f"{xml}: no objects (annotate it or remove it from ImageSets/Main: an unannotated "
            "cell image would be learnt as background)"
        )
    try:
        boxes = [
            [float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            for o in objects
        ]
    except (TypeError, ValueError):
        raise MedxferError(f"{xml}: a box lacks a numeric xmin/ymin/xmax/ymax") from None
    names = [(o.findtext("name") or "").strip() for o in objects]
    filename = tree.findtext("filename") or f"{xml.stem}.jpg"
    return root / "JPEGImages" / filename, np.array(boxes, dtype=np.float64), names, str(xml)


def _read_csv(path: Path) -> dict[str, list[RawItem]]:
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise MedxferError(f"{path}: unreadable CSV ({exc})") from None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise MedxferError(f"{path}: missing columns {', '.join(missing)}")
    unknown = set(frame["split"]) - set(SPLITS)
    if unknown:
        raise MedxferError(f"{path}: unknown split {sorted(map(str, unknown))[0]!r}")
    coords = frame[["xmin", "ymin", "xmax", "ymax"]]
    if (
        not all(pd.api.types.is_numeric_dtype(t) for t in coords.dtypes)
        or coords.isna().to_numpy().any()
    ):
        raise MedxferError(f"{path}: xmin/ymin/xmax/ymax must all be numbers")
    blank = frame["label"].isna() | (frame["label"].astype(str).str.strip() == "")
    if blank.any():
        row = int(np.flatnonzero(blank.to_numpy())[0]) + 2  # 1-based, after the header
        raise MedxferError(f"{path}: line {row}: box with no label")
    splits_of = frame.groupby("path")["split"].nunique()
    if (splits_of > 1).any():
        image = splits_of[splits_of > 1].index[0]
        raise MedxferError(f"{path}: {image} is listed in more than one split")
    raw: dict[str, list[RawItem]] = {}
    for (split, image), rows in frame.groupby(["split", "path"], sort=False):
        boxes = rows[["xmin", "ymin", "xmax", "ymax"]].to_numpy(np.float64)
        names = [str(n).strip() for n in rows["label"]]
        item = (path.parent / image, boxes, names, f"{path} ({image})")
        raw.setdefault(split, []).append(item)
    return raw


class BoxDataset(Dataset):
    """Decoded images (uint8, working resolution) and targets; flips when ``augment``.

    Horizontal and vertical flips only: a microscope field has no up or left, and both leave
    the cells' sizes, on which the anchors are based, unchanged.
    """

    def __init__(self, images: list[torch.Tensor], targets: list[dict], augment: bool) -> None:
        self.images, self.targets = images, targets
        self.flip = (
            v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]) if augment else None
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        image, target = self.images[i], self.targets[i]
        if self.flip is None:
            return image, target
        boxes = tv_tensors.BoundingBoxes(
            target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:])
        )
        image, boxes = self.flip(tv_tensors.Image(image), boxes)
        return image.as_subclass(torch.Tensor), {**target, "boxes": boxes.as_subclass(torch.Tensor)}


def decode_split(data: DetectionData, split: str, size: int):
    """Images of ``split`` at the working resolution, their targets, and each image's scale."""
    images, targets, scales = [], [], {}
    for item in data.splits[split]:
        image, scale = decode_rgb(item.path, size)
        boxes = torch.from_numpy(item.boxes * scale).float()
        images.append(image)
        targets.append({"boxes": boxes, "labels": data.label_ids(item)})
        scales[item.path] = scale
    return images, targets, scales


def box_loader(tensors, batch_size: int, *, augment: bool = False, generator=None) -> DataLoader:
    """Batches of decoded images and targets (lists, as torchvision's detectors take them);
    shuffled and flipped when a ``generator`` is given (training)."""
    images, targets, _ = tensors
    training = generator is not None
    return DataLoader(
        BoxDataset(images, targets, augment=training and augment),
        batch_size=batch_size,
        shuffle=training,
        generator=generator,
        collate_fn=lambda batch: tuple(map(list, zip(*batch, strict=True))),
    )
