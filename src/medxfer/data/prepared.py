"""Everything a run needs from its dataset: decoded pixels, targets, splits and patients.

torch is imported inside functions only, so that importing this module (for ``DataOptions``)
stays cheap for the configuration layer.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medxfer.cache import StoredRows
from medxfer.data.cache import decode_dataset
from medxfer.data.images import is_gray, read_image
from medxfer.data.options import DataOptions
from medxfer.data.sources import ImageSet, Record, open_dataset
from medxfer.data.splits import assign_splits, patient_ids
from medxfer.data.tasks import check_labels, resolve_task, strata, target_array, task_classes
from medxfer.errors import MedxferError

if TYPE_CHECKING:
    import torch

__all__ = ["COLOR_SAMPLE", "DataOptions", "PreparedData", "detect_color", "prepare_data"]

COLOR_SAMPLE = 64  # files decoded to decide colour="auto" (an .npz is checked whole)


@dataclass
class PreparedData:
    """A dataset ready for training: one row of ``pixels``/``targets``/``patients`` per record.

    ``classes`` is the target order: binary ``[negative, positive]`` (target 1 = positive),
    multiclass the sorted class names, multilabel the label names (one column each).
    ``pixels`` is uint8 ``(N, S, S)`` for gray data and ``(N, 3, S, S)`` for rgb, read from disk
    by rows (``pixels[idx]`` is a tensor; a tensor in memory works as well); ``targets``
    int64 ``(N,)`` class indices, or float32 ``(N, L)`` 0/1 for multilabel.
    """

    imageset: ImageSet
    task: str
    classes: list[str]
    positive: str | None
    color: str
    pixels: StoredRows | torch.Tensor
    targets: torch.Tensor
    splits: dict[str, torch.Tensor]  # split name -> record indices
    patients: list[str]  # one per record; "file:<source>" where the patient is unknown
    data_key: str  # identity of the decoded pixels (content hash + resolution + colour)
    hashes: list[str]  # sha256 of each record's bytes
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def records(self) -> list[Record]:
        return self.imageset.records

    @property
    def negative(self) -> str | None:
        return self.classes[0] if self.task == "binary" else None

    def index_key(self, indices: torch.Tensor) -> str:
        """Identity of a set of records (for cache keys)."""
        chosen = "".join(self.hashes[i] for i in indices.tolist())
        return hashlib.sha256(chosen.encode()).hexdigest()[:16]


def prepare_data(
    location: str | Path,
    size: int,
    options: DataOptions | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> PreparedData:
    """Open, subset, check, decode and split a dataset. Raises MedxferError on any bad input,
    and every label check runs before the (slow) decoding."""
    import torch

    options = (options or DataOptions()).validate()
    imageset = open_dataset(location, options.skip_bad, patient_regex=options.patient_regex)
    if options.limit_per_class:
        imageset = _limit(imageset, options.limit_per_class)
    task = resolve_task(imageset, options.task)
    classes, positive = task_classes(imageset, task, options.positive)
    check_labels(imageset, task, classes)
    color = options.color if options.color != "auto" else detect_color(imageset)
    decoded = decode_dataset(
        imageset,
        size,
        cache_dir,
        options.skip_bad,
        progress=progress,
        color=color,
        max_pixels=options.max_pixels,
    )
    keep = np.flatnonzero(decoded.ok)
    if len(keep) < len(imageset.records):
        skipped = list(imageset.skipped) + list(decoded.errors)
        imageset = imageset.with_records([imageset.records[i] for i in keep], skipped)
        check_labels(imageset, task, classes)
    targets = target_array(imageset.records, task, classes)
    train = np.flatnonzero([r.split != "test" for r in imageset.records])
    split_of = assign_splits(imageset, strata(targets, train), options)
    splits = {
        s: torch.from_numpy(np.flatnonzero(split_of == s))
        for s in ("train", "val", "test")
        if (split_of == s).any()
    }
    data = PreparedData(
        imageset=imageset,
        task=task,
        classes=classes,
        positive=positive,
        color=color,
        pixels=decoded.pixels.subset(keep),
        targets=torch.from_numpy(targets),
        splits=splits,
        patients=patient_ids(imageset),
        data_key=decoded.key,
        hashes=[decoded.hashes[i] for i in keep],
        skipped=list(imageset.skipped),
    )
    _check_split_classes(data, location)
    return data


def detect_color(imageset: ImageSet, sample: int = COLOR_SAMPLE) -> str:
    """``gray`` when every checked image has R = G = B at every pixel, else ``rgb``.

    An .npz is checked whole (its arrays are in memory). Files are checked on a sample of
    ``sample`` records evenly spaced over the record list (which runs through every split and
    class), each decoded at its native size; decoding all would double the cold-start cost.
    A file that cannot be read is left to the decoder to report.
    """
    if imageset.kind == "npz":  # (N, H, W) arrays are gray; (N, H, W, 3) ones are checked
        images = [a for k, a in (imageset.arrays or {}).items() if k.endswith("_images")]
        return "gray" if all(a.ndim == 3 or is_gray(a) for a in images) else "rgb"
    records = imageset.records
    picks = np.unique(np.linspace(0, len(records) - 1, min(sample, len(records))).astype(int))
    for i in picks.tolist():
        try:
            image = read_image(records[i].source, "rgb")
        except MedxferError:
            continue
        if not is_gray(image):
            return "rgb"
    return "gray"


def _check_split_classes(data: PreparedData, location: str | Path) -> None:
    """After carving validation: train must still hold every class, and (binary) the train and
    validation sets both classes."""
    train = data.targets[data.splits["train"]].numpy()
    counts = (
        np.nansum(train, axis=0)  # positives; unknown entries are NaN
        if data.task == "multilabel"
        else np.bincount(train, minlength=len(data.classes))
    )
    for name, count in zip(data.classes, counts, strict=True):
        if count == 0:
            raise MedxferError(
                f"{location}: after carving validation, class {name!r} has no training images "
                "(fewer validation patients or folds would keep some)"
            )
    for split in ("train", "val"):
        rows = data.splits.get(split)
        if data.task == "binary" and rows is not None and len(data.targets[rows].unique()) < 2:
            raise MedxferError(f"{location}: {split} split has only one class; need both")
    for split, rows in data.splits.items():
        if data.task == "multilabel" and data.targets[rows].isnan().all():
            raise MedxferError(
                f"{location}: every label entry of the {split} split is unknown; nothing there "
                "could be scored"
            )


def _limit(imageset: ImageSet, n: int) -> ImageSet:
    """At most ``n`` records per (split, label) — a label set counts as one label here."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    records = []
    for record in imageset.records:
        key = (record.split, record.label)
        if counts[key] < n:
            counts[key] += 1
            records.append(record)
    return imageset.with_records(records)
