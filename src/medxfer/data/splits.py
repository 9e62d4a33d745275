"""Validation sets that never split a patient: a fraction carved from train, or one fold of a
K-fold cross-validation over train + val; both stratified by class and grouped by patient with
scikit-learn's ``StratifiedGroupKFold``. The test split is never touched."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medxfer.data.options import KERMANY_PATIENT_REGEX, DataOptions
from medxfer.data.sources import ImageSet
from medxfer.errors import MedxferError

__all__ = ["KERMANY_PATIENT_REGEX", "assign_splits", "patient_ids"]


def patient_ids(imageset: ImageSet) -> list[str]:
    """Patient id per record; an image of unknown patient is its own cluster ``file:<source>``,
    so it can never leak."""
    return [r.patient or f"file:{r.source}" for r in imageset.records]


def assign_splits(imageset: ImageSet, strata: np.ndarray, options: DataOptions) -> np.ndarray:
    """The split name of every record under ``options`` (``val_fraction`` or ``folds``/``fold``).

    ``strata`` holds one class per record (see ``tasks.strata``). With ``val_fraction`` the
    carved images join any original ``val`` images; with folds the dataset's own ``val`` images
    join the pool and fold ``fold`` becomes the validation set. Neither: the dataset's splits.
    """
    splits = np.array([r.split for r in imageset.records])
    groups = np.array(patient_ids(imageset))
    if options.folds:
        pool = np.flatnonzero(splits != "test")
        n_folds, chosen, what = options.folds, options.fold, f"--folds {options.folds}"
    elif options.val_fraction > 0:
        pool = np.flatnonzero(splits == "train")
        n_folds, chosen = max(2, round(1 / options.val_fraction)), 0
        what = f"--val-fraction {options.val_fraction}"
    else:
        return splits
    patients = len(set(groups[pool]))
    largest = int(np.unique(strata[pool], return_counts=True)[1].max())
    if patients < n_folds or largest < n_folds:  # no class could reach every fold
        share = "a validation share this small" if options.val_fraction else f"{n_folds} folds"
        raise MedxferError(
            f"{what}: the pool has {patients} patients and at most {largest} images per class, "
            f"too few for {share} (it needs {n_folds})"
        )
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=options.seed)
    parts = folds.split(np.zeros(len(pool)), strata[pool], groups[pool])
    val_part = next(val for f, (_, val) in enumerate(parts) if f == chosen)
    splits[pool] = "train"
    splits[pool[val_part]] = "val"
    return splits
