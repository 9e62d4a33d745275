"""``medxfer predict``: probabilities for new images, one row per input, failures included."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medxfer.data.images import MAX_PIXELS, is_image_file, load_image
from medxfer.errors import MedxferError
from medxfer.models.classifier import XrayClassifier
from medxfer.rundir import saved_resolution
from medxfer.training.features import inference_batch_size, to_input
from medxfer.training.loop import sigmoid


@dataclass
class Prediction:
    file: str
    probability: float | None = None
    predicted: str | None = None
    error: str | None = None


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


def predict_files(
    model: XrayClassifier,
    saved: dict,
    files: list[Path],
    device: torch.device,
    threshold: float | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    *,
    max_pixels: int = MAX_PIXELS,
) -> list[Prediction]:
    """Decode, batch and classify ``files``; an unreadable file gets its error, not a crash."""
    size = saved_resolution(saved)
    cut = saved["threshold"] if threshold is None else threshold
    temperature = saved.get("temperature", 1.0)
    batch = inference_batch_size(batch_size, device)
    model.eval().to(device, memory_format=torch.channels_last)
    results = [Prediction(str(f)) for f in files]
    ok: list[int] = []
    pixels: list[np.ndarray] = []
    for i, f in enumerate(files):
        try:
            pixels.append(load_image(f, size, max_pixels=max_pixels))
            ok.append(i)
        except MedxferError as exc:
            results[i].error = str(exc).removeprefix(f"{f}: ")
    stacked = torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(0, size, size)
    starts = range(0, len(ok), batch)
    for start in tqdm(starts, desc="predict", disable=None if progress else True, leave=False):
        rows = ok[start : start + batch]
        with torch.inference_mode():
            logits = model(to_input(stacked[start : start + batch], device))
        logits = logits.double().cpu().numpy()
        prob = sigmoid(logits, temperature)
        for i, p in zip(rows, prob, strict=True):
            results[i].probability = float(p)
            results[i].predicted = saved["positive"] if p >= cut else saved["negative"]
    return results
