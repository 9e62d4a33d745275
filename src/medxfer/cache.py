"""One on-disk cache of arrays, shared by the decoded images and the frozen-backbone features.

An entry is a ``ChunkedArray``: a folder ``ROOT/KIND/KEY.chunks/`` (KEY: a hash of everything
that changes the array) holding

    data          the raw array, C order, preallocated to its full size
    header.json   key parts, dtype, shape and rows per chunk
    NNNNNN.done   one marker per finished chunk: its metadata and the CRC-32 of that metadata
                  (canonical JSON) followed by the chunk's bytes

so that arrays larger than memory (the decoded images of a 100,000-image collection) are
filled and read a chunk at a time. The format is written by hand because numpy's containers do
not fit: an ``.npy`` has no room for per-chunk checks, and an ``.npz`` is one zip member read
whole (and through ``zipfile`` at a fraction of disk speed).

A marker is renamed into place (``medxfer.atomic``) only after its chunk's bytes are written, so
a process killed mid-chunk leaves that chunk unmarked (a miss, recomputed by the next run, which
keeps every finished chunk). A chunk is trusted only if its marker parses and its CRC-32 (zlib;
about 6 GB/s, and it catches every single-byte change and every burst up to 32 bits) matches;
a header that is not exactly the expected one (another version's, a flipped bit) discards the
whole entry. Anything untrusted is a miss: one warning naming the file, then it is recomputed.
Two processes filling the same chunk write the same bytes, and neither trusts it before its
marker. Rows are read with ``pread``, not ``mmap``: a mapping counts every page it has touched
as the process's resident memory, which would grow with the collection.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from medxfer.atomic import write_json
from medxfer.errors import warn

CHUNKED_SUFFIX = ".chunks"
KINDS = ("images", "features", "engines")  # engines: onnxruntime graphs (medxfer.engine)
GRAPH_SUFFIX = ".onnx"


def default_cache_dir() -> Path:
    """``$MEDXFER_CACHE``, else ``~/.cache/medxfer``."""
    env = os.environ.get("MEDXFER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "medxfer"


class DamagedEntry(Exception):
    """Cache data that cannot be trusted; the message says why."""


def cache_key(parts: dict) -> str:
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()[:32]


class ChunkedArray:
    """An ``(N, *row_shape)`` array on disk filled ``chunk_rows`` rows at a time, resumable and
    verified per chunk (see the module docstring); ``missing()`` says what is left to fill."""

    def __init__(
        self,
        root: str | os.PathLike,
        kind: str,
        parts: dict,
        shape: tuple[int, ...],
        dtype: np.dtype | str,
        chunk_rows: int,
    ) -> None:
        self.folder = Path(root) / kind / f"{cache_key(parts)}{CHUNKED_SUFFIX}"
        self.dtype, self.shape, self.chunk_rows = np.dtype(dtype), tuple(shape), chunk_rows
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.chunks = -(-self.shape[0] // chunk_rows) if self.shape[0] else 0
        self.data = self.folder / "data"
        self._header = {
            "parts": json.loads(_canonical(parts)),
            "dtype": self.dtype.str,
            "shape": list(self.shape),
            "chunk_rows": chunk_rows,
        }
        self._meta: dict[int, dict] = {}
        self._open()

    def _open(self) -> None:
        """Create the folder, header and preallocated data file, or start over on a header
        that does not match (another version's or a damaged one)."""
        header = self.folder / "header.json"
        try:
            if json.loads(header.read_text()) != self._header:
                raise ValueError("header of other key parts, dtype or shape")
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            warn(f"{header}: damaged cache entry ({exc}); recomputing it")
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not header.exists():
            write_json(header, self._header)
        size = self.shape[0] * self.row_bytes
        with open(self.data, "ab") as fh:
            if os.fstat(fh.fileno()).st_size < size:
                fh.truncate(size)

    def rows_of(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.shape[0]))

    def missing(self) -> list[int]:
        """Chunks without a marker, or whose bytes do not match it (warned, then refilled)."""
        return [chunk for chunk in range(self.chunks) if not self.verify(chunk)]

    def verify(self, chunk: int) -> bool:
        """Whether the chunk is finished and its bytes match its marker (then its metadata is
        loaded); a damaged chunk is warned about and its marker removed."""
        marker = self._marker(chunk)
        try:
            done = json.loads(marker.read_text())
            rows = self.rows_of(chunk)
            data = memoryview(self.read(np.arange(rows.start, rows.stop))).cast("B")
            if _crc(done["meta"], data) != done["crc32"]:
                raise ValueError("checksum mismatch")
            self._meta[chunk] = done["meta"]
            return True
        except FileNotFoundError:
            return False
        except (DamagedEntry, OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"{self.data} (chunk {chunk}): damaged cache entry ({exc}); recomputing it")
            marker.unlink(missing_ok=True)
            return False

    def done_elsewhere(self, chunk: int) -> bool:
        """Whether another process finished ``chunk`` since :meth:`missing` (and it checks)."""
        return self._marker(chunk).exists() and self.verify(chunk)

    def write(self, chunk: int, array: np.ndarray, meta: dict | None = None) -> None:
        """Store one chunk's rows, then its marker (the order that makes a kill safe)."""
        rows = self.rows_of(chunk)
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape != (len(rows), *self.shape[1:]):
            raise ValueError(f"chunk {chunk}: shape {array.shape}, expected {len(rows)} rows")
        self.write_rows(rows.start, array)
        self._mark(chunk, meta, memoryview(array).cast("B"))  # the CRC of what was computed

    def write_rows(self, start: int, array: np.ndarray) -> None:
        """Store rows from ``start`` on, without marking any chunk finished: what each worker
        of a data-parallel run writes of a chunk before one of them seals it."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape[1:] != self.shape[1:] or start + len(array) > self.shape[0]:
            raise ValueError(
                f"rows {start}+{len(array)} of shape {array.shape}: outside {self.shape}"
            )
        view = memoryview(array).cast("B")
        fd = os.open(self.data, os.O_WRONLY)
        try:
            written, offset = 0, start * self.row_bytes
            while written < len(view):
                written += os.pwrite(fd, view[written:], offset + written)
        finally:
            os.close(fd)

    def seal(self, chunk: int, meta: dict | None = None) -> None:
        """Mark finished a chunk whose rows several workers wrote (``write_rows``): its
        marker, with the CRC of the bytes now on disk."""
        rows = self.rows_of(chunk)
        self._mark(chunk, meta, memoryview(self.read(np.arange(rows.start, rows.stop))).cast("B"))

    def _mark(self, chunk: int, meta: dict | None, data: memoryview) -> None:
        meta = json.loads(json.dumps(meta or {}))
        write_json(self._marker(chunk), {"crc32": _crc(meta, data), "meta": meta})
        self._meta[chunk] = meta

    def meta(self, chunk: int) -> dict:
        """The metadata stored with a chunk (after ``missing()`` or ``write``)."""
        return self._meta[chunk]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The given rows, in the given order (runs of consecutive rows read in one call)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        if ordered[0] < 0 or ordered[-1] >= self.shape[0]:
            raise IndexError(f"rows outside 0..{self.shape[0] - 1}")
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        sorted_out = out if np.array_equal(order, np.arange(len(rows))) else np.empty_like(out)
        flat = memoryview(sorted_out.reshape(-1).view(np.uint8))
        with open(self.data, "rb", buffering=0) as fh:
            fd = fh.fileno()
            for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
                first = int(ordered[start])
                _pread_into(
                    fd, flat[start * self.row_bytes : stop * self.row_bytes], first * self.row_bytes
                )
        if sorted_out is not out:
            out[order] = sorted_out
        return out

    def _marker(self, chunk: int) -> Path:
        return self.folder / f"{chunk:06d}.done"


class StoredRows:
    """Rows of a ``ChunkedArray`` indexed like a tensor: ``rows[idx]`` (a tensor, array or list
    of indices, a slice or an int) reads them from disk and returns a CPU tensor."""

    def __init__(self, store: ChunkedArray, rows: np.ndarray | None = None) -> None:
        self.store = store
        self.rows = np.arange(store.shape[0]) if rows is None else np.asarray(rows, np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.store.shape[1:])

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.store.row_bytes

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, keep: np.ndarray) -> StoredRows:
        return StoredRows(self.store, self.rows[keep])

    def __getitem__(self, idx):
        import torch

        rest: tuple = ()
        if isinstance(idx, tuple):  # rows first, then what to take of each row
            idx, rest = idx[0], idx[1:]
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        picked = self.rows[idx]
        rows = torch.from_numpy(self.store.read(np.atleast_1d(picked)))
        if np.ndim(picked) == 0:
            return rows[0][rest] if rest else rows[0]
        return rows[(slice(None), *rest)] if rest else rows

    def split(self, size: int):
        """Batches of ``size`` rows as tensors, read one at a time (as ``Tensor.split``)."""
        for start in range(0, len(self.rows), size):
            yield self[start : start + size]

    def numpy(self) -> np.ndarray:
        """Every row, read into memory (for small data and tests)."""
        return np.asarray(self)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.store.read(self.rows)
        return array if dtype is None else array.astype(dtype)


def _pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise DamagedEntry("data file shorter than its header says")
        done += n


def read_key(path: Path) -> dict:
    """The key parts an entry folder was stored under: what made it, for inspection and tests."""
    return json.loads((path / "header.json").read_text())["parts"]


def _crc(meta: dict, data) -> int:
    """CRC-32 of a chunk's metadata (canonical JSON), then of its bytes."""
    return zlib.crc32(data, zlib.crc32(_canonical(meta).encode()))


def _canonical(parts: dict) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def cache_info(root: str | os.PathLike) -> dict:
    """Entry count and bytes on disk per kind (temporary and older-format files count as bytes)."""
    info = {}
    for kind in KINDS:
        folder = Path(root) / kind
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        chunked = [p for p in folder.glob(f"*{CHUNKED_SUFFIX}") if p.is_dir()]
        info[kind] = {
            "folder": str(folder),
            "entries": sum(p.suffix == GRAPH_SUFFIX and not p.name.startswith(".") for p in files)
            + len(chunked),
            "bytes": sum(p.stat().st_size for p in files)
            + sum(p.stat().st_size for c in chunked for p in c.iterdir() if p.is_file()),
        }
    return info


def clear_cache(root: str | os.PathLike, kinds: tuple[str, ...] = KINDS) -> int:
    """Delete the given kinds' folders; return the bytes freed."""
    freed = 0
    for kind, entry in cache_info(root).items():
        if kind in kinds:
            freed += entry["bytes"]
            shutil.rmtree(entry["folder"], ignore_errors=True)
    return freed
