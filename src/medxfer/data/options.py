"""What a run asks of its data, checked without reading any: the config layer imports this module,
so it uses the standard library only (no numpy, no torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from medxfer.errors import MedxferError

TASKS = ("binary", "multiclass", "multilabel")
COLORS = ("auto", "gray", "rgb")

# Images declaring more pixels are refused from their header (decompression bombs): twice the
# largest digital mammograms, many times a chest X-ray (see medxfer.data.images).
MAX_PIXELS = 50_000_000

# Kermany names: person1234_bacteria_5678.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-1427-0001.jpeg
KERMANY_PATIENT_REGEX = r"^(person\d+|(?:NORMAL2-)?IM-\d+)"


@dataclass(frozen=True)
class DataOptions:
    """How to read, label and split a dataset.

    ``task`` None infers it from the labels; ``positive`` names the positive class (binary only);
    ``val_fraction`` carves validation out of train, ``folds``/``fold`` instead make fold ``fold``
    of a ``folds``-fold cross-validation over train + val the validation set (never both);
    ``patient_regex`` finds the patient in a file name when the data has no patient column.
    """

    task: str | None = None
    positive: str | None = None
    val_fraction: float = 0.1
    folds: int | None = None
    fold: int | None = None
    patient_regex: str | None = KERMANY_PATIENT_REGEX
    seed: int = 0
    skip_bad: bool = False
    limit_per_class: int | None = None
    color: str = "auto"
    max_pixels: int = MAX_PIXELS

    def validate(self) -> DataOptions:
        """Refuse impossible combinations with one clear line; return self for chaining."""
        if self.task is not None and self.task not in TASKS:
            raise MedxferError(f"--task {self.task!r}: must be one of {', '.join(TASKS)}")
        if self.color not in COLORS:
            raise MedxferError(f"--color {self.color!r}: must be one of {', '.join(COLORS)}")
        if self.positive is not None and self.task in ("multiclass", "multilabel"):
            raise MedxferError(
                f"--positive {self.positive!r}: only a binary task has a positive class "
                f"(task is {self.task})"
            )
        if not 0 <= self.val_fraction < 0.5:
            raise MedxferError(f"--val-fraction {self.val_fraction}: must be in [0, 0.5)")
        self._validate_folds()
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise MedxferError(f"--limit-per-class {self.limit_per_class}: must be at least 1")
        if self.patient_regex is not None:
            try:
                re.compile(self.patient_regex)
            except re.error as exc:
                raise MedxferError(
                    f"--patient-regex {self.patient_regex!r}: invalid regular expression ({exc})"
                ) from None
        return self

    def _validate_folds(self) -> None:
        if self.folds is None:
            if self.fold is not None:
                raise MedxferError(f"--fold {self.fold}: needs --folds K")
            return
        if self.folds < 2:
            raise MedxferError(f"--folds {self.folds}: must be at least 2")
        if self.fold is None or not 0 <= self.fold < self.folds:
            raise MedxferError(f"--fold {self.fold}: must be in 0..{self.folds - 1}")
        if self.val_fraction > 0:
            raise MedxferError(
                f"--folds {self.folds} with --val-fraction {self.val_fraction}: choose one "
                "(cross-validation folds replace the carved validation set; use --val-fraction 0)"
            )
