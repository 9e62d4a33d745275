"""The public chest X-ray collections' own tables, read into manifest rows.

- NIH ChestX-ray14: ``Data_Entry_2017*.csv`` (``Image Index``, ``Finding Labels`` with ``|``
  between findings and ``No Finding`` for none, ``Patient ID``, ``View Position``), the official
  split in ``train_val_list.txt`` / ``test_list.txt``, images anywhere under the root (the
  release spreads them over ``images_NNN/images/``).
- CheXpert (``train.csv``, ``valid.csv``): ``Path`` relative to the folder above the release,
  ``Frontal/Lateral``, one column per finding holding 1 (positive), 0 (negative), -1 (uncertain)
  or blank (not mentioned); the patient is the ``patientNNNNN`` part of the path. ``train.csv``
  is the train split (validation is carved from it by patient, as for any data) and
  ``valid.csv`` the test split, since CheXpert's own test set is not public.
- MIMIC-CXR-JPG: CheXpert's label convention in ``mimic-cxr-2.0.0-chexpert.csv[.gz]`` (one row
  per study), the official split in ``mimic-cxr-2.0.0-split.csv[.gz]`` (train / validate /
  test per image), views in ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (``ViewPosition``), images at
  ``files/pNN/pSUBJECT/sSTUDY/DICOM.jpg``; the patient is the subject.

Uncertain (-1) entries are positive (U-Ones), negative (U-Zeros) or unknown (U-Ignore, Irvin
et al. 2019); blank entries are negative (CheXpert's convention) or unknown (``missing
ignore``). Unknown entries are written to the manifest's ``unknown`` column and masked out of
the loss, class weights, metrics and thresholds.

Every check runs before the manifest is written, and each problem is one line naming the file
and the row; ``skip_bad`` reports and leaves out rows whose image is missing instead.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medxfer.errors import MedxferError

COLLECTIONS = ("chestxray14", "chexpert", "mimic-cxr")
VIEWS = ("frontal", "lateral", "all")
UNCERTAIN = ("ones", "zeros", "ignore")  # U-Ones, U-Zeros, U-Ignore of Irvin et al. 2019
MISSING = ("negative", "ignore")  # a blank entry: CheXpert's convention, or unknown
CHEXPERT_INFO = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
MIMIC_INFO = ("subject_id", "study_id")
CHEXPERT_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None}
FRONTAL_POSITIONS = {"PA", "AP"}  # ChestX-ray14's and MIMIC's view positions; LL is lateral
MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}


@dataclass(frozen=True)
class Row:
    """One image of a manifest: its file, label set, unknown labels, split and patient."""

    path: Path
    labels: frozenset[str]
    split: str
    patient: str
    unknown: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LabelPolicy:
    """How CheXpert-convention entries become labels: ``uncertain`` for -1, ``missing`` for
    blank."""

    uncertain: str = "zeros"
    missing: str = "negative"

    def read(self, where: str, row: dict, info: tuple[str, ...]) -> tuple[frozenset, frozenset]:
        """(positive labels, unknown labels) of one table row; every other column is a
        finding holding 1, 0, -1 or blank."""
        positive, unknown = set(), set()
        for column, value in row.items():
            if column in info or column is None:
                continue
            text = (value or "").strip()
            if text not in CHEXPERT_VALUES:
                raise MedxferError(f"{where}: {column} is {text!r}, not 1, 0, -1 or blank")
            code = CHEXPERT_VALUES[text]
            if code == 1 or (code == -1 and self.uncertain == "ones"):
                positive.add(column)
            elif (code == -1 and self.uncertain == "ignore") or (
                code is None and self.missing == "ignore"
            ):
                unknown.add(column)
        return frozenset(positive), frozenset(unknown)


@dataclass
class Collected:
    rows: list[Row]
    skipped: list[tuple[str, str]]


def read_collection(
    root: str | Path,
    collection: str,
    *,
    view: str = "all",
    uncertain: str = "zeros",
    missing: str = "negative",
    skip_bad: bool = False,
) -> Collected:
    """The rows of ``collection`` found under ``root``, filtered on ``view``."""
    root = Path(root)
    for flag, value, choices in (
        ("--collection", collection, COLLECTIONS),
        ("--view", view, VIEWS),
        ("--uncertain", uncertain, UNCERTAIN),
        ("--missing", missing, MISSING),
    ):
        if value not in choices:
            raise MedxferError(f"{flag} {value}: not one of {', '.join(choices)}")
    if not root.is_dir():
        raise MedxferError(f"{root}: not a folder")
    if collection == "chestxray14":
        return _chestxray14(root, view, skip_bad)
    policy = LabelPolicy(uncertain, missing)
    if collection == "chexpert":
        return _chexpert(root, view, policy, skip_bad)
    return _mimic(root, view, policy, skip_bad)


# -- ChestX-ray14 --------------------------------------------------------------------------
def _chestxray14(root: Path, view: str, skip_bad: bool) -> Collected:
    table = _one(root, "Data_Entry_2017*.csv")
    split_of = {}
    for split, name in (("train", "train_val_list.txt"), ("test", "test_list.txt")):
        for where, image in _lines(root / name):
            if image in split_of:
                raise MedxferError(f"{where}: {image} is listed twice in the official split")
            split_of[image] = (split, where)
    files = {p.name: p for p in root.rglob("*.png")}
    rows, skipped, listed = [], [], set()
    for where, row in _csv_rows(table, ("Image Index", "Finding Labels", "Patient ID")):
        image = row["Image Index"].strip()
        if image not in split_of:
            raise MedxferError(
                f"{where}: {image} is in neither train_val_list.txt nor test_list.txt"
            )
        listed.add(image)
        position = (row.get("View Position") or "").strip().upper()
        if view != "all" and (position in FRONTAL_POSITIONS) != (view == "frontal"):
            continue
        if image not in files:
            problem = f"file not found under {root} (listed in {where})"
            if not skip_bad:
                raise MedxferError(f"{image}: {problem}")
            skipped.append((image, problem))
            continue
        findings = {f.strip() for f in row["Finding Labels"].split("|") if f.strip()}
        labels = frozenset(findings - {"No Finding"})
        rows.append(Row(files[image], labels, split_of[image][0], row["Patient ID"].strip()))
    for image, (_split, where) in split_of.items():
        if image not in listed:
            raise MedxferError(f"{where}: {image} is not in {table.name}")
    _check_patients(rows)
    return Collected(rows, skipped)


# -- CheXpert ------------------------------------------------------------------------------
def _chexpert(root: Path, view: str, policy: LabelPolicy, skip_bad: bool) -> Collected:
    rows, skipped = [], []
    for split, name in (("train", "train.csv"), ("test", "valid.csv")):
        table = root / name
        if not table.is_file():
            raise MedxferError(
                f"{table}: not found (a CheXpert root holds train.csv and valid.csv)"
            )
        for where, row in _csv_rows(table, ("Path", "Frontal/Lateral")):
            if view != "all" and row["Frontal/Lateral"].strip().lower() != view:
                continue
            labels, unknown = policy.read(where, row, CHEXPERT_INFO)
            file = _chexpert_file(root, row["Path"].strip())
            if file is None:
                problem = f"file not found (listed in {where})"
                if not skip_bad:
                    raise MedxferError(f"{row['Path'].strip()}: {problem}")
                skipped.append((row["Path"].strip(), problem))
                continue
            match = re.search(r"(patient\d+)", row["Path"])
            if match is None:
                raise MedxferError(f"{where}: no patientNNNNN in the path {row['Path']!r}")
            rows.append(Row(file, labels, split, match.group(1), unknown))
    _check_patients(rows)
    return Collected(rows, skipped)


def _chexpert_file(root: Path, relative: str) -> Path | None:
    """``Path`` is relative to the folder above the release (``CheXpert-v1.0-small/...``);
    accept it relative to the root as well."""
    for base in (root.parent, root):
        if (base / relative).is_file():
            return base / relative
    return None


# -- MIMIC-CXR-JPG --------------------------------------------------------------------------
def _mimic(root: Path, view: str, policy: LabelPolicy, skip_bad: bool) -> Collected:
    studies = {}
    labels_table = _mimic_table(root, "chexpert")
    for where, row in _csv_rows(labels_table, MIMIC_INFO):
        study = row["study_id"].strip()
        if study in studies:
            raise MedxferError(f"{where}: study {study} has a second row of labels")
        studies[study] = (row["subject_id"].strip(), *policy.read(where, row, MIMIC_INFO))
    positions = {}
    metadata = _mimic_table(root, "metadata")
    for _where, row in _csv_rows(metadata, ("dicom_id", "ViewPosition")):
        positions[row["dicom_id"].strip()] = row["ViewPosition"].strip().upper()
    split_table = _mimic_table(root, "split")
    rows, skipped = [], []
    for where, row in _csv_rows(split_table, ("dicom_id", "study_id", "subject_id", "split")):
        image, study, subject = (row[k].strip() for k in ("dicom_id", "study_id", "subject_id"))
        split = MIMIC_SPLITS.get(row["split"].strip())
        if split is None:
            raise MedxferError(f"{where}: split {row['split']!r}, not one of {list(MIMIC_SPLITS)}")
        if study not in studies:
            raise MedxferError(f"{where}: study {study} is not in {labels_table.name}")
        if studies[study][0] != subject:
            raise MedxferError(
                f"{where}: study {study} is subject {subject} here but {studies[study][0]} in "
                f"{labels_table.name}"
            )
        if view != "all" and image not in positions:
            raise MedxferError(f"{where}: image {image} has no ViewPosition in {metadata.name}")
        frontal = positions.get(image, "") in FRONTAL_POSITIONS
        if view != "all" and frontal != (view == "frontal"):
            continue
        file = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{image}.jpg"
        if not file.is_file():
            problem = f"file not found (listed in {where})"
            if not skip_bad:
                raise MedxferError(f"{file}: {problem}")
            skipped.append((str(file), problem))
            continue
        _subject, positive, unknown = studies[study]
        rows.append(Row(file, positive, split, subject, unknown))
    _check_patients(rows)
    return Collected(rows, skipped)


def _mimic_table(root: Path, name: str) -> Path:
    """``mimic-cxr-2.0.0-NAME.csv`` or its ``.gz`` as released; one of them, not both."""
    found = [
        p
        for p in (root / f"mimic-cxr-2.0.0-{name}.csv", root / f"mimic-cxr-2.0.0-{name}.csv.gz")
        if p.is_file()
    ]
    if not found:
        raise MedxferError(
            f"{root}: no mimic-cxr-2.0.0-{name}.csv[.gz] (MIMIC-CXR-JPG's {name} table)"
        )
    if len(found) > 1:
        raise MedxferError(f"{root}: both {found[0].name} and {found[1].name}; keep one")
    return found[0]


# -- shared --------------------------------------------------------------------------------
def _check_patients(rows: list[Row]) -> None:
    """A patient in both official splits would leak between training and test."""
    seen: dict[str, Row] = {}
    for row in rows:
        other = seen.setdefault(row.patient, row)
        if other.split != row.split:
            raise MedxferError(
                f"patient {row.patient} is in both official splits ({other.path.name} in "
                f"{other.split}, {row.path.name} in {row.split})"
            )


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise MedxferError(f"{root}: no {pattern} (the ChestX-ray14 table)")
    return found[-1]


def _lines(path: Path) -> Iterator[tuple[str, str]]:
    if not path.is_file():
        raise MedxferError(f"{path}: not found (ChestX-ray14's official split list)")
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield f"{path}:{number}", line.strip()


def _csv_rows(path: Path, needed: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise MedxferError(f"{path}: no column {missing[0]!r} (has {reader.fieldnames})")
            for number, row in enumerate(reader, start=2):
                yield f"{path}:{number}", row
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:  # EOFError: cut .gz
        raise MedxferError(f"{path}: cannot be read as a CSV table ({error})") from None
