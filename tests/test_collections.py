"""ChestX-ray14- and CheXpert-shaped tables, built here from real Kermany pixels with derived
labels: the manifest they give, their bad input, and a multi-label run end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from medxfer.cli import main
from medxfer.data.manifest import write_collection_manifest
from medxfer.errors import MedxferError, MedxferWarning
from tests.conftest import KERMANY

FINDINGS = ("Pneumonia", "Effusion")


def _kermany(n: int) -> list[tuple[Path, bool]]:
    """n real images, half NORMAL and half PNEUMONIA (train and test folders mixed)."""
    out = []
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((KERMANY / split / cls).iterdir())[: n // 4]
            out += [(f, cls == "PNEUMONIA") for f in files]
    return out


def _findings(i: int, pneumonia: bool) -> list[str]:
    return (["Pneumonia"] if pneumonia else []) + (["Effusion"] if i % 3 == 0 else [])


def chestxray14(root: Path, n: int = 48) -> Path:
    """Data_Entry_2017.csv, the two split lists and images_00N/images/*.png; 2 images per
    patient, the first n / 3 patients in train_val and the rest in test, every 8th image a
    lateral (LL)."""
    entries, lists = [], {"train_val_list.txt": [], "test_list.txt": []}
    for i, (source, pneumonia) in enumerate(_kermany(n)):
        patient = i // 2
        name = f"{patient:08d}_{i % 2:03d}.png"
        folder = root / f"images_{1 + i % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("L").save(folder / name)
        labels = "|".join(_findings(i, pneumonia)) or "No Finding"
        entries.append([name, labels, 0, patient, 40, "M", "LL" if i % 8 == 7 else "PA"])
        lists["train_val_list.txt" if patient < n // 3 else "test_list.txt"].append(name)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID"]
        writer.writerow([*header, "Patient Age", "Patient Gender", "View Position"])
        writer.writerows(entries)
    for name, images in lists.items():
        (root / name).write_text("\n".join(images) + "\n")
    return root


def chexpert(root: Path, n: int = 48) -> Path:
    """CheXpert-v1.0-small/{train,valid}.csv with 1/0/-1/blank finding columns and
    patientNNNNN/studyN/viewN_frontal|lateral.jpg files; root is the release folder."""
    release = root / "CheXpert-v1.0-small"
    rows = {"train": [], "valid": []}
    for i, (source, pneumonia) in enumerate(_kermany(n)):
        split = "train" if i < 3 * n // 4 else "valid"
        lateral = i % 8 == 7
        relative = (
            f"CheXpert-v1.0-small/{split}/patient{i // 2:05d}/study{1 + i % 2}/view{1 + lateral}_"
        )
        relative += "lateral.jpg" if lateral else "frontal.jpg"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("L").save(root / relative)
        effusion = "-1.0" if i % 3 == 0 else ("" if i % 3 == 1 else "0.0")  # uncertain/blank
        values = ["1.0" if pneumonia else "0.0", effusion]
        rows[split].append(
            [relative, "Male", 40, "Lateral" if lateral else "Frontal", "PA", *values]
        )
    for split, table in rows.items():
        with open(release / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS])
            writer.writerows(table)
    return release


def test_chestxray14_manifest_keeps_labels_patients_splits_and_views(tmp_path):
    root = chestxray14(tmp_path / "nih")
    out = tmp_path / "m.csv"
    write_collection_manifest(root, out, collection="chestxray14", view="frontal")
    table = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert list(table.columns) == ["path", "labels", "split", "patient"]
    assert len(table) == 48 - 6  # the six LL images left out
    entries = pd.read_csv(root / "Data_Entry_2017.csv").set_index("Image Index")
    for row in table.itertuples():
        entry = entries.loc[Path(row.path).name]
        expected = "" if entry["Finding Labels"] == "No Finding" else entry["Finding Labels"]
        assert row.labels == "|".join(sorted(expected.split("|") if expected else []))
        assert row.patient == str(entry["Patient ID"]) and entry["View Position"] == "PA"
        assert row.split == ("train" if entry["Patient ID"] < 16 else "test")
        assert (out.parent / row.path).is_file()
    write_collection_manifest(root, out, collection="chestxray14", view="all")
    assert len(pd.read_csv(out)) == 48


def test_chexpert_uncertain_policies_and_views(tmp_path):
    release = chexpert(tmp_path / "cx")
    zeros, ones = tmp_path / "zeros.csv", tmp_path / "ones.csv"
    write_collection_manifest(release, zeros, collection="chexpert", uncertain="zeros")
    write_collection_manifest(release, ones, collection="chexpert", uncertain="ones")
    z, o = (pd.read_csv(p, keep_default_na=False) for p in (zeros, ones))
    source = pd.concat(
        [
            pd.read_csv(release / f"{s}.csv", dtype=str, keep_default_na=False)
            for s in ("train", "valid")
        ]
    )
    effusion = dict(zip(source.Path.map(lambda p: Path(p).name + p), source.Effusion, strict=True))
    for zr, orow in zip(z.itertuples(), o.itertuples(), strict=True):
        key = Path(zr.path).name + zr.path.split("cx/", 1)[-1]
        value = effusion[key]
        assert ("Effusion" in zr.labels.split("|")) == (value == "1.0")
        assert ("Effusion" in orow.labels.split("|")) == (value in ("1.0", "-1.0"))
        assert zr.patient == orow.patient and zr.patient.startswith("patient")
    assert set(z.split) == {"train", "test"}
    frontal = tmp_path / "frontal.csv"
    write_collection_manifest(release, frontal, collection="chexpert", view="frontal")
    assert len(pd.read_csv(frontal)) == 48 - 6 and len(z) == 48


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing image", r"00000003_000\.png: file not found under .* \(listed in .*Data_Entry"),
        ("unknown in list", r"test_list\.txt:\d+: 99999999_000\.png is not in Data_Entry"),
        ("patient in both", r"patient 3 is in both official splits"),
        ("in no list", r"Data_Entry_2017\.csv:\d+: 00000000_000\.png is in neither"),
    ],
)
def test_chestxray14_bad_input_stops_before_writing(tmp_path, damage, message):
    root = chestxray14(tmp_path / "nih")
    lists = root / "train_val_list.txt", root / "test_list.txt"
    if damage == "missing image":
        next(root.rglob("00000003_000.png")).unlink()
    elif damage == "unknown in list":
        lists[1].write_text(lists[1].read_text() + "99999999_000.png\n")
    elif damage == "patient in both":
        _edit(lists[0], "00000003_001.png\n", "")
        lists[1].write_text(lists[1].read_text() + "00000003_001.png\n")
    else:
        _edit(lists[0], "00000000_000.png\n", "")
    out = tmp_path / "m.csv"
    with pytest.raises(MedxferError, match=message):
        write_collection_manifest(root, out, collection="chestxray14")
    assert not out.exists()


def test_missing_images_are_skipped_on_request_and_bad_values_refused(tmp_path, capsys):
    root = chestxray14(tmp_path / "nih")
    next(root.rglob("00000003_000.png")).unlink()
    out = tmp_path / "m.csv"
    with pytest.warns(MedxferWarning, match=r"00000003_000\.png: file not found.*; skipped"):
        write_collection_manifest(root, out, collection="chestxray14", skip_bad=True)
    assert len(pd.read_csv(out)) == 47
    release = chexpert(tmp_path / "cx")
    table = release / "train.csv"
    lines = table.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",2.0"
    table.write_text("\n".join(lines) + "\n")
    assert main(["manifest", str(release), "--collection", "chexpert", "--out", str(out)]) != 0
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"{table}:6: Effusion is '2.0', not 1, 0, -1 or blank")
    )


@pytest.mark.integration
def test_chestxray14_manifest_trains_evaluates_and_predicts(tmp_path):
    root = chestxray14(tmp_path / "nih", n=96)
    manifest = tmp_path / "nih.csv"
    assert main(["manifest", str(root), "--collection", "chestxray14", "--out", str(manifest)]) == 0
    run = tmp_path / "run"
    common = ["--image-size", "32", "--epochs", "2", "--bootstrap", "0", "--quiet"]
    assert main(["train", "--data", str(manifest), "--out", str(run), *common]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["classes"] == sorted(FINDINGS)
    predictions = pd.read_csv(run / "predictions.csv")
    test = predictions[predictions.split == "test"]
    truth = pd.read_csv(manifest, keep_default_na=False)
    truth = dict(
        zip(
            truth.path.map(lambda p: str((manifest.parent / p).resolve())),
            truth.labels,
            strict=True,
        )
    )
    assert len(test) == 32  # patients 32-47, two images each: the test list
    for label in FINDINGS:
        y = [label in truth[str(Path(f).resolve())].split("|") for f in test.file]
        per_label = metrics["test"]["per_label"][label]["roc_auc"]
        prob = test[f"probability_{label}"]
        assert per_label == pytest.approx(roc_auc_score(y, prob), abs=1e-6)
    assert main(["evaluate", str(run), "--data", str(manifest), "--quiet"]) == 0
    image = next(root.rglob("*.png"))
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 1
