"""``medxfer predict``: probabilities for new images, one row per input, failures included."""

from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from medxfer.data.images import (
    MAX_PIXELS,
    as_color,
    is_image_file,
    load_image,
    resize_square,
    to_model_layout,
    to_uint8,
)
from medxfer.errors import MedxferError
from medxfer.progress import track

if TYPE_CHECKING:  # inference takes a trained model; it never loads one
    from medxfer.classification.trained import TrainedModel


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


def unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ... the first not in ``used``: inputs from
    different folders may share a name, and their output files must not overwrite each other."""
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def check_outputs_apart(out_dir: str | Path, inputs: list) -> None:
    """Refuse an output folder that holds inputs, or lies inside a folder given as input:
    its pictures would land among the inputs and be read as inputs by the next call."""
    out = Path(out_dir).resolve()
    for item in inputs:
        given = Path(item)
        folder = given if given.is_dir() else given.parent
        folder = folder.resolve()
        if out == folder or (given.is_dir() and folder in out.parents):
            raise MedxferError(
                f"--out {out_dir}: among the inputs ({item}); choose a folder apart from them"
            )


Input = str | Path | np.ndarray


def load_inputs(
    model: TrainedModel,
    files: list[Input],
    *,
    max_pixels: int = MAX_PIXELS,
    progress: bool = False,
) -> tuple[torch.Tensor, list[str | None]]:
    """Decoded images of ``files`` (paths, or arrays already in memory) in the model's input
    format, and per input its error (None for those that decoded; they are the rows of the
    tensor, in order). Decoded on every core: PIL releases the GIL while it decodes."""

    def decode(item: Input) -> np.ndarray | str:
        try:
            return decode_input(model, item, max_pixels)
        except MedxferError as exc:
            return str(exc).removeprefix(f"{item}: ")

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


def decode_input(model: TrainedModel, item: Input, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One input at the model's resolution and colour: a file, or an array (H, W) or (H, W, 3)
    of uint8 (as it is) or uint16 (scaled by its own range, as 16-bit PNGs are)."""
    if not isinstance(item, np.ndarray):
        return load_image(item, model.resolution, model.color, max_pixels=max_pixels)
    if item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] != 3):
        raise MedxferError(f"array of shape {item.shape}: expected (H, W) or (H, W, 3)")
    if item.dtype not in (np.uint8, np.uint16):
        raise MedxferError(f"array of dtype {item.dtype}: expected uint8 or uint16")
    image = item if item.dtype == np.uint8 else to_uint8(item.astype(np.float64))
    return to_model_layout(resize_square(as_color(image, model.color), model.resolution))


def input_name(item: Input, index: int) -> str:
    return f"array {index}" if isinstance(item, np.ndarray) else str(item)


def predict_files(
    model: TrainedModel,
    files: list[Input],
    *,
    threshold: float | None = None,
    batch_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    progress: bool = False,
) -> pd.DataFrame:
    """A row per file: ``file``, the probability of the positive class (binary) or one
    ``probability_NAME`` column per class/label, ``predicted``, and ``error`` for a file that
    could not be read (the others still get their answers)."""
    cut = model.operating_points(threshold)
    pixels, errors = load_inputs(model, files, max_pixels=max_pixels, progress=progress)
    prob = model.probabilities(pixels, batch_size)
    decided = model.task.names(model.decide(prob, cut)) if len(prob) else []
    frame = pd.DataFrame({"file": [input_name(f, i) for i, f in enumerate(files)]})
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
