"""Everything a run needs from its dataset: decoded pixels, labels, and split indices."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from medxfer.data.cache import decode_dataset
from medxfer.data.images import MAX_PIXELS
from medxfer.data.sources import ImageSet, Record, check_two_classes, open_dataset, resolve_positive
from medxfer.data.splits import assign_splits
from medxfer.errors import MedxferError


@dataclass
class PreparedData:
    imageset: ImageSet
    pixels: torch.Tensor  # (N, S, S) uint8, one row per record
    labels: torch.Tensor  # (N,) int64, 1 = positive class
    splits: dict[str, torch.Tensor]  # split name -> record indices
    positive: str
    data_key: str  # identity of the decoded pixels (content hash + resolution)
    hashes: list[str]  # sha256 of each record's bytes
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def records(self) -> list[Record]:
        return self.imageset.records

    @property
    def negative(self) -> str:
        return next(c for c in self.imageset.classes if c != self.positive)

    def index_key(self, indices: torch.Tensor) -> str:
        """Identity of a set of records (for cache keys)."""
        chosen = "".join(self.hashes[i] for i in indices.tolist())
        return hashlib.sha256(chosen.encode()).hexdigest()[:16]


def prepare_data(
    location: str,
    size: int,
    *,
    positive: str | None = None,
    val_fraction: float = 0.0,
    patient_regex: str | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    limit_per_class: int | None = None,
    cache_dir=None,
    progress: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> PreparedData:
    """Open, subset, decode and split a dataset. Raises MedxferError on any bad input."""
    imageset = open_dataset(location, skip_bad=skip_bad)
    if limit_per_class:
        imageset = _limit(imageset, limit_per_class)
    positive = resolve_positive(imageset.classes, positive)
    check_two_classes(imageset, "test")
    decoded = decode_dataset(
        imageset, size, cache_dir, skip_bad=skip_bad, progress=progress, max_pixels=max_pixels
    )
    skipped = list(imageset.skipped) + list(decoded.errors)
    keep = np.flatnonzero(decoded.ok)
    if len(keep) < len(imageset.records):
        imageset = ImageSet(
            imageset.location,
            imageset.kind,
            [imageset.records[i] for i in keep],
            imageset.classes,
            skipped,
            imageset.arrays,
        )
        check_two_classes(imageset, "test")
    labels = imageset.labels(positive)
    kwargs = {"patient_regex": patient_regex} if patient_regex else {}
    split_of = assign_splits(imageset, labels, val_fraction, seed=seed, **kwargs)
    splits = {
        s: torch.from_numpy(np.flatnonzero(split_of == s))
        for s in ("train", "val", "test")
        if (split_of == s).any()
    }
    for split in ("train", "val"):
        if split in splits and len(np.unique(labels[splits[split].numpy()])) < 2:
            raise MedxferError(f"{location}: {split} split has only one class; need both")
    return PreparedData(
        imageset,
        torch.from_numpy(np.ascontiguousarray(decoded.pixels[keep])),
        torch.from_numpy(labels),
        splits,
        positive,
        decoded.key,
        [decoded.hashes[i] for i in keep],
        skipped,
    )


def _limit(imageset: ImageSet, n: int) -> ImageSet:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    records = []
    for record in imageset.records:
        key = (record.split, record.label)
        if counts[key] < n:
            counts[key] += 1
            records.append(record)
    return ImageSet(
        imageset.location,
        imageset.kind,
        records,
        imageset.classes,
        imageset.skipped,
        imageset.arrays,
    )
