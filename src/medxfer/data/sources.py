"""Dataset sources: a split/class folder tree, a MedMNIST-style .npz, or a CSV manifest.

Each source becomes an :class:`ImageSet`: a list of records (where the pixels come from, the
label, the split, the patient) plus the class names. Pixels are decoded later (see ``cache``);
what the labels mean (binary, multi-class, multi-label) is decided in ``tasks``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medxfer.data.images import IMAGE_SUFFIXES, is_image_file
from medxfer.data.options import KERMANY_PATIENT_REGEX
from medxfer.errors import MedxferError

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels"))
LABEL_SEP = "|"


@dataclass(frozen=True)
class Record:
    """One image: ``source`` is a file path, or ``NPZ#split/index`` for arrays in an .npz.

    ``label`` is the class name; in a multi-label set it is the image's label names joined by
    ``|`` (empty: none), and ``unknown`` the labels whose value is not known for this image
    (uncertain or not mentioned: masked out of loss and metrics). ``patient`` is None when the
    data does not say.
    """

    source: str
    label: str
    split: str
    patient: str | None = None
    unknown: str = ""

    @property
    def name(self) -> str:
        return Path(self.source).name

    @property
    def label_set(self) -> frozenset[str]:
        return frozenset(n for n in self.label.split(LABEL_SEP) if n)

    @property
    def unknown_set(self) -> frozenset[str]:
        return frozenset(n for n in self.unknown.split(LABEL_SEP) if n)


@dataclass
class ImageSet:
    """Records of one dataset, its classes, and (for .npz sources) the arrays themselves.

    ``multilabel`` says the source gives a label set per image (CSV ``labels``, .npz (N, L)).
    """

    location: Path
    kind: str
    records: list[Record]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    arrays: dict[str, np.ndarray] | None = None
    multilabel: bool = False
    labelling: dict | None = None  # how a collection manifest's labels were made (its sidecar)

    def with_records(self, records: list[Record], skipped: list | None = None) -> ImageSet:
        """The same dataset restricted to ``records`` (a subset, or after dropping failures)."""
        return replace(self, records=records, skipped=self.skipped if skipped is None else skipped)

    def split_indices(self, split: str) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records) if r.split == split], dtype=np.int64)


def open_dataset(
    location: str | Path,
    skip_bad: bool = False,
    *,
    patient_regex: str | None = KERMANY_PATIENT_REGEX,
) -> ImageSet:
    """Open a dataset by what ``location`` is: a folder tree, an ``.npz`` or a ``.csv``.

    Records without a patient column get the first group of ``patient_regex`` (or its whole
    match) on their file name as patient; a name it does not match keeps ``patient=None``.
    """
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
    for split in ("train", "test"):
        if not any(r.split == split for r in imageset.records):
            raise MedxferError(f"{imageset.location}: no images in the {split!r} split")
    if patient_regex and imageset.kind != "npz":
        imageset = imageset.with_records(_patients_from_names(imageset.records, patient_regex))
    return imageset


def _patients_from_names(records: list[Record], regex: str) -> list[Record]:
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise MedxferError(
            f"--patient-regex {regex!r}: invalid regular expression ({exc})"
        ) from None
    out = []
    for record in records:
        match = None if record.patient else pattern.search(record.name)
        if match is not None:
            record = replace(record, patient=match.group(1) if pattern.groups else match.group(0))
        out.append(record)
    return out


def _from_folder(root: Path, skip_bad: bool) -> ImageSet:
    splits = [s for s in SPLITS if (root / s).is_dir()]
    for required in ("train", "test"):
        if required not in splits:
            raise MedxferError(f"{root / required}: missing split folder (need train/ and test/)")
    classes = sorted((d.name for d in (root / "train").iterdir() if d.is_dir()), key=_numeric_first)
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
    widths: set[int] = set()
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
        names = _npz_label_names(path, split, labels, len(images))
        widths.add(labels.reshape(len(labels), -1).shape[1] if labels.size else 1)
        records += [Record(f"{path}#{split}/{i}", n, split) for i, n in enumerate(names)]
    if len(widths) > 1:
        raise MedxferError(f"{path}: label widths differ between splits ({sorted(widths)})")
    width = widths.pop()
    if width > 1:
        classes = [str(j) for j in range(width)]
    else:
        classes = sorted({r.label for r in records}, key=_numeric_first)
    return ImageSet(path, "npz", records, classes, arrays=arrays, multilabel=width > 1)


def _npz_label_names(path: Path, split: str, labels: np.ndarray, n: int) -> list[str]:
    """Label names per image: ``(N,)``/``(N, 1)`` class values, or ``(N, L)`` 0/1 label sets."""
    table = labels.reshape(len(labels), -1) if labels.ndim else labels
    fits = table.ndim == 2 and len(table) == n and table.shape[1] >= 1
    integral = fits and np.issubdtype(table.dtype, np.number) and bool((table == table // 1).all())
    if fits and integral and table.shape[1] == 1:
        return [str(int(v)) for v in table[:, 0]]
    if fits and table.shape[1] > 1 and np.isin(table, (0, 1)).all():
        return [LABEL_SEP.join(str(j) for j in np.flatnonzero(row)) for row in table]
    raise MedxferError(
        f"{path}: {split}_labels of shape {labels.shape} fits no task (need ({n}, 1) class "
        f"values, or ({n}, L) 0/1 label sets with L > 1)"
    )


def _numeric_first(name: str) -> tuple:
    """Sort key: integer names in numeric order ("2" before "10"), then the others."""
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def _from_csv(path: Path, skip_bad: bool) -> ImageSet:
    base = path.parent
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        column = _label_column(path, set(reader.fieldnames or []))
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            label = _csv_label(where, column, row[column])
            split = (row["split"] or "").strip()
            if split not in SPLITS:
                raise MedxferError(f"{where}: split {split!r} is not one of {SPLITS}")
            file = Path((row["path"] or "").strip())
            file = file if file.is_absolute() else base / file
            problem = None if file.is_file() else "file not found"
            if problem is None and not is_image_file(file):
                problem = "not an image file"
            if problem:
                if not skip_bad:
                    raise MedxferError(f"{file}: {problem} (listed in {where})")
                skipped.append((str(file), problem))
                continue
            patient = (row.get("patient") or "").strip() or None
            unknown = _unknown(where, column, row, label)
            records.append(Record(str(file), label, split, patient, unknown))
    if column == "labels":
        classes = sorted({n for r in records for n in r.label_set})
        _check_unknown_names(path, records, set(classes))
    else:
        classes = sorted({r.label for r in records}, key=_numeric_first)
    multilabel = column == "labels"
    return ImageSet(
        path, "csv", records, classes, skipped, multilabel=multilabel, labelling=labelling(path)
    )


def labelling(manifest: Path) -> dict | None:
    """``MANIFEST.json`` beside a manifest that ``medxfer manifest --collection`` wrote: the
    collection and the uncertain / missing policies its labels were made with."""
    sidecar = manifest.with_name(manifest.name + ".json")
    if not sidecar.is_file():
        return None
    try:
        about = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedxferError(f"{sidecar}: unreadable ({exc})") from None
    if not isinstance(about, dict):
        raise MedxferError(f"{sidecar}: not a manifest description (a JSON object)")
    return about


def _check_unknown_names(path: Path, records: list[Record], labels: set[str]) -> None:
    """An unknown entry must be of a label the manifest has (a typo would make a class)."""
    for record in records:
        stray = record.unknown_set - labels
        if stray:
            raise MedxferError(
                f"{path}: {record.name}: unknown label {sorted(stray)[0]!r} is never a label "
                "of any image in the manifest"
            )


def _label_column(path: Path, header: set[str]) -> str:
    """``label`` (one class per image) or ``labels`` (``|``-separated label set per image)."""
    columns = header & {"label", "labels"}
    if not {"path", "split"} <= header or len(columns) != 1:
        raise MedxferError(
            f"{path}: CSV header must contain path,split and one of label / labels "
            f"(got {sorted(header)})"
        )
    return columns.pop()


def _unknown(where: str, column: str, row: dict, label: str) -> str:
    """The optional ``unknown`` column of a multi-label manifest: labels not known for the
    image (a label cannot be both positive and unknown)."""
    value = (row.get("unknown") or "").strip()
    if not value:
        return ""
    if column != "labels":
        raise MedxferError(f"{where}: an unknown column needs a multi-label (labels) manifest")
    unknown = _csv_label(where, "labels", value)
    both = set(unknown.split(LABEL_SEP)) & set(label.split(LABEL_SEP)) - {""}
    if both:
        raise MedxferError(f"{where}: {sorted(both)[0]} is both a label and unknown")
    return unknown


def _csv_label(where: str, column: str, value: str | None) -> str:
    if value is None:
        raise MedxferError(f"{where}: row has no {column} column")
    if column == "label":
        if not value.strip():
            raise MedxferError(f"{where}: empty label")
        return value.strip()
    return LABEL_SEP.join(sorted({n.strip() for n in value.split(LABEL_SEP) if n.strip()}))
