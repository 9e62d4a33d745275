"""Review of "Run it like a lab tool": failing cases found by trying it as a new user would."""

from __future__ import annotations

import numpy as np
import pytest

from medxfer.cache import ChunkedArray
from medxfer.errors import MedxferWarning


def _flips(path):
    """Every single-bit flip of a file."""
    good = path.read_bytes()
    for pos in range(len(good)):
        for bit in range(8):
            raw = bytearray(good)
            raw[pos] ^= 1 << bit
            yield pos, bit, bytes(raw)


@pytest.mark.parametrize(
    ("kind", "array", "meta"),
    [
        ("images", np.arange(256, dtype=np.uint8).reshape(16, 16), {"ok": [True], "errors": []}),
        ("features", np.linspace(-1, 1, 40, dtype=np.float32).reshape(5, 8), {"x": "y"}),
    ],
)
def test_every_header_and_marker_bit_flip_is_a_warned_miss(tmp_path, kind, array, meta):
    """A flipped bit anywhere in the header (dtype, shape, key) or in a chunk's marker (its
    metadata, its CRC) is a miss with a warning, never an exception and never a wrong array
    (such as '<f4' read as byte-swapped '>f4') or wrong metadata."""

    def store() -> ChunkedArray:
        return ChunkedArray(tmp_path, kind, {"k": kind}, array.shape, array.dtype, len(array))

    first = store()
    first.write(0, array, meta)
    for path in (first.folder / "header.json", first.folder / "000000.done"):
        good = path.read_bytes()
        for pos, bit, raw in _flips(path):
            path.write_bytes(raw)
            with pytest.warns(MedxferWarning, match="damaged cache entry"):
                assert store().missing() == [0], (path.name, pos, bit)
            store().write(0, array, meta)  # healed: rewritten as it was
            assert path.read_bytes() == good
        reopened = store()
        assert reopened.missing() == []
        np.testing.assert_array_equal(reopened.read(np.arange(len(array))), array)
        assert reopened.meta(0) == meta


@pytest.mark.integration
def test_run_tracked_into_another_sqlite_store_keeps_artifacts_beside_it(
    small_kermany, tmp_path, monkeypatch
):
    """``--tracking-uri sqlite:///elsewhere/store.db``: the artifacts go beside that store, not
    into ``./mlruns`` of whatever folder the command happened to be started from."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    import medxfer

    cwd = tmp_path / "started-here"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path / 'lab' / 'store.db'}"
    options = dict(image_size=32, epochs=1, bootstrap=0, val_fraction=0.25, quiet=True)
    folder = medxfer.train(
        small_kermany, tmp_path / "run", track="mlflow", tracking_uri=uri, **options
    )
    client = MlflowClient(uri)
    run = client.get_run(folder.read_tracking()["run_id"])
    artifact_root = run.info.artifact_uri.removeprefix("file://")
    assert artifact_root.startswith(str(tmp_path / "lab" / "mlartifacts"))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json"}
    assert not any(cwd.iterdir())  # nothing left in the folder the command ran from


def test_run_folder_lock_is_one_lock_however_the_folder_is_spelt(tmp_path, monkeypatch):
    """``--out .`` from inside the folder and ``--out /abs/run`` name one folder: one lock."""
    from medxfer.locking import LockHeld, run_folder_lock

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    with run_folder_lock("."):
        with pytest.raises(LockHeld, match="another medxfer process is training"):
            run_folder_lock(run).__enter__()
        with pytest.raises(LockHeld):
            run_folder_lock(tmp_path / "x" / ".." / "run").__enter__()
    assert not list(tmp_path.glob(".*.lock"))  # released and removed
