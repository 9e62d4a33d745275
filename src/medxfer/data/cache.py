"""Decode every image of a dataset once, at the working resolution, and keep it on disk.

The cache entry is keyed by the bytes of the images (not their paths), the resolution and the
colour mode, so a renamed or copied dataset hits the cache and an edited image misses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medxfer.atomic import write_json, write_with
from medxfer.data.images import as_color, load_image, resize_square, to_model_layout
from medxfer.data.sources import ImageSet
from medxfer.errors import MedxferError
from medxfer.progress import track

DECODER_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("MEDXFER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "medxfer"


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
) -> Decoded:
    """Decoded pixels for ``imageset`` at ``size`` px in ``color`` (gray/rgb), cached."""
    hashes = content_hashes(imageset)
    parts = [DECODER_VERSION, size, hashes] + ([color] if color != "gray" else [])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
    folder = Path(cache_dir or default_cache_dir()) / "images"
    pixels_file, meta_file = folder / f"{key}.npy", folder / f"{key}.json"
    if pixels_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        errors = [tuple(e) for e in meta["errors"]]
        if errors and not skip_bad:
            source, reason = errors[0]
            raise MedxferError(f"{source}: {reason}")
        return Decoded(np.load(pixels_file), np.array(meta["ok"], dtype=bool), errors, key, hashes)

    decoded = _decode_all(imageset, size, progress, color)
    if decoded.errors and not skip_bad:
        source, reason = decoded.errors[0]
        raise MedxferError(f"{source}: {reason} (use --skip-bad to leave such images out)")
    decoded.key, decoded.hashes = key, hashes
    write_with(pixels_file, lambda tmp: _save_npy(tmp, decoded.pixels))
    write_json(meta_file, {"ok": decoded.ok.tolist(), "errors": decoded.errors, "size": size})
    return decoded


def _decode_all(imageset: ImageSet, size: int, progress: bool, color: str) -> Decoded:
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
                pixels[i] = load_image(record.source, size, color)
        except MedxferError as exc:
            ok[i] = False
            reason = str(exc).removeprefix(f"{record.source}: ")
            errors.append((record.source, reason))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(track(pool.map(work, range(n)), f"decode {size}px", total=n, enabled=progress))
    errors.sort()
    return Decoded(pixels, ok, errors, "", [])


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)


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
