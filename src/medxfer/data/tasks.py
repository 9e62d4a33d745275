"""What a dataset's labels mean: the task (binary, multi-class, multi-label), the class order,
the target array, and the label checks that must pass before anything is decoded or written."""

from __future__ import annotations

import numpy as np

from medxfer.data.sources import ImageSet, Record
from medxfer.errors import MedxferError


def infer_task(imageset: ImageSet) -> str:
    """``multilabel`` when the source gives a label set per image, else ``binary`` for two
    classes and ``multiclass`` for more."""
    if imageset.multilabel:
        return "multilabel"
    if len(imageset.classes) < 2:
        raise MedxferError(
            f"{imageset.location}: only one class ({', '.join(imageset.classes) or 'none'}); "
            "a classifier needs at least two"
        )
    return "binary" if len(imageset.classes) == 2 else "multiclass"


def resolve_task(imageset: ImageSet, requested: str | None) -> str:
    """The inferred task, or ``requested`` where the labels allow it: a single-label set can be
    treated as multi-class (any K >= 2) or multi-label (one label per image), but label sets
    cannot become one class per image, and ``binary`` needs exactly two classes."""
    inferred = infer_task(imageset)
    if requested is None or requested == inferred:
        return inferred
    if imageset.multilabel:
        raise MedxferError(
            f"--task {requested}: {imageset.location} gives a label set per image (multilabel)"
        )
    if requested == "binary":
        raise MedxferError(
            f"--task binary: {imageset.location} has {len(imageset.classes)} classes "
            f"({', '.join(imageset.classes)}); binary needs exactly 2"
        )
    return requested


def resolve_positive(classes: list[str], positive: str | None) -> str:
    """The positive class: as given, else ``PNEUMONIA`` if present, else the second class."""
    if positive is not None:
        if positive not in classes:
            raise MedxferError(f"positive class {positive!r} is not one of the classes {classes}")
        return positive
    return "PNEUMONIA" if "PNEUMONIA" in classes else classes[1]


def task_classes(
    imageset: ImageSet, task: str, positive: str | None
) -> tuple[list[str], str | None]:
    """Class names in target order, and the positive class (binary only).

    binary: ``[negative, positive]`` so that the target is 1 for the positive class;
    multiclass: the sorted class names (numeric names in numeric order); multilabel: the label
    names (sorted, or the .npz columns "0".."L-1").
    """
    if task != "binary":
        if positive is not None:
            raise MedxferError(
                f"--positive {positive!r}: only a binary task has a positive class (task is {task})"
            )
        return list(imageset.classes), None
    positive = resolve_positive(imageset.classes, positive)
    return [next(c for c in imageset.classes if c != positive), positive], positive


def check_labels(imageset: ImageSet, task: str, classes: list[str]) -> None:
    """Every class needs training images, every label seen in val/test must be known from
    train, and a binary test split needs both classes (its metrics are undefined otherwise)."""
    names = _names_of(imageset.records, task)
    for split in ("train", "test"):
        if not any(r.split == split for r in imageset.records):
            raise MedxferError(f"{imageset.location}: no images in the {split!r} split")
    in_train = set().union(
        *(n for n, r in zip(names, imageset.records, strict=True) if r.split == "train")
    )
    for name in classes:
        if name in in_train:
            continue
        elsewhere = [r.split for n, r in zip(names, imageset.records, strict=True) if name in n]
        if elsewhere:
            raise MedxferError(
                f"{imageset.location}: label {name!r} is in the {elsewhere[0]} split "
                f"({len(elsewhere)} images) but not in train"
            )
        raise MedxferError(f"{imageset.location}: class {name!r} has no training images")
    if task == "binary":
        check_two_classes(imageset, "test")


def check_two_classes(imageset: ImageSet, split: str) -> None:
    """Binary metrics need both classes: refuse a split whose images all share one label."""
    present = {r.label for r in imageset.records if r.split == split}
    if not present:
        raise MedxferError(f"{imageset.location}: split {split!r} has no images")
    if len(present) < 2:
        raise MedxferError(
            f"{imageset.location}: {split} split has only class {present.pop()!r}; "
            "metrics need images of both classes"
        )


def target_array(records: list[Record], task: str, classes: list[str]) -> np.ndarray:
    """binary/multiclass: ``(N,)`` int64 class index; multilabel: ``(N, L)`` float32 0/1, NaN
    where the entry is unknown (the record's ``unknown`` labels), which loss, class weights,
    metrics and thresholds leave out."""
    column = {name: j for j, name in enumerate(classes)}
    if task != "multilabel":
        return np.array([column[r.label] for r in records], dtype=np.int64)
    targets = np.zeros((len(records), len(classes)), dtype=np.float32)
    for i, record in enumerate(records):
        targets[i, [column[n] for n in record.label_set]] = 1.0
        targets[i, [column[n] for n in record.unknown_set]] = np.nan
    return targets


def strata(targets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One class per record to stratify splits on.

    Single-label targets are their own strata. A multi-label record is stratified by the
    rarest of its labels among ``rows`` (the most informative single label: it keeps rare
    labels spread over the folds, which the frequent ones manage anyway); a record with no
    label gets a stratum of its own (``L``).
    """
    if targets.ndim == 1:
        return targets
    targets = np.nan_to_num(targets)  # an unknown entry is not a label to stratify on
    frequency = targets[rows].sum(axis=0)
    rarity = np.where(targets > 0, frequency[None, :], np.inf)
    return np.where(targets.any(axis=1), rarity.argmin(axis=1), targets.shape[1])


def _names_of(records: list[Record], task: str) -> list[frozenset[str]]:
    if task == "multilabel":
        return [r.label_set for r in records]
    return [frozenset((r.label,)) for r in records]
