"""Dataset sources: a split/class folder tree, a MedMNIST-style .npz, or a CSV manifest.

Each source becomes an :class:`ImageSet`: a list of records (where the pixels come from, the
class name, the split) plus the sorted class names. Pixels are decoded later (see ``cache``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medxfer.data.images import IMAGE_SUFFIXES, is_image_file
from medxfer.errors import MedxferError

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels"))


@dataclass(frozen=True)
class Record:
    """One image: ``source`` is a file path, or ``NPZ#split/index`` for arrays in an .npz."""

    source: str
    label: str
    split: str

    @property
    def name(self) -> str:
        return Path(self.source).name


@dataclass
class ImageSet:
    """Records of one dataset, its classes, and (for .npz sources) the arrays themselves."""

    location: Path
    kind: str
    records: list[Record]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    arrays: dict[str, np.ndarray] | None = None

    def labels(self, positive: str) -> np.ndarray:
        return np.array([r.label == positive for r in self.records], dtype=np.int64)

    def split_indices(self, split: str) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records) if r.split == split], dtype=np.int64)


def open_dataset(location: str | Path, skip_bad: bool = False) -> ImageSet:
    """Open a dataset by what ``location`` is: a folder tree, an ``.npz`` or a ``.csv``."""
    path = Path(location)
    if not path.exists():
        raise MedxferError(f"{path}: dataset not found")
    if path.is_dir():
        imageset = _from_folder(path, skip_bad)
    elif path.suffix.lower() == ".npz":
        imageset = _from_npz(path)
    elif path.suffix.lower() == ".csv":
        imageset = _from_csv(path, skip_bad)
    else:
        raise MedxferError(f"{path}: unknown dataset type (expected a folder, .npz or .csv)")
    _check_binary(imageset)
    return imageset


def resolve_positive(classes: list[str], positive: str | None) -> str:
    """The positive class: as given, else ``PNEUMONIA`` if present, else the second class."""
    if positive is not None:
        if positive not in classes:
            raise MedxferError(f"positive class {positive!r} is not one of the classes {classes}")
        return positive
    return "PNEUMONIA" if "PNEUMONIA" in classes else sorted(classes)[1]


def check_two_classes(imageset: ImageSet, split: str) -> None:
    """Metrics need both classes: refuse a split whose images all share one label."""
    present = {r.label for r in imageset.records if r.split == split}
    if not present:
        raise MedxferError(f"{imageset.location}: split {split!r} has no images")
    if len(present) < 2:
        raise MedxferError(
            f"{imageset.location}: {split} split has only class {present.pop()!r}; "
            "metrics need images of both classes"
        )


def _check_binary(imageset: ImageSet) -> None:
    if len(imageset.classes) != 2:
        raise MedxferError(
            f"{imageset.location}: expected exactly 2 classes, found {len(imageset.classes)} "
            f"({', '.join(imageset.classes) or 'none'})"
        )
    for split in ("train", "test"):
        if not any(r.split == split for r in imageset.records):
            raise MedxferError(f"{imageset.location}: no images in the {split!r} split")


def _from_folder(root: Path, skip_bad: bool) -> ImageSet:
    splits = [s for s in SPLITS if (root / s).is_dir()]
    for required in ("train", "test"):
        if required not in splits:
            raise MedxferError(f"{root / required}: missing split folder (need train/ and test/)")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    for split in splits:
        found = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
        for name in classes:
            if name not in found:
                raise MedxferError(f"{root / split / name}: missing class folder")
        for name in found:
            if name not in classes:
                raise MedxferError(f"{root / split / name}: class folder not present in train/")
        for name in classes:
            folder = root / split / name
            files = sorted(
                p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
            )
            images = []
            for f in files:
                if is_image_file(f):
                    images.append(f)
                elif skip_bad:
                    skipped.append((str(f), "not an image file"))
                else:
                    raise MedxferError(
                        f"{f}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})"
                    )
            if not images:
                raise MedxferError(f"{folder}: empty class folder (no images)")
            records += [Record(str(f), name, split) for f in images]
    return ImageSet(root, "folder", records, classes, skipped)


def _from_npz(path: Path) -> ImageSet:
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise MedxferError(f"{path}: cannot read .npz ({exc})") from None
    missing = [
        k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in arrays
    ]
    if missing:
        raise MedxferError(f"{path}: missing keys {missing} (found {sorted(arrays)})")
    records: list[Record] = []
    labels_seen: set[str] = set()
    for split in SPLITS:
        if f"{split}_images" not in arrays:
            continue
        images, labels = arrays[f"{split}_images"], arrays.get(f"{split}_labels")
        if labels is None:
            raise MedxferError(f"{path}: {split}_images has no matching {split}_labels")
        if images.dtype != np.uint8 or not (
            images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
        ):
            raise MedxferError(
                f"{path}: {split}_images must be uint8 (N,H,W) or (N,H,W,3), "
                f"got {images.dtype} {images.shape}"
            )
        labels = labels.reshape(len(labels), -1) if labels.ndim else labels
        if labels.ndim != 2 or labels.shape[1] != 1 or len(labels) != len(images):
            raise MedxferError(
                f"{path}: {split}_labels must have shape ({len(images)}, 1), got {labels.shape}"
            )
        names = [str(int(v)) for v in labels[:, 0]]
        labels_seen.update(names)
        records += [Record(f"{path}#{split}/{i}", n, split) for i, n in enumerate(names)]
    return ImageSet(path, "npz", records, sorted(labels_seen), arrays=arrays)


def _from_csv(path: Path, skip_bad: bool) -> ImageSet:
    base = path.parent
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = set(reader.fieldnames or [])
        if not {"path", "label", "split"} <= header:
            raise MedxferError(
                f"{path}: CSV header must contain path,label,split (got {sorted(header)})"
            )
        for line, row in enumerate(reader, start=2):
            split = (row["split"] or "").strip()
            if split not in SPLITS:
                raise MedxferError(f"{path}:{line}: split {split!r} is not one of {SPLITS}")
            file = Path(row["path"])
            file = file if file.is_absolute() else base / file
            label = (row["label"] or "").strip()
            if not label:
                raise MedxferError(f"{path}:{line}: empty label")
            problem = None if file.is_file() else "file not found"
            if problem is None and not is_image_file(file):
                problem = "not an image file"
            if problem:
                if not skip_bad:
                    raise MedxferError(f"{file}: {problem} (listed in {path}:{line})")
                skipped.append((str(file), problem))
                continue
            records.append(Record(str(file), label, split))
    classes = sorted({r.label for r in records})
    return ImageSet(path, "csv", records, classes, skipped)
