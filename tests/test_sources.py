import shutil

import numpy as np
import pytest

from medxfer.data.sources import open_dataset
from medxfer.data.tasks import resolve_positive
from medxfer.errors import MedxferError


def test_folder_layout_counts(small_kermany):
    ds = open_dataset(small_kermany)
    assert ds.classes == ["NORMAL", "PNEUMONIA"]
    assert len(ds.split_indices("train")) == 48
    assert len(ds.split_indices("val")) == 8
    assert len(ds.split_indices("test")) == 20
    assert resolve_positive(ds.classes, None) == "PNEUMONIA"


def test_positive_defaults_to_second_class_without_pneumonia():
    assert resolve_positive(["benign", "malignant"], None) == "malignant"
    with pytest.raises(MedxferError, match="not one of"):
        resolve_positive(["a", "b"], "c")


def test_missing_split(writable_subset):
    shutil.rmtree(writable_subset / "test")
    with pytest.raises(MedxferError, match="test: missing split folder"):
        open_dataset(writable_subset)


def test_missing_class_folder(writable_subset):
    shutil.rmtree(writable_subset / "test" / "NORMAL")
    with pytest.raises(MedxferError, match="test/NORMAL: missing class folder"):
        open_dataset(writable_subset)


def test_empty_class_folder(writable_subset):
    for f in (writable_subset / "train" / "NORMAL").iterdir():
        f.unlink()
    with pytest.raises(MedxferError, match="train/NORMAL: empty class folder"):
        open_dataset(writable_subset)


def test_non_image_file(writable_subset):
    (writable_subset / "train" / "NORMAL" / "notes.txt").write_text("hello")
    with pytest.raises(MedxferError, match=r"notes\.txt: not an image file"):
        open_dataset(writable_subset)
    ds = open_dataset(writable_subset, skip_bad=True)
    assert [s[0].endswith("notes.txt") for s in ds.skipped] == [True]


def _npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        "train_labels": np.array([[0], [1]] * 5),
        "val_images": rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        "val_labels": np.array([[0], [1]] * 2),
        "test_images": rng.integers(0, 255, (6, 28, 28, 3), dtype=np.uint8),
        "test_labels": np.array([[0], [1]] * 3),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_source(tmp_path):
    ds = open_dataset(_npz(tmp_path / "p.npz"))
    assert ds.kind == "npz" and ds.classes == ["0", "1"]
    assert len(ds.records) == 20 and ds.records[0].source.endswith("#train/0")


def test_npz_wrong_keys(tmp_path):
    path = _npz(tmp_path / "p.npz", test_images=None)
    with pytest.raises(MedxferError, match=r"p.npz: missing keys \['test_images'\]"):
        open_dataset(path)


def test_npz_wrong_shapes(tmp_path):
    path = _npz(tmp_path / "p.npz", train_labels=np.zeros((9, 1)))
    with pytest.raises(MedxferError, match=r"train_labels of shape \(9, 1\) fits no task"):
        open_dataset(path)
    path = _npz(tmp_path / "w.npz", train_labels=np.zeros((10, 2)))  # label sets vs classes
    with pytest.raises(MedxferError, match=r"label widths differ between splits"):
        open_dataset(path)
    path = _npz(tmp_path / "q.npz", train_images=np.zeros((10, 28, 28), dtype=np.float32))
    with pytest.raises(MedxferError, match="train_images must be uint8"):
        open_dataset(path)


def test_csv_manifest(tmp_path, kermany):
    lines = ["path,label,split"]
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            for f in sorted((kermany / split / cls).iterdir())[:3]:
                lines.append(f"{f},{cls.lower()},{split}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    ds = open_dataset(tmp_path / "m.csv")
    assert ds.classes == ["normal", "pneumonia"] and len(ds.records) == 12


def test_csv_missing_file_and_bad_header(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split\nnope.png,a,train\n")
    with pytest.raises(MedxferError, match=r"nope\.png: file not found"):
        open_dataset(tmp_path / "m.csv")
    (tmp_path / "h.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(MedxferError, match="CSV header must contain"):
        open_dataset(tmp_path / "h.csv")


def test_unknown_dataset_type(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(MedxferError, match="unknown dataset type"):
        open_dataset(tmp_path / "d.txt")
