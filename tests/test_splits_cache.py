import shutil

import numpy as np
import pytest

from medxfer.data import cache as cache_module
from medxfer.data.cache import decode_dataset
from medxfer.data.options import DataOptions
from medxfer.data.sources import open_dataset
from medxfer.data.splits import assign_splits, patient_ids
from medxfer.errors import MedxferError
from tests.conftest import make_subset


def test_kermany_patient_ids(small_kermany):
    ds = open_dataset(small_kermany)
    ids = dict(zip([r.name for r in ds.records], patient_ids(ds), strict=True))
    for name, pid in ids.items():
        if name.startswith("person"):
            assert pid == name.split("_")[0]
        elif name.startswith("IM-"):  # IM-0011-0001-0002.jpeg: patient IM-0011
            assert pid == "-".join(name.split("-")[:2])
        elif name.startswith("NORMAL2-IM-"):
            assert pid == "-".join(name.split("-")[:3])


def test_val_split_is_grouped_and_stratified(tmp_path):
    data = make_subset(tmp_path / "d", {"train": 150, "test": 2})
    ds = open_dataset(data)
    labels = np.array([r.label == "PNEUMONIA" for r in ds.records], dtype=np.int64)
    splits = assign_splits(ds, labels, DataOptions(val_fraction=0.2, seed=1))
    ids = np.array(patient_ids(ds))
    train_ids, val_ids = set(ids[splits == "train"]), set(ids[splits == "val"])
    assert val_ids and not train_ids & val_ids  # no patient on both sides
    frac = (splits == "val").sum() / (splits != "test").sum()
    assert 0.1 < frac < 0.3
    assert 0.3 < labels[splits == "val"].mean() < 0.7  # both classes, roughly balanced as train
    assert (splits[[i for i, r in enumerate(ds.records) if r.split == "test"]] == "test").all()


def test_bad_val_fraction():
    with pytest.raises(MedxferError, match="val-fraction"):
        DataOptions(val_fraction=0.7).validate()


def test_patients_from_csv_column_then_regex_then_file(tmp_path, kermany):
    files = [sorted((kermany / "train" / c).iterdir())[0] for c in ("NORMAL", "PNEUMONIA")]
    lines = ["path,label,split,patient", f"{files[0]},a,train,P7", f"{files[1]},b,train,"]
    lines += [f"{f},{c},test," for f, c in zip(files, "ab", strict=True)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    ds = open_dataset(tmp_path / "m.csv")
    assert [r.patient for r in ds.records] == [
        "P7",
        files[1].name.split("_")[0],
        "IM-0115",
        "person1000",
    ]
    ds = open_dataset(tmp_path / "m.csv", patient_regex=None)
    assert patient_ids(ds) == ["P7"] + [f"file:{f}" for f in (files[1], *files)]


def test_decode_cache_is_keyed_by_content(tmp_path, monkeypatch):
    data = make_subset(tmp_path / "a", {"train": 3, "test": 2})
    cache_dir = tmp_path / "cache"
    first = decode_dataset(open_dataset(data), 32, cache_dir, progress=False)
    # a renamed copy of the same images must come from the cache, without decoding
    copy = tmp_path / "b"
    shutil.copytree(data, copy)

    def fail(*_args, **_kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_module, "load_image", fail)
    second = decode_dataset(open_dataset(copy), 32, cache_dir, progress=False)
    np.testing.assert_array_equal(first.pixels, second.pixels)
    assert first.key == second.key
    # another resolution is another entry
    monkeypatch.undo()
    assert decode_dataset(open_dataset(copy), 48, cache_dir, progress=False).pixels.shape[1] == 48


def test_decode_error_and_skip_bad(tmp_path):
    data = make_subset(tmp_path / "a", {"train": 3, "test": 2})
    victim = next((data / "train" / "NORMAL").iterdir())
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(MedxferError, match=victim.name):
        decode_dataset(open_dataset(data), 32, tmp_path / "c", progress=False)
    decoded = decode_dataset(open_dataset(data), 32, tmp_path / "c", skip_bad=True, progress=False)
    assert decoded.ok.sum() == len(decoded.ok) - 1
    assert decoded.errors[0][0] == str(victim)
