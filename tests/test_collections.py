"""ChestX-ray14- and CheXpert-shaped tables, built here from real Kermany pixels with derived
labels: the manifest they give, their bad input, and a multi-label run end to end."""

from __future__ import annotations

import csv
import gzip
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
        effusion = ("-1.0", "", "0.0", "1.0", "0.0")[i % 5]  # uncertain, blank, known
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


def mimic(root: Path, n: int = 48) -> Path:
    """The three MIMIC-CXR-JPG tables (gzipped, as released) and files/pNN/pSUBJECT/sSTUDY/
    DICOM.jpg; one study per subject with two images (the second a lateral every fourth
    study), CheXpert's 1/0/-1/blank values, the official split train / validate / test."""
    labels, splits, metadata = [], [], []
    for i, (source, pneumonia) in enumerate(_kermany(n)):
        subject, study, dicom = 10000000 + i // 2, 50000000 + i // 2, f"d{i:04d}"
        split = ("train", "train", "validate", "test")[(i // 2) % 4]
        file = (
            root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        )
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("L").save(file)
        lateral = i % 2 == 1 and (i // 2) % 4 == 1
        splits.append([dicom, study, subject, split])
        metadata.append([dicom, subject, study, "LATERAL" if lateral else "PA"])
        if i % 2 == 0:  # the study's labels: Effusion uncertain, blank or negative in turn
            effusion = ("-1.0", "", "0.0")[(i // 2) % 3]
            labels.append([subject, study, "1.0" if pneumonia else "0.0", effusion])
    for name, header, table in (
        ("chexpert", ["subject_id", "study_id", *FINDINGS], labels),
        ("split", ["dicom_id", "study_id", "subject_id", "split"], splits),
        ("metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition"], metadata),
    ):
        with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(table)
    return root


def _unknown(path: Path) -> dict[str, str]:
    table = pd.read_csv(path, keep_default_na=False, dtype=str)
    return dict(zip(table.path.map(lambda p: Path(p).name), table.get("unknown", ""), strict=True))


def test_chexpert_u_ignore_and_missing_ignore_write_unknown_entries(tmp_path):
    release = chexpert(tmp_path / "cx")
    source = pd.concat(
        [
            pd.read_csv(release / f"{s}.csv", dtype=str, keep_default_na=False)
            for s in ("train", "valid")
        ]
    )
    value = dict(zip(source.Path, source.Effusion, strict=True))
    for uncertain, missing, unknown_values in (
        ("ignore", "negative", {"-1.0"}),
        ("zeros", "ignore", {""}),
        ("ignore", "ignore", {"-1.0", ""}),
    ):
        out = tmp_path / f"{uncertain}-{missing}.csv"
        write_collection_manifest(
            release, out, collection="chexpert", uncertain=uncertain, missing=missing
        )
        table = pd.read_csv(out, keep_default_na=False, dtype=str)
        assert list(table.columns) == ["path", "labels", "split", "patient", "unknown"]
        for row in table.itertuples():
            entry = value[row.path.split("cx/", 1)[-1]]
            assert (row.unknown == "Effusion") == (entry in unknown_values)
            assert ("Effusion" in row.labels.split("|")) == (entry == "1.0")
    plain = tmp_path / "plain.csv"
    write_collection_manifest(release, plain, collection="chexpert")
    assert "unknown" not in pd.read_csv(plain).columns  # nothing unknown: the old four columns


def test_mimic_tables_give_splits_subjects_views_and_unknowns(tmp_path):
    root = mimic(tmp_path / "mimic")
    out = tmp_path / "m.csv"
    write_collection_manifest(root, out, collection="mimic-cxr", uncertain="ignore")
    table = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert len(table) == 48
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz", dtype=str).set_index("dicom_id")
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str, keep_default_na=False)
    labels = labels.set_index("study_id")
    official = {"train": "train", "validate": "val", "test": "test"}
    for row in table.itertuples():
        entry = split.loc[Path(row.path).stem]
        assert row.split == official[entry.split] and row.patient == entry.subject_id
        effusion = labels.loc[entry.study_id, "Effusion"]
        assert (row.unknown == "Effusion") == (effusion == "-1.0")
        pneumonia = labels.loc[entry.study_id, "Pneumonia"] == "1.0"
        assert ("Pneumonia" in row.labels.split("|")) == pneumonia
    write_collection_manifest(root, out, collection="mimic-cxr", view="frontal")
    assert len(pd.read_csv(out)) == 48 - 6  # the lateral of every fourth study


def _edit_gz(path: Path, edit) -> None:
    """Rewrite a gzipped table's lines through ``edit``."""
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("study without labels", r"split\.csv\.gz:2: study 50000000 is not in mimic-cxr-2\.0\.0-"),
        ("bad split", r"split\.csv\.gz:\d+: split 'holdout', not one of"),
        ("missing image", r"d0003\.jpg: file not found \(listed in .*split\.csv\.gz:5\)"),
        ("not gzip", r"chexpert\.csv\.gz: cannot be read as a CSV table"),
        ("cut gzip", r"split\.csv\.gz: cannot be read as a CSV table"),
        ("second label row", r"chexpert\.csv\.gz:\d+: study 50000000 has a second row"),
        ("other subject", r"split\.csv\.gz:2: study 50000000 is subject 10000000 here but 9"),
        ("both tables", r"both mimic-cxr-2\.0\.0-split\.csv and mimic-cxr-2\.0\.0-split\.csv\.gz"),
        ("no view", r"split\.csv\.gz:2: image d0000 has no ViewPosition"),
    ],
)
def test_mimic_bad_input_stops_before_writing(tmp_path, damage, message):
    root = mimic(tmp_path / "mimic")
    table, splits = root / "mimic-cxr-2.0.0-chexpert.csv.gz", root / "mimic-cxr-2.0.0-split.csv.gz"
    if damage == "study without labels":
        _edit_gz(table, lambda lines: lines[:1] + lines[2:])
    elif damage == "bad split":
        _edit_gz(splits, lambda lines: [x.replace(",validate", ",holdout") for x in lines])
    elif damage == "missing image":
        next(root.rglob("d0003.jpg")).unlink()
    elif damage == "not gzip":
        table.write_bytes(b"not a gzip file")
    elif damage == "cut gzip":
        splits.write_bytes(splits.read_bytes()[:60])
    elif damage == "second label row":
        _edit_gz(table, lambda lines: lines[:2] + lines[1:])
    elif damage == "other subject":
        _edit_gz(table, lambda lines: [lines[0], "9" + lines[1][1:], *lines[2:]])
    elif damage == "both tables":
        with gzip.open(splits, "rt") as fh:
            (root / "mimic-cxr-2.0.0-split.csv").write_text(fh.read())
    else:
        _edit_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", lambda lines: lines[:1] + lines[2:])
    out = tmp_path / "m.csv"
    view = "frontal" if damage == "no view" else "all"
    with pytest.raises(MedxferError, match=message):
        write_collection_manifest(root, out, collection="mimic-cxr", view=view)
    assert not out.exists()


@pytest.mark.integration
def test_u_ignore_run_masks_unknown_entries_end_to_end(tmp_path):
    """A CheXpert-shaped table under U-Ignore trains and evaluates; each label's test AUC is
    scikit-learn's on the entries the table knows, and predictions.csv says which were not."""
    release = chexpert(tmp_path / "cx", n=96)
    manifest = tmp_path / "cx.csv"
    args = ["manifest", str(release), "--collection", "chexpert", "--out", str(manifest)]
    assert main([*args, "--uncertain", "ignore", "--missing", "ignore"]) == 0
    run = tmp_path / "run"
    common = ["--image-size", "32", "--epochs", "2", "--bootstrap", "20", "--quiet"]
    assert main(["train", "--data", str(manifest), "--out", str(run), *common]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    test = pd.read_csv(run / "predictions.csv", keep_default_na=False, dtype=str)
    test = test[test.split == "test"]
    source = pd.read_csv(release / "valid.csv", dtype=str, keep_default_na=False)
    value = {
        Path(p).parts[-3] + "/" + Path(p).parts[-2]: e
        for p, e in zip(source.Path, source.Effusion, strict=True)
    }
    entries = [value["/".join(Path(f).parts[-3:-1])] for f in test.file]
    known = [e in ("1.0", "0.0") for e in entries]
    assert 0 < sum(known) < len(test)
    y = [e == "1.0" for e, k in zip(entries, known, strict=True) if k]
    prob = test.probability_Effusion.astype(float)[known]
    per_label = metrics["test"]["per_label"]["Effusion"]
    assert per_label["roc_auc"] == pytest.approx(roc_auc_score(y, prob), abs=1e-6)
    assert per_label["support"] == sum(y)
    assert list(test.unknown == "Effusion") == [not k for k in known]
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["unknown_label_entries"]["Effusion"] > 0
    policy = config["resolved"]["labelling"]
    assert (policy["collection"], policy["uncertain"], policy["missing"]) == (
        "chexpert",
        "ignore",
        "ignore",
    )
    card = (run / "model_card.md").read_text()
    assert "U-Ignore" in card and "unknown label entries" in card
    assert main(["evaluate", str(run), "--data", str(manifest), "--quiet"]) == 0


@pytest.mark.integration
@pytest.mark.parametrize("shape", ["chestxray14", "chexpert"])
def test_two_cell_study_on_a_collection_table(tmp_path, shape):
    """transfer against scratch on the same collection test set, paired by image."""
    build = {"chestxray14": chestxray14, "chexpert": chexpert}[shape]
    root = build(tmp_path / shape, n=64)
    manifest = tmp_path / f"{shape}.csv"
    args = ["manifest", str(root), "--collection", shape, "--out", str(manifest)]
    assert main([*args, "--uncertain", "ignore"] if shape == "chexpert" else args) == 0
    spec = tmp_path / "study.toml"
    spec.write_text(
        f'[study]\nname = "t"\nskip_unavailable_weights = true\n\n[base]\ndata = "{manifest}"\n'
        "image_size = 32\nepochs = 1\nbootstrap = 20\n\n[grid]\n"
        'arch = ["mobilenet_v2"]\nmode = ["scratch", "transfer"]\nseed = [0]\n'
    )
    out = tmp_path / "study"
    assert main(["study", "run", str(spec), "--out", str(out)]) == 0
    comparisons = pd.read_csv(out / "comparisons.csv")
    auc = comparisons[comparisons.metric == "macro_roc_auc"]
    assert len(auc) == 1 and auc["diff"].notna().all() and auc["p_value"].notna().all()
    runs = {
        m: json.loads(next((out / "runs").glob(f"*{m}*/metrics.json")).read_text())
        for m in ("scratch", "transfer")
    }
    expected = runs["transfer"]["test"]["macro_roc_auc"] - runs["scratch"]["test"]["macro_roc_auc"]
    assert float(auc["diff"].iloc[0]) == pytest.approx(expected, abs=1e-9)
