"""Decoded images on disk in verified chunks: rows read back exactly, a damaged chunk is the only
one recomputed, and a decode killed with SIGKILL resumes without redoing finished chunks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medxfer.cache import ChunkedArray
from medxfer.errors import MedxferWarning
from tests.conftest import ROOT, make_subset


def _filled(tmp_path: Path, rng: np.random.Generator) -> tuple[ChunkedArray, np.ndarray]:
    reference = rng.integers(0, 256, size=(23, 5, 4), dtype=np.uint8)
    store = ChunkedArray(tmp_path, "images", {"k": 1}, reference.shape, np.uint8, chunk_rows=5)
    assert store.chunks == 5 and store.missing() == [0, 1, 2, 3, 4]
    for chunk in rng.permutation(store.chunks):
        rows = store.rows_of(int(chunk))
        store.write(int(chunk), reference[rows.start : rows.stop], {"chunk": int(chunk)})
    return store, reference


def test_rows_read_back_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    _, reference = _filled(tmp_path, rng)
    reopened = ChunkedArray(tmp_path, "images", {"k": 1}, reference.shape, np.uint8, 5)
    assert reopened.missing() == [] and reopened.meta(3) == {"chunk": 3}
    for rows in (rng.integers(0, 23, size=40), np.arange(23)[::-1], [7], []):
        np.testing.assert_array_equal(reopened.read(np.asarray(rows)), reference[rows])
    with pytest.raises(IndexError):
        reopened.read(np.array([23]))


def test_a_damaged_chunk_is_the_only_one_recomputed(tmp_path):
    store, reference = _filled(tmp_path, np.random.default_rng(1))
    raw = bytearray(store.data.read_bytes())
    raw[2 * 5 * 20 + 7] ^= 0x10  # one bit inside chunk 2
    store.data.write_bytes(bytes(raw))
    reopened = ChunkedArray(tmp_path, "images", {"k": 1}, reference.shape, np.uint8, 5)
    with pytest.warns(MedxferWarning, match=r"data \(chunk 2\): damaged cache entry"):
        assert reopened.missing() == [2]
    with pytest.warns(MedxferWarning, match="header.json: damaged cache entry"):
        other = ChunkedArray(tmp_path, "images", {"k": 1}, (23, 5, 2), np.uint16, 5)
    assert other.missing() == [0, 1, 2, 3, 4]  # another shape under the same key: all


_DECODE_SLOWLY = """
import sys, time
import medxfer.data.cache as cache
from medxfer.data.sources import open_dataset
cache.CHUNK_BYTES = 2 * 32 * 32  # two images per chunk
real = cache.load_image
def slow(*args, **kwargs):
    time.sleep(0.3)
    return real(*args, **kwargs)
cache.load_image = slow
cache.decode_dataset(open_dataset(sys.argv[1]), 32, sys.argv[2], progress=False)
"""


@pytest.mark.integration
def test_decode_killed_mid_way_resumes_with_the_same_pixels(tmp_path, monkeypatch):
    import medxfer.data.cache as cache
    from medxfer.data.sources import open_dataset

    data = make_subset(tmp_path / "d", {"train": 6, "test": 4})  # 20 images, 10 chunks
    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", _DECODE_SLOWLY, str(data), str(killed)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    deadline = time.monotonic() + 120
    while len(list(killed.glob("images/*/*.done"))) < 3 and time.monotonic() < deadline:
        assert child.poll() is None, "the decode ended before it could be killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = len(list(killed.glob("images/*/*.done")))
    assert 3 <= finished < 10

    monkeypatch.setattr(cache, "CHUNK_BYTES", 2 * 32 * 32)
    decoded_again = []
    real = cache.load_image
    monkeypatch.setattr(
        cache, "load_image", lambda path, *a, **k: decoded_again.append(path) or real(path, *a, **k)
    )
    imageset = open_dataset(data)
    resumed = cache.decode_dataset(imageset, 32, killed, progress=False)
    assert len(decoded_again) == 20 - 2 * finished  # only the unfinished chunks
    monkeypatch.setattr(cache, "load_image", real)
    whole = cache.decode_dataset(imageset, 32, tmp_path / "whole", progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.pixels), np.asarray(whole.pixels))
    assert resumed.ok.all() and resumed.key == whole.key
