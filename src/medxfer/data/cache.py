"""Decode every image of a dataset once, at the working resolution, and keep it on disk.

The cache entry (``medxfer.cache.ChunkedArray``, kind ``images``) is keyed by the bytes of the
images (not their paths), the resolution, the colour mode and the pixel limit, so a renamed or
copied dataset hits the cache and an edited image misses it. It is filled in chunks of about
``CHUNK_BYTES``, so an interrupted decode resumes where it stopped and memory holds one chunk at a
time whatever the collection's size; which images of a chunk failed, and why, is stored with it.
Runs read the pixels back by rows (``medxfer.cache.StoredRows``), never all at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medxfer.cache import ChunkedArray, StoredRows, default_cache_dir
from medxfer.data.images import MAX_PIXELS, as_color, load_image, resize_square, to_model_layout
from medxfer.data.sources import ImageSet
from medxfer.errors import MedxferError
from medxfer.progress import track

DECODER_VERSION = 2  # 2: large JPEGs decoded at reduced scale (data.images.DRAFT_FACTOR)
CHUNK_BYTES = 64 << 20  # per chunk of decoded pixels: the unit of resumption and of memory

__all__ = ["Decoded", "content_hashes", "decode_dataset", "default_cache_dir", "npz_image"]


@dataclass
class Decoded:
    """Pixels of every record (N, S, S) uint8 on disk, which records decoded, and why others
    did not."""

    pixels: StoredRows
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
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # hashlib frees the GIL
        return list(pool.map(_file_hash, [r.source for r in imageset.records]))


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
    parts = {"decoder": DECODER_VERSION, "size": size, "content": key, "max_pixels": max_pixels}
    if color != "gray":
        parts["color"] = color
    row = (3, size, size) if color == "rgb" else (size, size)
    store = ChunkedArray(
        cache_dir or default_cache_dir(),
        "images",
        parts,
        (len(hashes), *row),
        np.uint8,
        chunk_rows=max(1, CHUNK_BYTES // int(np.prod(row))),
    )
    _fill(store, imageset, progress, color=color, max_pixels=max_pixels)
    ok = np.ones(len(hashes), dtype=bool)
    errors: list[tuple[str, str]] = []
    for chunk in range(store.chunks):
        meta = store.meta(chunk)
        ok[list(store.rows_of(chunk))] = meta["ok"]
        errors += [tuple(e) for e in meta["errors"]]
    if errors and not skip_bad:
        source, reason = sorted(errors)[0]
        raise MedxferError(f"{source}: {reason} (use --skip-bad to leave such images out)")
    return Decoded(StoredRows(store), ok, sorted(errors), key, hashes)


def _fill(store: ChunkedArray, imageset: ImageSet, progress: bool, **how) -> None:
    """Decode the chunks ``store`` is missing, on every core (PIL releases the GIL while it
    decodes), holding one chunk in memory at a time; a chunk that another process finished
    meanwhile is skipped."""
    todo = store.missing()
    # one buffer for every chunk: a fresh 64 MB array per chunk, among the decoder's freed
    # buffers, let the heap grow with the collection
    buffer = np.empty((store.chunk_rows, *store.shape[1:]), dtype=np.uint8) if todo else None
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        chunks = (c for c in todo if not store.done_elsewhere(c))
        for chunk in track(
            chunks,
            f"decode {store.shape[-1]}px",
            total=sum(len(store.rows_of(c)) for c in todo),
            size=lambda c: len(store.rows_of(c)),
            enabled=progress,
        ):
            rows = store.rows_of(chunk)
            pixels = buffer[: len(rows)]
            pixels.fill(0)  # an image that fails to decode stays black

            def work(i: int, rows=rows, pixels=pixels) -> tuple[str, str] | None:
                return _decode_into(pixels, i, imageset, imageset.records[rows[i]], **how)

            failed = {i: e for i, e in enumerate(pool.map(work, range(len(rows)))) if e}
            ok = [i not in failed for i in range(len(rows))]
            store.write(chunk, pixels, {"ok": ok, "errors": sorted(failed.values())})


def _decode_into(
    pixels: np.ndarray, i: int, imageset: ImageSet, record, *, color: str, max_pixels: int
) -> tuple[str, str] | None:
    """Decode one record into ``pixels[i]``; (source, reason) if it cannot be decoded."""
    try:
        if imageset.kind == "npz":
            image = as_color(npz_image(imageset, record.source), color)
            pixels[i] = to_model_layout(resize_square(image, pixels.shape[-1]))
        else:
            pixels[i] = load_image(record.source, pixels.shape[-1], color, max_pixels=max_pixels)
    except MedxferError as exc:
        return record.source, str(exc).removeprefix(f"{record.source}: ")
    return None


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
