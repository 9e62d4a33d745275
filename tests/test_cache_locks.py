"""Caches that heal, run folders that lock, unreadable checkpoints, oversized images."""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medxfer.cache import ChunkedArray, cache_info
from medxfer.errors import MedxferError, MedxferWarning
from tests.conftest import ROOT, make_subset

TINY = dict(image_size=32, epochs=2, bootstrap=0, val_fraction=0.25)


def _quiet_train(cfg):
    from medxfer.classification.run import train

    return train(cfg, progress=False, log=lambda _: None)


# ---------------------------------------------------------------- the array cache itself


def _store(root, parts, shape=(64, 64), dtype=np.uint8, chunk_rows=16) -> ChunkedArray:
    return ChunkedArray(root, "images", parts, shape, dtype, chunk_rows)


def test_entry_round_trip_keeps_array_and_metadata(tmp_path):
    array = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    _store(tmp_path, {"a": 1}, array.shape, np.float32, 7).write(0, array, {"note": "x"})
    entry = _store(tmp_path, {"a": 1}, array.shape, np.float32, 7)
    assert entry.missing() == []
    got = entry.read(np.arange(7))
    np.testing.assert_array_equal(got, array)
    assert got.dtype == np.float32 and entry.meta(0) == {"note": "x"}
    assert _store(tmp_path, {"a": 2}, array.shape, np.float32, 7).missing() == [0]  # no warning


@pytest.mark.parametrize("where", ["first byte", "middle", "last byte"])
def test_flipped_byte_of_same_size_is_detected(tmp_path, where, recwarn):
    array = np.arange(4096, dtype=np.uint8).reshape(64, 64)
    store = _store(tmp_path, {"k": 1})
    for chunk in range(4):
        store.write(chunk, array[16 * chunk : 16 * chunk + 16])
    raw = bytearray(store.data.read_bytes())
    index = {"first byte": 0, "middle": 2100, "last byte": len(raw) - 1}[where]
    raw[index] ^= 0x01
    store.data.write_bytes(bytes(raw))
    reopened = _store(tmp_path, {"k": 1})
    assert reopened.missing() == [index // (16 * 64)]
    (warning,) = [w for w in recwarn if w.category is MedxferWarning]
    assert str(warning.message).startswith(f"{store.data} (chunk {index // 1024}): damaged")
    reopened.write(index // 1024, array[16 * (index // 1024) :][:16])
    healed = _store(tmp_path, {"k": 1})
    assert healed.missing() == []
    np.testing.assert_array_equal(healed.read(np.arange(64)), array)  # healed on disk


def _fill_same_key(root: str, barrier) -> None:
    barrier.wait()
    big = np.full((256, 1024, 8), 7, dtype=np.uint8)  # 2 MB in 8 chunks: writes overlap
    store = ChunkedArray(root, "features", {"same": "key"}, big.shape, np.uint8, 32)
    for chunk in store.missing():
        store.write(chunk, big[32 * chunk : 32 * chunk + 32], {"chunk": chunk})


def test_concurrent_writers_leave_one_valid_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_fill_same_key, args=(str(tmp_path), barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    (folder,) = (tmp_path / "features").iterdir()
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["data", "header.json", *(f"{c:06d}.done" for c in range(8))])
    store = ChunkedArray(tmp_path, "features", {"same": "key"}, (256, 1024, 8), np.uint8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedxferWarning)
        assert store.missing() == []
    assert np.unique(store.read(np.arange(256))).tolist() == [7]


# ---------------------------------------------------------------- both caches in real runs


def test_truncated_image_cache_heals_to_the_same_pixels(tmp_path):
    from medxfer.data.cache import decode_dataset
    from medxfer.data.sources import open_dataset

    data = make_subset(tmp_path / "d", {"train": 3, "test": 2})
    imageset = open_dataset(data)
    first = decode_dataset(imageset, 64, tmp_path / "c", progress=False)
    (stored,) = _image_data(tmp_path / "c")
    stored.write_bytes(stored.read_bytes()[:-100])
    with pytest.warns(MedxferWarning, match=f"{stored} \\(chunk 0\\): damaged cache entry"):
        second = decode_dataset(imageset, 64, tmp_path / "c", progress=False)
    np.testing.assert_array_equal(np.asarray(first.pixels), np.asarray(second.pixels))
    for record, pixels in zip(imageset.records, np.asarray(second.pixels), strict=True):
        gray = Image.open(record.source).convert("L").resize((64, 64), Image.Resampling.BILINEAR)
        # PIL reference; 64 px is more than half the files' 224 px, so they are decoded whole
        np.testing.assert_array_equal(pixels, np.asarray(gray))


def _image_data(cache: Path) -> list[Path]:
    return sorted((cache / "images").glob("*.chunks/data"))


@pytest.mark.integration
def test_truncated_caches_rerun_with_warning_and_same_metrics(tmp_path):
    from medxfer.config import RunConfig

    data = make_subset(tmp_path / "d", {"train": 8, "test": 4})
    cache = tmp_path / "cache"
    common = dict(data=str(data), cache_dir=str(cache), **TINY)
    first = _quiet_train(RunConfig(out=str(tmp_path / "a"), **common))
    damaged = _image_data(cache) + sorted((cache / "features").glob("*.chunks/data"))
    assert len(damaged) == 1 + 3  # pixels; features: clean view + 2 augmented views
    for path in damaged:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(MedxferWarning) as caught:
        second = _quiet_train(RunConfig(out=str(tmp_path / "b"), **common))
    warned = {Path(str(w.message).split(":")[0].removesuffix(" (chunk 0)")) for w in caught}
    assert warned == set(damaged)
    a = json.loads((first / "metrics.json").read_text())["test"]
    b = json.loads((second / "metrics.json").read_text())["test"]
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert b["roc_auc"] == pytest.approx(a["roc_auc"], abs=1e-6)
    with warnings.catch_warnings():  # healed: a third run trusts every chunk
        warnings.simplefilter("error", MedxferWarning)
        _quiet_train(RunConfig(out=str(tmp_path / "c"), **common))


# ---------------------------------------------------------------- checkpoint and lock


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 32 px run on a small real subset, and its options."""
    from medxfer.config import RunConfig

    base = tmp_path_factory.mktemp("tiny")
    data = make_subset(base / "d", {"train": 8, "test": 4})
    options = dict(data=str(data), **TINY)
    return _quiet_train(RunConfig(out=str(base / "run"), **options)), options


@pytest.mark.integration
def test_corrupt_checkpoint_means_fresh_start(tiny_run, tmp_path):
    import torch

    from medxfer.config import RunConfig

    run, options = tiny_run
    out = tmp_path / "cut"
    out.mkdir()
    (out / "config.json").write_bytes((run / "config.json").read_bytes())
    torch.save({"state": {}, "model": {"w": torch.zeros(5000)}}, out / "checkpoint.pt")
    raw = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.warns(MedxferWarning, match="checkpoint.pt: unreadable checkpoint"):
        _quiet_train(RunConfig(out=str(out), **options))
    whole, fresh = pd.read_csv(run / "history.csv"), pd.read_csv(out / "history.csv")
    assert list(fresh.epoch) == [1, 2]
    np.testing.assert_allclose(fresh.train_loss, whole.train_loss, rtol=1e-5)
    assert not (out / "checkpoint.pt").exists()


def test_checkpoint_that_is_no_dict_is_refused(tmp_path):
    import torch

    from medxfer.storage.checkpoint import load_checkpoint_or_none

    torch.save([1, 2], tmp_path / "c.pt")
    with pytest.warns(MedxferWarning, match="not a medxfer checkpoint"):
        assert load_checkpoint_or_none(tmp_path / "c.pt") is None
    assert load_checkpoint_or_none(tmp_path / "absent.pt") is None
    torch.save({"state": {"epoch": 3}, "model": {}}, tmp_path / "ok.pt")
    assert load_checkpoint_or_none(tmp_path / "ok.pt")["state"] == {"epoch": 3}


@pytest.mark.integration
def test_second_train_on_the_same_folder_is_refused(tmp_path, capsys):
    from medxfer.cli import main

    data = make_subset(tmp_path / "d", {"train": 8, "test": 4})
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--image-size", "32"]
    args += ["--epochs", "3", "--bootstrap", "0", "--val-fraction", "0.25", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen([sys.executable, "-m", "medxfer.cli", *args], env=env)
    lock = tmp_path / ".run.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"medxfer: error: {out}: another medxfer process is training into this folder "
        f"(pid {first.pid})"
    )
    assert first.wait(120) == 0
    assert (out / "metrics.json").exists() and not lock.exists()
    assert main(args) == 0  # lock released: the finished run is recognised


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    from medxfer.locking import LockHeld, exclusive_lock

    lock = tmp_path / "x.lock"
    code = (
        "from medxfer.locking import exclusive_lock\n"
        f"with exclusive_lock({str(lock)!r}):\n    print(1, flush=True)\n    input()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline().strip() == b"1"
    with pytest.raises(LockHeld) as held, exclusive_lock(lock):
        pass
    assert held.value.pid == holder.pid
    holder.kill()
    holder.wait()
    with exclusive_lock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


# ---------------------------------------------------------------- oversized images


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A real 8 x 8 PNG whose IHDR is patched to declare ``width`` x ``height`` (valid CRC)."""
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def test_crafted_png_header_is_what_pil_sees(tmp_path):
    import warnings

    path = _png_declaring(tmp_path / "b.png", 1000, 3000)
    with warnings.catch_warnings(), Image.open(path) as img:
        assert img.size == (1000, 3000)  # the CRC is valid, PIL believes the header


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ((20000, 20000), "decompression bomb"),  # beyond PIL's own limit (179 MP)
        ((10000, 10000), "too many pixels: 10000 x 10000 = 100,000,000, limit 50,000,000"),
    ],
)
def test_oversized_png_is_an_unreadable_input(tmp_path, size, reason):
    from medxfer.data.images import read_gray

    path = _png_declaring(tmp_path / "big.png", *size)
    assert path.stat().st_size < 1000
    with pytest.raises(MedxferError, match=f"^{path}: unreadable image \\(.*{reason}"):
        read_gray(path)


def test_max_pixels_is_a_parameter(kermany):
    from medxfer.data.images import read_gray

    path = sorted((kermany / "test" / "NORMAL").iterdir())[0]
    assert read_gray(path).shape == (224, 224)
    with pytest.raises(MedxferError, match="224 x 224 = 50,176, limit 50,000"):
        read_gray(path, max_pixels=50_000)


def test_oversized_dicom_is_refused_before_decoding(tmp_path):
    import pydicom

    from medxfer.data.images import read_gray
    from tests.test_images import _write_dicom

    path = tmp_path / "big.dcm"
    _write_dicom(path, np.zeros((4, 4)))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 20000
    ds.save_as(path)
    with pytest.raises(MedxferError, match="too many pixels: 20000 x 20000 = 400,000,000"):
        read_gray(path)


@pytest.mark.integration
def test_predict_gives_the_bomb_an_error_row_and_the_others_predictions(tiny_run, tmp_path):
    from medxfer.cli import main

    run, options = tiny_run
    good = sorted((Path(options["data"]) / "test" / "NORMAL").iterdir())[:2]
    bomb = _png_declaring(tmp_path / "bomb.png", 20000, 20000)
    assert main(["predict", str(run), str(good[0]), str(bomb), str(good[1]), "--out",
                 str(tmp_path / "p.csv"), "--quiet"]) == 1  # fmt: skip
    rows = pd.read_csv(tmp_path / "p.csv")
    assert list(rows.file) == [str(good[0]), str(bomb), str(good[1])]
    assert "decompression bomb" in rows.error[1] and rows.probability.isna()[1]
    assert rows.error.isna()[[0, 2]].all()
    assert main(["predict", str(run), *map(str, good), "--out", str(tmp_path / "ok.csv"),
                 "--quiet"]) == 0  # fmt: skip
    alone = pd.read_csv(tmp_path / "ok.csv")
    np.testing.assert_allclose(rows.probability[[0, 2]], alone.probability, rtol=1e-6)


def test_oversized_image_in_a_dataset_stops_or_is_skipped(tmp_path):
    from medxfer.data.audit import audit
    from medxfer.data.cache import decode_dataset
    from medxfer.data.sources import open_dataset

    data = make_subset(tmp_path / "d", {"train": 2, "test": 2})
    bomb = _png_declaring(data / "train" / "NORMAL" / "bomb.png", 20000, 20000)
    imageset = open_dataset(data)
    with pytest.raises(MedxferError, match=f"^{bomb}: unreadable image .*--skip-bad"):
        decode_dataset(imageset, 32, tmp_path / "c", progress=False)
    decoded = decode_dataset(imageset, 32, tmp_path / "c", skip_bad=True, progress=False)
    assert decoded.ok.sum() == 8 and [e[0] for e in decoded.errors] == [str(bomb)]
    unreadable = audit(str(data))["unreadable"]
    assert [u["file"] for u in unreadable] == [str(bomb)]


# ---------------------------------------------------------------- medxfer cache info / clear


def test_cache_info_and_clear(tmp_path, capsys):
    from medxfer.cli import main

    for kind, parts, shape in (
        ("images", 1, (10, 10)),
        ("images", 2, (20, 10)),
        ("features", 3, (100, 1)),
    ):
        store = ChunkedArray(tmp_path, kind, {"i": parts}, shape, np.uint8, 100)
        store.write(0, np.zeros(shape, np.uint8))
    info = cache_info(tmp_path)
    assert info["images"]["entries"] == 2 and info["features"]["entries"] == 1
    sizes = {k: sum(os.path.getsize(p) for p in (tmp_path / k).glob("*/*")) for k in info}
    assert {k: v["bytes"] for k, v in info.items()} == sizes
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "images           2 entries" in out and "features         1 entries" in out
    assert main(["cache", "clear", "--features", "--cache-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "features").exists() and len(list((tmp_path / "images").iterdir())) == 2
    assert f"{sizes['features']} B freed" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert cache_info(tmp_path)["images"] == {
        "folder": str(tmp_path / "images"),
        "entries": 0,
        "bytes": 0,
    }


def test_a_decode_that_another_process_finished_meanwhile_is_used(tmp_path, monkeypatch):
    """Two runs started together on one collection: between this run's list of missing
    chunks and its decoding, the other one fills the entry; this run takes those chunks."""
    import medxfer.data.cache as image_cache
    from medxfer.cache import ChunkedArray
    from medxfer.data.sources import open_dataset

    data = make_subset(tmp_path / "d", {"train": 6, "test": 4})
    monkeypatch.setattr(image_cache, "CHUNK_BYTES", 32 * 32 * 3)  # several chunks
    reference = image_cache.decode_dataset(open_dataset(data), 32, tmp_path / "ref", progress=False)
    original = ChunkedArray.missing

    def missing_then_the_other_run_finishes(self):
        todo = original(self)
        if todo and self.folder.parent.name == "images":
            monkeypatch.setattr(ChunkedArray, "missing", original)
            image_cache.decode_dataset(open_dataset(data), 32, tmp_path / "c", progress=False)
        return todo

    monkeypatch.setattr(ChunkedArray, "missing", missing_then_the_other_run_finishes)
    decoded = image_cache.decode_dataset(open_dataset(data), 32, tmp_path / "c", progress=False)
    np.testing.assert_array_equal(decoded.pixels.numpy(), reference.pixels.numpy())
    assert decoded.ok.all()
