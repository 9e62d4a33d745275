"""Validation split carved from train, stratified by class and grouped by patient."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medxfer.data.sources import ImageSet
from medxfer.errors import MedxferError

# Kermany names: person1234_bacteria_5678.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-1427-0001.jpeg
KERMANY_PATIENT_REGEX = r"^(person\d+|(?:NORMAL2-)?IM-\d+)"


def patient_ids(imageset: ImageSet, regex: str = KERMANY_PATIENT_REGEX) -> list[str]:
    """Patient id per record: the regex's first group (or whole match) on the file name.

    A name the regex does not match becomes its own patient, so it can never leak.
    """
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise MedxferError(
            f"--patient-regex {regex!r}: invalid regular expression ({exc})"
        ) from None
    ids = []
    for record in imageset.records:
        name = Path(record.source).name
        match = pattern.search(name)
        if match is None:
            ids.append(f"file:{record.source}")
        else:
            ids.append(match.group(1) if pattern.groups else match.group(0))
    return ids


def assign_splits(
    imageset: ImageSet,
    labels: np.ndarray,
    val_fraction: float,
    patient_regex: str = KERMANY_PATIENT_REGEX,
    seed: int = 0,
) -> np.ndarray:
    """The split of every record after carving ``val_fraction`` of train into validation.

    The carved images join any original ``val`` images. With ``val_fraction == 0`` the
    dataset's own splits are kept.
    """
    splits = np.array([r.split for r in imageset.records])
    if val_fraction <= 0:
        return splits
    if not 0 < val_fraction < 0.5:
        raise MedxferError(f"--val-fraction {val_fraction}: must be in [0, 0.5)")
    train = np.flatnonzero(splits == "train")
    groups = np.array(patient_ids(imageset, patient_regex))[train]
    n_folds = max(2, round(1 / val_fraction))
    if len(set(groups)) < n_folds:
        raise MedxferError(
            f"--val-fraction {val_fraction}: train has only {len(set(groups))} patients, "
            f"too few for {n_folds} stratified folds"
        )
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    _, val_part = next(folds.split(np.zeros(len(train)), labels[train], groups))
    splits[train[val_part]] = "val"
    return splits
