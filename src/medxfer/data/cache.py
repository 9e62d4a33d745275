"""Decode every image of a dataset once, at the working resolution, and keep it on disk.

The cache entry (``medxfer.cache.ArrayCache``, kind ``images``) is keyed by the bytes of the images
(not their paths), the resolution, the colour mode and the pixel limit, so a renamed or copied
dataset hits the cache and an edited image misses it. Which images failed, and why, is stored with
the pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medxfer.cache import ArrayCache, default_cache_dir
from medxfer.data.images import MAX_PIXELS, as_color, load_image, resize_square, to_model_layout
from medxfer.data.sources import ImageSet
from medxfer.errors import MedxferError
from medxfer.progress import track

DECODER_VERSION = 1

__all__ = ["Decoded", "content_hashes", "decode_dataset", "default_cache_dir", "npz_image"]


@dataclass
class Decoded:
    """Pixels of every record (N, S, S) uint8, which records decoded, and why others did not."""

    pixels: np.ndarray
    ok: np.ndarray
    errors: list[tuple[str, str]]
    key: str
    hashes: list[str]  # sha256 of each record's bytes


def content_hashes(imageset: ImageSet) -> list[str]:
    """sha256 of each record's bytes (file content, or the array slice for .npz sources)."""
    if imageset.kind == "npz":
        return [
            hashlib.sha256(npz_image(imageset, r.source).tobytes()).hexdigest()
            for r in imageset.records
        ]
    return [_file_hash(r.source) for r in imageset.records]


def decode_dataset(
    imageset: ImageSet,
    size: int,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    *,
    color: str = "gray",
    max_pixels: int = MAX_PIXELS,
) -> Decoded:
    """Decoded pixels for ``imageset`` at ``size`` px in ``color`` (gray/rgb), cached."""
    hashes = content_hashes(imageset)
    identity = [DECODER_VERSION, size, hashes] + ([color] if color != "gray" else [])
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    cache = ArrayCache(cache_dir or default_cache_dir(), "images")
    parts = {"decoder": DECODER_VERSION, "size": size, "content": key, "max_pixels": max_pixels}
    if color != "gray":
        parts["color"] = color
    entry = cache.load(parts)
    if entry is not None:
        errors = [tuple(e) for e in entry.meta["errors"]]
        if errors and not skip_bad:
            source, reason = errors[0]
            raise MedxferError(f"{source}: {reason}")
        ok = np.array(entry.meta["ok"], dtype=bool)
        return Decoded(entry.array, ok, errors, key, hashes)

    decoded = _decode_all(imageset, size, progress, color=color, max_pixels=max_pixels)
    if decoded.errors and not skip_bad:
        source, reason = decoded.errors[0]
        raise MedxferError(f"{source}: {reason} (use --skip-bad to leave such images out)")
    decoded.key, decoded.hashes = key, hashes
    cache.save(parts, decoded.pixels, {"ok": decoded.ok.tolist(), "errors": decoded.errors})
    return decoded


def _decode_all(
    imageset: ImageSet, size: int, progress: bool, *, color: str, max_pixels: int
) -> Decoded:
    n = len(imageset.records)
    pixels = np.zeros((n, *((3,) if color == "rgb" else ()), size, size), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    errors: list[tuple[str, str]] = []

    def work(i: int) -> None:
        record = imageset.records[i]
        try:
            if imageset.kind == "npz":
                image = as_color(npz_image(imageset, record.source), color)
                pixels[i] = to_model_layout(resize_square(image, size))
            else:
                pixels[i] = load_image(record.source, size, color, max_pixels=max_pixels)
        except MedxferError as exc:
            ok[i] = False
            reason = str(exc).removeprefix(f"{record.source}: ")
            errors.append((record.source, reason))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(track(pool.map(work, range(n)), f"decode {size}px", total=n, enabled=progress))
    errors.sort()
    return Decoded(pixels, ok, errors, "", [])


def npz_image(imageset: ImageSet, source: str) -> np.ndarray:
    split, index = source.rsplit("#", 1)[1].split("/")
    assert imageset.arrays is not None
    return imageset.arrays[f"{split}_images"][int(index)]


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            digest.update(fh.read())
    except OSError as exc:
        raise MedxferError(f"{path}: cannot read file ({exc.strerror})") from None
    return digest.hexdigest()
