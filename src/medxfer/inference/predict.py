"""``medxfer predict``: probabilities for new images, one row per input, failures included."""

from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer.data.images import is_image_file, load_image
from medxfer.errors import MedxferError
from medxfer.progress import track
from medxfer.run.trained import TrainedModel


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images, globs expanded; sorted within
    each argument, duplicates dropped. An argument that matches nothing is an error."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif path.exists():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not matches:
            raise MedxferError(f"{item}: no such file, or no images found")
        found += matches
    return list(dict.fromkeys(found))


def load_inputs(
    model: TrainedModel, files: list[Path], progress: bool = False
) -> tuple[torch.Tensor, list[str | None]]:
    """Decoded images of ``files`` in the model's input format, and per file its error (None
    for those that decoded; they are the rows of the tensor, in order). Decoded on every
    core: PIL releases the GIL while it decodes and resizes."""

    def decode(f: Path) -> np.ndarray | str:
        try:
            return load_image(f, model.resolution, model.color)
        except MedxferError as exc:
            return str(exc).removeprefix(f"{f}: ")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(track(pool.map(decode, files), "decode", total=len(files), enabled=progress))
    pixels = [r for r in results if not isinstance(r, str)]
    errors = [r if isinstance(r, str) else None for r in results]
    shape = (0, model.resolution, model.resolution)
    if model.channels == 3:
        shape = (0, 3, model.resolution, model.resolution)
    stacked = (
        torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(shape, dtype=torch.uint8)
    )
    return stacked, errors


def predict_files(
    model: TrainedModel,
    files: list[Path],
    *,
    threshold: float | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """A row per file: ``file``, the probability of the positive class (binary) or one
    ``probability_NAME`` column per class/label, ``predicted``, and ``error`` for a file that
    could not be read (the others still get their answers)."""
    pixels, errors = load_inputs(model, files, progress)
    prob = model.probabilities(pixels, batch_size)
    cut = None if threshold is None else [float(threshold)] * model.task.outputs
    decided = model.task.names(model.decide(prob, cut)) if len(prob) else []
    frame = pd.DataFrame({"file": [str(f) for f in files]})
    ok = np.array([e is None for e in errors], dtype=bool)
    columns = (
        {"probability": prob}
        if model.task.name == "binary"
        else {f"probability_{c}": prob[:, j] for j, c in enumerate(model.classes)}
    )
    for name, values in columns.items():
        frame[name] = np.nan
        frame.loc[ok, name] = values
    frame["predicted"] = None
    frame.loc[ok, "predicted"] = decided
    frame["error"] = errors
    return frame
