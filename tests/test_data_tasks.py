"""Binary, multi-class and multi-label data from real images: task inference, targets,
patients, bad input, cross-validation folds, colour modes, the name-based manifest, audit."""

from __future__ import annotations

import csv
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.cli import main
from medxfer.data.audit import audit
from medxfer.data.images import is_gray
from medxfer.data.manifest import KERMANY_SUBTYPE_REGEX, write_manifest
from medxfer.data.options import DataOptions
from medxfer.data.prepared import detect_color, prepare_data
from medxfer.data.sources import open_dataset
from medxfer.data.splits import assign_splits, patient_ids
from medxfer.data.tasks import strata, target_array, task_classes
from medxfer.errors import MedxferError
from tests.conftest import KERMANY, SHARED

BCCD = SHARED / "data" / "bccd" / "BCCD" / "JPEGImages"
FAST = DataOptions(val_fraction=0)


def _files(split: str, cls: str, n: int, offset: int = 0) -> list[Path]:
    return sorted((KERMANY / split / cls).iterdir())[offset : offset + n]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _subtype(name: str) -> str:
    """Brute-force reading of a Kermany name: NORMAL, BACTERIA or VIRUS."""
    for word in ("bacteria", "virus"):
        if f"_{word}_" in name:
            return word.upper()
    return "NORMAL"


# ---------------------------------------------------------------- manifest and multi-class


@pytest.fixture(scope="module")
def kermany_manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "kermany3.csv"
    write_manifest(KERMANY, out, label_from_name=KERMANY_SUBTYPE_REGEX)
    return out


def test_manifest_counts_match_file_names(kermany_manifest):
    rows = _read_csv(kermany_manifest)
    got = Counter((r["split"], r["label"]) for r in rows)
    expected = Counter(
        (split, _subtype(f.name))
        for split in ("train", "val", "test")
        for cls in ("NORMAL", "PNEUMONIA")
        for f in (KERMANY / split / cls).iterdir()
    )
    assert got == expected and set(label for _, label in got) == {"NORMAL", "BACTERIA", "VIRUS"}
    for r in rows[:50] + rows[-50:]:  # paths resolve to the real file; patient from the name
        file = (kermany_manifest.parent / r["path"]).resolve()
        assert file.is_file() and file.parent.parent.name == r["split"]
        assert r["patient"] == re.match(r"^(person\d+|(?:NORMAL2-)?IM-\d+)", file.name).group(1)


def test_manifest_cli(tmp_path, capsys):
    data = tmp_path / "d"
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (data / split / cls).mkdir(parents=True)
            for f in _files(split, cls, 3, offset=100):
                shutil.copy(f, data / split / cls / f.name)
    out = tmp_path / "m.csv"
    assert main(["manifest", str(data), "--label-from-name", "_(virus)_", "--out", str(out)]) == 0
    rows = _read_csv(out)
    assert [r["label"] for r in rows] == [
        "VIRUS" if "_virus_" in Path(r["path"]).name else Path(r["path"]).parent.name for r in rows
    ]
    assert f"wrote {out}" in capsys.readouterr().out


def _subset(manifest: Path, dest: Path, per: int) -> Path:
    """The first ``per`` rows of each (split, label) of a manifest, paths made absolute."""
    rows, seen = [], Counter()
    for r in _read_csv(manifest):
        key = (r["split"], r["label"])
        if r["split"] != "val" and seen[key] < per:
            seen[key] += 1
            rows.append([str((manifest.parent / r["path"]).resolve()), r["label"], r["split"]])
    return _write_csv(dest, ["path", "label", "split"], rows)


def test_three_class_manifest_prepares_multiclass(kermany_manifest, tmp_path):
    small = _subset(kermany_manifest, tmp_path / "small.csv", 6)
    data = prepare_data(small, 32, FAST, cache_dir=tmp_path / "c", progress=False)
    assert data.task == "multiclass" and data.positive is None and data.negative is None
    assert data.classes == ["BACTERIA", "NORMAL", "VIRUS"]
    assert data.targets.dtype.is_floating_point is False and data.targets.shape == (36,)
    expected = [data.classes.index(_subtype(Path(r.source).name)) for r in data.records]
    assert data.targets.tolist() == expected
    assert data.pixels.shape == (36, 32, 32) and data.color == "gray"
    assert data.patients == [r.patient for r in data.records]  # Kermany regex found them all
    with pytest.raises(MedxferError, match="only a binary task has a positive class"):
        prepare_data(small, 32, DataOptions(val_fraction=0, positive="NORMAL"), progress=False)
    with pytest.raises(MedxferError, match=r"--task binary: .* has 3 classes"):
        prepare_data(small, 32, DataOptions(val_fraction=0, task="binary"), progress=False)


def test_multiclass_validation_is_stratified_and_grouped(kermany_manifest, tmp_path):
    small = _subset(kermany_manifest, tmp_path / "small.csv", 60)
    ds = open_dataset(small)
    classes, _ = task_classes(ds, "multiclass", None)
    y = target_array(ds.records, "multiclass", classes)
    train = np.flatnonzero([r.split == "train" for r in ds.records])
    split = assign_splits(ds, strata(y, train), DataOptions(val_fraction=0.2, seed=3))
    ids = np.array(patient_ids(ds))
    assert not set(ids[split == "train"]) & set(ids[split == "val"])
    val = Counter(y[split == "val"])
    assert sorted(val) == [0, 1, 2]  # each class reaches validation
    assert all(abs(val[k] / (split == "val").sum() - 1 / 3) < 0.15 for k in range(3))


# ---------------------------------------------------------------- binary defaults


def test_binary_kermany_targets_and_order(small_kermany, tmp_path):
    data = prepare_data(small_kermany, 32, FAST, cache_dir=tmp_path / "c", progress=False)
    assert data.task == "binary" and data.classes == ["NORMAL", "PNEUMONIA"]
    assert data.positive == "PNEUMONIA" and data.negative == "NORMAL"
    assert data.targets.tolist() == [int(r.label == "PNEUMONIA") for r in data.records]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 48, "val": 8, "test": 20}
    flipped = prepare_data(
        small_kermany, 32, DataOptions(val_fraction=0, positive="NORMAL"), progress=False
    )
    assert flipped.classes == ["PNEUMONIA", "NORMAL"]
    assert flipped.targets.tolist() == (1 - data.targets).tolist()
    as_multiclass = prepare_data(
        small_kermany, 32, DataOptions(val_fraction=0, task="multiclass"), progress=False
    )
    assert as_multiclass.task == "multiclass" and as_multiclass.positive is None


# ---------------------------------------------------------------- multi-label


def _gray(path: Path, size: int = 28) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR))


def test_multilabel_npz_from_real_images(tmp_path):
    arrays = {}
    for split, n in (("train", 6), ("test", 4)):
        files = _files(split, "NORMAL", n) + _files(split, "PNEUMONIA", 2 * n)
        arrays[f"{split}_images"] = np.stack([_gray(f) for f in files])
        pneumonia = ["_" in f.name for f in files]  # person..._bacteria_/_virus_ names
        bacterial = ["_bacteria_" in f.name for f in files]
        arrays[f"{split}_labels"] = np.array([pneumonia, bacterial], dtype=np.uint8).T
    np.savez(tmp_path / "ml.npz", **arrays)
    data = prepare_data(tmp_path / "ml.npz", 28, FAST, cache_dir=tmp_path / "c", progress=False)
    assert data.task == "multilabel" and data.classes == ["0", "1"] and data.positive is None
    expected = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.float32)
    assert data.targets.dtype.is_floating_point
    np.testing.assert_array_equal(data.targets.numpy(), expected)
    np.testing.assert_array_equal(data.pixels.numpy()[:18], arrays["train_images"])
    assert data.color == "gray" and data.patients[0] == f"file:{data.records[0].source}"
    # a column without any positive training image is refused
    arrays["train_labels"][:, 1] = 0
    np.savez(tmp_path / "none.npz", **arrays)
    with pytest.raises(MedxferError, match=r"label '1' is in the test split .* but not in train"):
        prepare_data(tmp_path / "none.npz", 28, FAST, progress=False)
    arrays["test_labels"][:, 1] = 0
    np.savez(tmp_path / "empty.npz", **arrays)
    with pytest.raises(MedxferError, match="class '1' has no training images"):
        prepare_data(tmp_path / "empty.npz", 28, FAST, progress=False)


def _multilabel_rows(per: int) -> list[list[str]]:
    rows = []
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            for i, f in enumerate(_files(split, cls, per if split != "val" else 2)):
                kind = _subtype(f.name)
                labels = "" if kind == "NORMAL" else f"PNEUMONIA|{kind}"
                rows.append([str(f), labels, split, f"{split}{i // 2}-{cls}"])
    return rows


def test_csv_multilabel_labels_column(tmp_path):
    rows = _multilabel_rows(12)
    path = _write_csv(tmp_path / "ml.csv", ["path", "labels", "split", "patient"], rows)
    data = prepare_data(
        path, 24, DataOptions(val_fraction=0.25), cache_dir=tmp_path / "c", progress=False
    )
    assert data.task == "multilabel" and data.classes == ["BACTERIA", "PNEUMONIA", "VIRUS"]
    by_file = {r[0]: set(filter(None, r[1].split("|"))) for r in rows}
    for record, target in zip(data.records, data.targets.tolist(), strict=True):
        assert {c for c, t in zip(data.classes, target, strict=True) if t} == by_file[record.source]
    # patients come from the CSV column; validation never shares one with train
    assert data.patients == [r.patient for r in data.records]
    train = {data.patients[i] for i in data.splits["train"].tolist()}
    assert not train & {data.patients[i] for i in data.splits["val"].tolist()}
    assert len(data.splits["test"]) == 24  # test untouched
    report = audit(str(path))
    assert report["task"] == "multilabel"
    names, matrix = report["cooccurrence"]["labels"], np.array(report["cooccurrence"]["matrix"])
    sets = list(by_file.values())
    brute = [[sum(a in s and b in s for s in sets) for b in names] for a in names]
    np.testing.assert_array_equal(matrix, brute)
    assert report["counts"]["train"]["PNEUMONIA"] == sum(
        "PNEUMONIA" in r[1] for r in rows if r[2] == "train"
    )


def test_multilabel_strata_pick_the_rarest_label():
    targets = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=np.float32)
    rows = np.arange(5)
    freq = targets.sum(axis=0)
    brute = [min(np.flatnonzero(t), key=lambda j: (freq[j], j)) if t.any() else 3 for t in targets]
    assert strata(targets, rows).tolist() == brute


# ---------------------------------------------------------------- bad input


def _binary_rows(per: int = 3) -> list[list[str]]:
    return [
        [str(f), cls, split]
        for split in ("train", "test")
        for cls in ("NORMAL", "PNEUMONIA")
        for f in _files(split, cls, per)
    ]


def test_bad_manifests(tmp_path):
    rows = _binary_rows()
    header = ["path", "label", "split"]
    cases = {
        "short row": (header, [*rows, [rows[0][0]]], r"short\.csv:14: row has no label column"),
        "empty label": (header, [*rows, [rows[0][0], " ", "train"]], r"empty\.csv:14: empty label"),
        "both label columns": (
            ["path", "label", "labels", "split"],
            [[r[0], r[1], r[1], r[2]] for r in rows],
            "one of label / labels",
        ),
        "label only in test": (
            header,
            [*rows, [rows[0][0], "EDEMA", "test"]],
            "label 'EDEMA' is in the test split",
        ),
        "one-class test": (
            header,
            [r for r in rows if not (r[2] == "test" and r[1] == "NORMAL")],
            "test split has only class 'PNEUMONIA'",
        ),
    }
    for name, (head, body, message) in cases.items():
        path = _write_csv(tmp_path / f"{name.split()[0]}.csv", head, body)
        with pytest.raises(MedxferError, match=message):
            prepare_data(path, 32, FAST, progress=False)


def test_npz_label_shape_fits_no_task(tmp_path):
    images = np.zeros((4, 8, 8), dtype=np.uint8)
    for labels in (np.array([[0, 2], [1, 0], [0, 1], [1, 1]]), np.full((4, 1), 0.5), np.zeros(3)):
        np.savez(tmp_path / "x.npz", train_images=images, train_labels=labels,
                 test_images=images, test_labels=labels)  # fmt: skip
        with pytest.raises(MedxferError, match=r"x\.npz: train_labels of shape .* fits no task"):
            open_dataset(tmp_path / "x.npz")


def test_options_are_checked_without_data():
    bad = [
        (DataOptions(folds=5, fold=0), "choose one"),
        (DataOptions(val_fraction=0, folds=5, fold=5), "--fold 5: must be in 0..4"),
        (DataOptions(val_fraction=0, fold=1), "needs --folds"),
        (DataOptions(task="regression"), "--task 'regression'"),
        (DataOptions(color="cmyk"), "--color 'cmyk'"),
        (DataOptions(task="multilabel", positive="x"), "only a binary task"),
        (DataOptions(patient_regex="(unclosed"), "invalid regular expression"),
    ]
    for options, message in bad:
        with pytest.raises(MedxferError, match=re.escape(message) if "(" in message else message):
            options.validate()
    assert DataOptions(val_fraction=0, folds=5, fold=4).validate().fold == 4


# ---------------------------------------------------------------- cross-validation folds


def test_kermany_folds_partition_the_pool_by_patient():
    ds = open_dataset(KERMANY)
    classes, _ = task_classes(ds, "binary", None)
    y = target_array(ds.records, "binary", classes)
    original = np.array([r.split for r in ds.records])
    pool = np.flatnonzero(original != "test")
    ids = np.array(patient_ids(ds))
    k, seen = 5, []
    for fold in range(k):
        options = DataOptions(val_fraction=0, folds=k, fold=fold, seed=7)
        split = assign_splits(ds, strata(y, pool), options)
        assert (split[original == "test"] == "test").all() and set(split[pool]) == {"train", "val"}
        val = np.flatnonzero(split == "val")
        assert not set(ids[val]) & set(ids[split == "train"])  # no patient on both sides
        for cls in (0, 1):  # stratified: within 1 image of the proportional count
            assert abs((y[val] == cls).sum() - (y[pool] == cls).sum() / k) <= 1
        seen.append(val)
    everything = np.concatenate(seen)
    assert len(everything) == len(set(everything)) == len(pool)  # the folds partition the pool
    again = assign_splits(ds, strata(y, pool), DataOptions(val_fraction=0, folds=k, fold=2, seed=7))
    np.testing.assert_array_equal(np.flatnonzero(again == "val"), seen[2])
    other = assign_splits(ds, strata(y, pool), DataOptions(val_fraction=0, folds=k, fold=2, seed=8))
    assert not np.array_equal(np.flatnonzero(other == "val"), seen[2])


def test_prepare_data_fold(small_kermany, tmp_path):
    options = DataOptions(val_fraction=0, folds=4, fold=1)
    data = prepare_data(small_kermany, 32, options, cache_dir=tmp_path / "c", progress=False)
    assert len(data.splits["train"]) + len(data.splits["val"]) == 56  # 48 train + 8 own val
    assert len(data.splits["test"]) == 20
    val = set(data.splits["val"].tolist())
    assert not {data.patients[i] for i in val} & {
        data.patients[i] for i in data.splits["train"].tolist()
    }


# ---------------------------------------------------------------- colour


def test_colour_auto_gray_kermany_and_forced_rgb(small_kermany, tmp_path):
    gray = prepare_data(small_kermany, 32, FAST, cache_dir=tmp_path / "c", progress=False)
    assert gray.color == "gray" and gray.pixels.shape == (76, 32, 32)
    rgb = prepare_data(
        small_kermany,
        32,
        DataOptions(val_fraction=0, color="rgb"),
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert rgb.pixels.shape == (76, 3, 32, 32) and rgb.data_key != gray.data_key
    for channel in range(3):  # Kermany has R = G = B: every channel is the gray image
        assert (rgb.pixels[:, channel] == gray.pixels[:]).all()


def test_colour_auto_on_tinted_images(tmp_path):
    data = tmp_path / "tinted"
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (data / split / cls).mkdir(parents=True)
            for f in _files(split, cls, 2):
                g = np.asarray(Image.open(f).convert("L"), dtype=np.float64)
                tint = np.stack([g, g * 0.8, g * 0.5], axis=-1).astype(np.uint8)
                Image.fromarray(tint).save(data / split / cls / f"{f.stem}.png")
    prepared = prepare_data(data, 24, FAST, cache_dir=tmp_path / "c", progress=False)
    assert prepared.color == "rgb" and prepared.pixels.shape == (8, 3, 24, 24)
    first = Path(prepared.records[0].source)
    reference = np.asarray(Image.open(first).convert("RGB").resize((24, 24), Image.BILINEAR))
    np.testing.assert_array_equal(prepared.pixels[0].permute(1, 2, 0).numpy(), reference)


@pytest.mark.skipif(not BCCD.is_dir(), reason="BCCD not present")
def test_colour_auto_on_bccd_jpegs(tmp_path):
    files = sorted(BCCD.iterdir())[:8]
    rows = [[str(f), "ab"[i % 2], "train" if i < 4 else "test"] for i, f in enumerate(files)]
    path = _write_csv(tmp_path / "bccd.csv", ["path", "label", "split"], rows)
    assert detect_color(open_dataset(path)) == "rgb"
    assert not is_gray(np.asarray(Image.open(files[0]).convert("RGB")))  # independent check
    data = prepare_data(path, 16, FAST, cache_dir=tmp_path / "c", progress=False)
    assert data.color == "rgb" and data.pixels.shape == (8, 3, 16, 16)
