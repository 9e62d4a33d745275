"""Every task through every command on real images: three-class Kermany (NORMAL / BACTERIA /
VIRUS), a multi-label set built from Kermany images, a colour set (BCCD blood-cell photos), and
the binary path's metrics recomputed independently from its predictions.csv."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medxfer.classification.run import evaluate, train
from medxfer.classification.trained import TrainedModel
from medxfer.cli import main
from medxfer.config import RunConfig
from medxfer.data.images import load_image
from medxfer.data.manifest import KERMANY_SUBTYPE_REGEX, write_manifest
from medxfer.errors import MedxferError
from medxfer.storage.folder import RunFolder
from tests.conftest import KERMANY, SHARED

pytestmark = pytest.mark.integration

SIZE = 64
QUIET = {"progress": False, "log": lambda _: None}
BCCD_JPEGS = SHARED / "data" / "bccd" / "BCCD" / "JPEGImages"


def _kermany_files(split: str, kind: str, n: int) -> list[Path]:
    """The first ``n`` Kermany files of a kind: NORMAL, bacteria or virus."""
    folder = KERMANY / split / ("NORMAL" if kind == "NORMAL" else "PNEUMONIA")
    files = sorted(folder.iterdir())
    if kind != "NORMAL":
        files = [f for f in files if f"_{kind}_" in f.name]
    return files[:n]


def _three_class_folder(dest: Path, per_split: dict[str, int]) -> Path:
    """A Kermany-layout folder (NORMAL / PNEUMONIA) holding NORMAL, bacterial and viral images."""
    for split, n in per_split.items():
        for kind in ("NORMAL", "bacteria", "virus"):
            target = dest / split / ("NORMAL" if kind == "NORMAL" else "PNEUMONIA")
            target.mkdir(parents=True, exist_ok=True)
            for f in _kermany_files(split, kind, n):
                shutil.copy(f, target / f.name)
    return dest


def _config(data: Path, out: Path, **extra) -> RunConfig:
    values = dict(image_size=SIZE, epochs=2, bootstrap=50, batch_size=16)
    return RunConfig(data=str(data), out=str(out), **{**values, **extra})


def _probability_columns(frame: pd.DataFrame, classes) -> np.ndarray:
    return frame[[f"probability_{c}" for c in classes]].to_numpy()


# -- three classes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_class(tmp_path_factory) -> tuple[Path, RunFolder]:
    """The manifest of a real three-class subset, and a transfer run trained on it."""
    root = tmp_path_factory.mktemp("kermany3")
    _three_class_folder(root / "images", {"train": 14, "test": 6})
    manifest = root / "kermany3.csv"
    counts = write_manifest(root / "images", manifest, label_from_name=KERMANY_SUBTYPE_REGEX)
    assert counts == {
        s: {"NORMAL": n, "BACTERIA": n, "VIRUS": n} for s, n in (("train", 14), ("test", 6))
    }
    run = train(_config(manifest, root / "run", val_fraction=0.25), **QUIET)
    return manifest, run


def test_three_class_run_metrics(three_class):
    _, run = three_class
    metrics = run.read_metrics()
    classes = ["BACTERIA", "NORMAL", "VIRUS"]
    assert metrics["task"] == "multiclass" and metrics["classes"] == classes
    assert metrics["thresholds"] is None and metrics["positive"] is None
    model = TrainedModel.load(run)
    assert model.network.head.linear.out_features == 3
    test = metrics["test"]
    rows = run.read_predictions("test")
    assert len(rows) == test["n"] == 18
    y = np.array([classes.index(c) for c in rows.label])
    prob = _probability_columns(rows, classes)
    np.testing.assert_allclose(prob.sum(1), 1, atol=1e-6)
    pred = prob.argmax(1)
    assert list(rows.predicted) == [classes[i] for i in pred]
    assert test["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert test["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert test["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    auc = pytest.approx
    # predictions.csv rounds nothing, but its probabilities went through text: 1e-6 is plenty
    assert test["macro_roc_auc"] == auc(roc_auc_score(y, prob, multi_class="ovr"), abs=1e-6)
    assert test["weighted_roc_auc"] == auc(
        roc_auc_score(y, prob, multi_class="ovr", average="weighted"), abs=1e-6
    )
    assert test["loss"] == auc(log_loss(y, prob, labels=[0, 1, 2]), abs=1e-6)
    assert test["confusion_matrix"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    for c, name in enumerate(classes):
        per = test["per_class"][name]
        assert per["support"] == 6
        assert per["recall"] == pytest.approx(recall_score(y == c, pred == c, zero_division=0))
        assert per["precision"] == pytest.approx(
            precision_score(y == c, pred == c, zero_division=0)
        )
    # intervals resample patients (Kermany names carry them), and bracket the estimate
    assert "patient" in test["interval_method"]["method"]
    assert test["interval_method"]["clusters"] == rows.patient.nunique() < len(rows)
    lo, hi = test["ci95"]["balanced_accuracy"]
    assert lo <= test["balanced_accuracy"] <= hi
    # the model file says what the run was
    assert model.task.name == "multiclass" and model.classes == tuple(classes)


def test_three_class_refuses_thresholds_and_positive(three_class, tmp_path, capsys):
    manifest, _ = three_class
    for extra, word in (
        (["--threshold", "youden"], "--threshold"),
        (["--positive", "VIRUS"], "--positive"),
    ):
        args = ["train", "--data", str(manifest), "--out", str(tmp_path / "r"), "--quiet"]
        code = main([*args, "--image-size", "64", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and word in err[0], err
        assert "multi-class" in err[0] or "multiclass" in err[0]
        assert not (tmp_path / "r").exists()


def test_three_class_evaluate_predict_cam_export(three_class, tmp_path):
    manifest, run = three_class
    metrics = run.read_metrics()
    again = evaluate(run, str(manifest), progress=False)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc", "loss"):
        assert again[key] == pytest.approx(metrics["test"][key], abs=1e-6), key
    assert again["confusion_matrix"] == metrics["test"]["confusion_matrix"]

    stored = run.read_predictions("test")
    files = [Path(f) for f in stored.file[:6]]
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run.path), *map(str, files), "--out", str(out), "--quiet"]) == 0
    rows = pd.read_csv(out)
    classes = list(metrics["classes"])
    prob = _probability_columns(rows, classes)
    np.testing.assert_allclose(prob.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(prob, _probability_columns(stored[:6], classes), atol=1e-5)
    assert list(rows.predicted) == [classes[i] for i in prob.argmax(1)]

    # Grad-CAM of the predicted class by default, of VIRUS on request: on an image predicted
    # otherwise (when there is one) the two maps differ
    others = stored[stored.predicted != "VIRUS"]
    image = Path((others if len(others) else stored).file.iloc[0])
    cams, virus = tmp_path / "cams", tmp_path / "cams_virus"
    assert main(["predict", str(run.path), str(image), "--cam", str(cams), "--quiet"]) == 0
    args = ["predict", str(run.path), str(image), "--cam", str(virus), "--cam-class", "VIRUS"]
    assert main([*args, "--quiet"]) == 0
    predicted, explained = (
        np.asarray(Image.open(d / f"{image.stem}_cam.png")) for d in (cams, virus)
    )
    assert predicted.shape == explained.shape == (SIZE, SIZE, 3)
    assert np.array_equal(predicted, explained) == (not len(others))
    assert main([*args[:-1], "X", "--quiet"]) == 2
    # a threshold means nothing to a multi-class model: refused, not ignored
    assert main(["predict", str(run.path), str(image), "--threshold", "0.3", "--quiet"]) == 2
    with pytest.raises(MedxferError, match="multi-class model"):
        evaluate(run.path, str(manifest), threshold=0.3, progress=False)

    _check_onnx(run, files, tmp_path / "model.onnx", (len(files), 3))


def _check_onnx(run: RunFolder, files: list[Path], out: Path, shape: tuple[int, ...]) -> dict:
    """Export, run in onnxruntime, compare with PyTorch's probabilities; return the metadata."""
    import onnxruntime as ort

    assert main(["export", str(run.path), "--format", "onnx", "--out", str(out)]) == 0
    model = TrainedModel.load(run)
    pixels = np.stack([load_image(f, model.resolution, model.color) for f in files])
    image = (pixels[:, None] if pixels.ndim == 3 else pixels).astype(np.float32) / 255
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    onnx_prob = session.run(None, {"image": image})[0]
    assert onnx_prob.shape == shape
    np.testing.assert_allclose(onnx_prob, model.probabilities(torch.from_numpy(pixels)), atol=1e-4)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["input"]["shape"] == ["batch", model.channels, SIZE, SIZE]
    assert meta["classes"] == list(model.classes) and meta["task"] == model.task.name
    return meta


# -- multi-label ---------------------------------------------------------------------------
ML_LABELS = {"NORMAL": [0, 0], "bacteria": [1, 1], "virus": [1, 0]}  # pneumonia, bacterial


def _multilabel_npz(path: Path) -> Path:
    """ChestMNIST-like arrays from real Kermany images: labels (N, 2) = pneumonia, bacterial.
    Validation images come from train files after those used for training."""
    arrays = {}
    for split, source, start, n in (
        ("train", "train", 0, 12),
        ("val", "train", 12, 6),
        ("test", "test", 0, 6),
    ):
        images, labels = [], []
        for kind, label in ML_LABELS.items():
            for f in _kermany_files(source, kind, start + n)[start:]:
                gray = Image.open(f).convert("L").resize((SIZE, SIZE), Image.BILINEAR)
                images.append(np.asarray(gray))
                labels.append(label)
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory) -> tuple[Path, RunFolder]:
    root = tmp_path_factory.mktemp("multilabel")
    data = _multilabel_npz(root / "chest.npz")
    run = train(_config(data, root / "run", val_fraction=0, threshold="youden"), **QUIET)
    return data, run


def _label_matrix(names: pd.Series, labels: list[str]) -> np.ndarray:
    sets = [set(s.split("|")) if isinstance(s, str) else set() for s in names]
    return np.array([[name in s for name in labels] for s in sets], dtype=int)


def _youden_j(y: np.ndarray, prob: np.ndarray, cut: float) -> float:
    pred = prob >= cut
    return pred[y == 1].mean() - pred[y == 0].mean()


def test_multilabel_run_thresholds_and_metrics(multilabel):
    _, run = multilabel
    metrics = run.read_metrics()
    labels = ["0", "1"]
    assert metrics["task"] == "multilabel" and metrics["classes"] == labels
    thresholds = metrics["thresholds"]
    assert len(thresholds) == 2 and metrics["threshold_rule"] == "youden"
    model = TrainedModel.load(run)
    assert model.thresholds == thresholds and model.network.head.linear.out_features == 2
    # each label's threshold is a Youden-optimal cut of that label's validation probabilities
    val = run.read_predictions("val")
    y_val, p_val = _label_matrix(val.label, labels), _probability_columns(val, labels)
    for j, cut in enumerate(thresholds):
        best = max(_youden_j(y_val[:, j], p_val[:, j], c) for c in np.unique(p_val[:, j]))
        assert _youden_j(y_val[:, j], p_val[:, j], cut) == pytest.approx(best)
        assert np.isclose(p_val[:, j], cut, atol=1e-9).any()
    # per-label and macro metrics against scikit-learn on the stored test predictions
    rows = run.read_predictions("test")
    y, prob = _label_matrix(rows.label, labels), _probability_columns(rows, labels)
    assert y.tolist() == [v for v in ML_LABELS.values() for _ in range(6)]
    decided = (prob >= np.asarray(thresholds)).astype(int)
    assert _label_matrix(rows.predicted, labels).tolist() == decided.tolist()
    test = metrics["test"]
    for j, name in enumerate(labels):
        per = test["per_label"][name]
        assert per["roc_auc"] == pytest.approx(roc_auc_score(y[:, j], prob[:, j]), abs=1e-6)
        ap = average_precision_score(y[:, j], prob[:, j])
        assert per["average_precision"] == pytest.approx(ap, abs=1e-6)
        assert per["f1"] == pytest.approx(f1_score(y[:, j], decided[:, j]))
        assert per["threshold"] == thresholds[j]
    assert test["macro_roc_auc"] == pytest.approx(roc_auc_score(y, prob, average="macro"), abs=1e-6)
    ap = average_precision_score(y, prob, average="macro")
    assert test["macro_average_precision"] == pytest.approx(ap, abs=1e-6)
    assert test["macro_f1"] == pytest.approx(f1_score(y, decided, average="macro"))
    # no patients in an .npz: intervals resample images
    assert test["interval_method"]["method"] == "image bootstrap"


def test_multilabel_evaluate_predict_export(multilabel, tmp_path):
    data, run = multilabel
    metrics = run.read_metrics()
    again = evaluate(run.path, str(data), progress=False)
    for key in ("macro_roc_auc", "macro_average_precision", "macro_f1", "loss"):
        assert again[key] == pytest.approx(metrics["test"][key], abs=1e-6), key

    files = [f for kind in ML_LABELS for f in _kermany_files("test", kind, 2)]
    out = tmp_path / "pred.json"
    assert main(["predict", str(run.path), *map(str, files), "--out", str(out), "--quiet"]) == 0
    rows = pd.DataFrame(json.loads(out.read_text()))
    model = TrainedModel.load(run)
    pixels = torch.from_numpy(np.stack([load_image(f, SIZE, "gray") for f in files]))
    prob = _probability_columns(rows, ["0", "1"])
    np.testing.assert_allclose(prob, model.probabilities(pixels), atol=1e-6)
    decided = prob >= np.asarray(metrics["thresholds"])
    assert list(rows.predicted) == [
        "|".join(n for n, on in zip("01", d, strict=True) if on) for d in decided
    ]

    _check_onnx(run, files, tmp_path / "model.onnx", (len(files), 2))


# -- colour ----------------------------------------------------------------------------------
def test_colour_images_stay_colour_through_every_command(tmp_path):
    """BCCD blood-smear photos under two made-up classes: colour is detected, the network
    takes three channels, and predict and export keep them."""
    photos = sorted(BCCD_JPEGS.iterdir())[:32]
    rows = ["path,label,split"]
    for i, f in enumerate(photos):
        rows.append(f"{f},{'AB'[i % 2]},{'test' if i >= 24 else 'train'}")
    manifest = tmp_path / "cells.csv"
    manifest.write_text("\n".join(rows) + "\n")
    run = train(
        _config(manifest, tmp_path / "run", epochs=1, bootstrap=0, val_fraction=0.25), **QUIET
    )
    assert run.read_resolved()["color"] == "rgb" and run.read_config().color == "auto"
    model = TrainedModel.load(run)
    assert model.color == "rgb" and model.channels == 3
    pixels = torch.from_numpy(np.stack([load_image(f, SIZE, "rgb") for f in photos[24:28]]))
    assert pixels.shape == (4, 3, SIZE, SIZE)
    # colour reaches the network: the stored probabilities are those of the rgb pixels, and
    # the same photos in gray give other ones
    stored = run.read_predictions("test").set_index("file").probability
    np.testing.assert_allclose(
        model.probabilities(pixels), stored[[str(f) for f in photos[24:28]]], atol=1e-5
    )
    gray = pixels.float().mean(1, keepdim=True).round().to(torch.uint8).expand(-1, 3, -1, -1)
    assert not np.allclose(model.probabilities(gray), model.probabilities(pixels), atol=1e-4)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run.path), str(photos[30]), "--out", str(out), "--quiet"]) == 0
    row = pd.read_csv(out).iloc[0]
    assert row.probability == pytest.approx(stored[str(photos[30])], abs=1e-5)
    meta = _check_onnx(run, photos[24:28], tmp_path / "model.onnx", (4,))
    assert meta["input"]["shape"] == ["batch", 3, SIZE, SIZE] and meta["color"] == "rgb"


# -- binary --------------------------------------------------------------------------------
def test_binary_metrics_equal_sklearn_on_predictions(small_kermany, tmp_path):
    run = train(
        _config(small_kermany, tmp_path / "run", epochs=1, bootstrap=0, threshold="youden"),
        **QUIET,
    )
    metrics = run.read_metrics()
    test, cut = metrics["test"], metrics["threshold"]
    assert metrics["thresholds"] == [cut] and TrainedModel.load(run).thresholds == [cut]
    rows = run.read_predictions("test")
    y = (rows.label == "PNEUMONIA").to_numpy(int)
    prob = rows.probability.to_numpy()
    pred = (prob >= cut).astype(int)
    assert list(rows.predicted) == [("NORMAL", "PNEUMONIA")[p] for p in pred]
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert test["confusion_matrix"] == [[tn, fp], [fn, tp]]
    expected = {
        "accuracy": accuracy_score(y, pred),
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred),
        "specificity": recall_score(1 - y, 1 - pred),
        "f1": f1_score(y, pred),
        "gmean": np.sqrt(recall_score(y, pred) * recall_score(1 - y, 1 - pred)),
        "roc_auc": roc_auc_score(y, prob),
        "average_precision": average_precision_score(y, prob),
        "loss": log_loss(y, prob),
    }
    for key, value in expected.items():
        assert test[key] == pytest.approx(value, abs=1e-6), key
