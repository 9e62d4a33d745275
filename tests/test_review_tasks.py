"""Studies, comparisons and the report beyond binary: a two-cell study (scratch vs transfer) on a
real three-class Kermany manifest and on a real-image multi-label .npz, each checked against
scikit-learn / scipy on the runs' own predictions.csv; and the stored predictions read back
with their labels intact when the class names are numbers (MedMNIST .npz)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from medxfer.classification.trained import TrainedModel
from medxfer.cli import main
from medxfer.config import RunConfig
from medxfer.data.images import load_image
from medxfer.data.manifest import KERMANY_SUBTYPE_REGEX, write_manifest
from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import HEADLINE
from medxfer.inference.cam import overlay
from medxfer.models.factory import ModelSpec, create_model
from medxfer.storage.folder import RunFolder
from medxfer.tasks import make_task
from tests.conftest import KERMANY

pytestmark = pytest.mark.integration

SIZE = 32


def _kermany_files(split: str, kind: str, n: int, start: int = 0) -> list[Path]:
    folder = KERMANY / split / ("NORMAL" if kind == "NORMAL" else "PNEUMONIA")
    files = sorted(folder.iterdir())
    if kind != "NORMAL":
        files = [f for f in files if f"_{kind}_" in f.name]
    return files[start : start + n]


def _study(root: Path, data: Path, extra: str = "") -> Path:
    """A two-cell study file: scratch vs transfer, one seed, tiny and fast."""
    toml = root / "s.toml"
    toml.write_text(
        f"""
[study]
name = "tasks"

[base]
data = "{data}"
arch = "mobilenet_v2"
epochs = 1
image_size = {SIZE}
batch_size = 16
bootstrap = 50
lr = 1e-3
{extra}

[grid]
mode = ["scratch", "transfer"]
"""
    )
    return toml


def _run_study(root: Path, data: Path, extra: str = "") -> Path:
    out = root / "study"
    assert main(["study", "run", str(_study(root, data, extra)), "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    return out


def _test_rows(run: Path) -> pd.DataFrame:
    frame = pd.read_csv(run / "predictions.csv", dtype={"label": str}, keep_default_na=False)
    return frame[frame.split == "test"].reset_index(drop=True)


# -- three classes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multiclass_study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mc_study")
    for split, n in (("train", 8), ("test", 5)):
        for kind in ("NORMAL", "bacteria", "virus"):
            target = root / "images" / split / ("NORMAL" if kind == "NORMAL" else "PNEUMONIA")
            target.mkdir(parents=True, exist_ok=True)
            for f in _kermany_files(split, kind, n):
                shutil.copy(f, target / f.name)
    manifest = root / "kermany3.csv"
    write_manifest(root / "images", manifest, label_from_name=KERMANY_SUBTYPE_REGEX)
    return _run_study(root, manifest, "val_fraction = 0.25")


def test_multiclass_study_comparisons_match_sklearn(multiclass_study):
    table = pd.read_csv(multiclass_study / "comparisons.csv")
    assert set(table.metric) == set(HEADLINE["multiclass"]) and len(table) == 4
    assert (table.task == "multiclass").all() and table.note.isna().all()
    assert set(zip(table.option, table.a, table.b, strict=True)) == {
        ("mode", "scratch", "transfer")
    }
    classes = ["BACTERIA", "NORMAL", "VIRUS"]
    a, b = (_test_rows(multiclass_study / "runs" / m) for m in ("scratch", "transfer"))
    b = b.set_index("file").loc[a.file].reset_index()
    y = np.array([classes.index(c) for c in a.label])
    probs = [f[[f"probability_{c}" for c in classes]].to_numpy() for f in (a, b)]
    expected = {
        "accuracy": [accuracy_score(y, p.argmax(1)) for p in probs],
        "balanced_accuracy": [balanced_accuracy_score(y, p.argmax(1)) for p in probs],
        "macro_f1": [f1_score(y, p.argmax(1), average="macro") for p in probs],
        "macro_roc_auc": [roc_auc_score(y, p, multi_class="ovr") for p in probs],
    }
    rows = table.set_index("metric")
    for metric, (va, vb) in expected.items():
        assert rows.loc[metric, "value_a"] == pytest.approx(va, abs=1e-6), metric
        assert rows.loc[metric, "value_b"] == pytest.approx(vb, abs=1e-6), metric
        assert rows.loc[metric, "diff"] == pytest.approx(vb - va, abs=1e-6), metric
    correct_a, correct_b = probs[0].argmax(1) == y, probs[1].argmax(1) == y
    only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    assert rows.loc["accuracy", "test"] == "exact McNemar"
    assert rows.loc["accuracy", "p_value"] == pytest.approx(p)
    auc = rows.loc["macro_roc_auc"]
    assert auc.primary and auc.test == "paired bootstrap" and 0 <= auc.p_value <= 1
    assert auc.p_adjusted == auc.p_value


def test_multiclass_study_tables_and_report(multiclass_study):
    summary = pd.read_csv(multiclass_study / "summary.csv").set_index("mode")
    results = pd.read_csv(multiclass_study / "results.csv").set_index("mode")
    for metric in HEADLINE["multiclass"]:
        for mode in ("scratch", "transfer"):
            stored = RunFolder(multiclass_study / "runs" / mode).read_metrics()["test"][metric]
            assert summary.loc[mode, f"{metric}_mean"] == pytest.approx(stored)
            assert results.loc[mode, metric] == pytest.approx(stored)
    report = (multiclass_study / "report.md").read_text()
    header = "| " + " | ".join(HEADLINE["multiclass"])
    assert header in report, report
    assert "macro_roc_auc (primary)" in report
    transfer = summary.loc["transfer"]
    assert f"{transfer.macro_f1_mean:.3f}" in report
    assert "data:image/png;base64," in (multiclass_study / "report.html").read_text()


# -- multi-label ---------------------------------------------------------------------------
ML_LABELS = {"NORMAL": [0, 0], "bacteria": [1, 1], "virus": [1, 0]}  # pneumonia, bacterial


def _multilabel_npz(path: Path, labels: dict[str, list[int]]) -> Path:
    arrays = {}
    for split, source, start, n in (("train", "train", 0, 8), ("test", "test", 0, 5)):
        images, rows = [], []
        for kind, label in labels.items():
            for f in _kermany_files(source, kind, n, start):
                gray = Image.open(f).convert("L").resize((SIZE, SIZE), Image.BILINEAR)
                images.append(np.asarray(gray))
                rows.append(label)
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = np.array(rows, dtype=np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def multilabel_study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ml_study")
    data = _multilabel_npz(root / "chest.npz", ML_LABELS)
    return _run_study(root, data, 'val_fraction = 0.25\nthreshold = "youden"')


def test_multilabel_study_comparisons_match_sklearn(multilabel_study):
    table = pd.read_csv(multilabel_study / "comparisons.csv")
    assert set(table.metric) == set(HEADLINE["multilabel"]) and len(table) == 3
    assert (table.task == "multilabel").all() and table.note.isna().all()
    labels = ["0", "1"]
    a, b = (_test_rows(multilabel_study / "runs" / m) for m in ("scratch", "transfer"))
    b = b.set_index("file").loc[a.file].reset_index()
    y = np.array([[n in s.split("|") for n in labels] for s in a.label], dtype=int)
    cuts = [
        np.asarray(RunFolder(multilabel_study / "runs" / m).read_metrics()["thresholds"])
        for m in ("scratch", "transfer")
    ]
    probs = [f[[f"probability_{c}" for c in labels]].to_numpy() for f in (a, b)]
    expected = {
        "macro_roc_auc": [roc_auc_score(y, p, average="macro") for p in probs],
        "macro_average_precision": [average_precision_score(y, p) for p in probs],
        "macro_f1": [
            f1_score(y, p >= c, average="macro") for p, c in zip(probs, cuts, strict=True)
        ],
    }
    rows = table.set_index("metric")
    for metric, (va, vb) in expected.items():
        assert rows.loc[metric, "value_a"] == pytest.approx(va, abs=1e-6), metric
        assert rows.loc[metric, "value_b"] == pytest.approx(vb, abs=1e-6), metric
    assert rows.loc["macro_roc_auc", "primary"]
    report = (multilabel_study / "report.md").read_text()
    assert "| " + " | ".join(HEADLINE["multilabel"]) in report, report


# -- numeric class names survive predictions.csv -------------------------------------------
def test_single_label_per_image_multilabel_reads_back_its_labels(tmp_path):
    """A MedMNIST-like .npz whose images carry at most one label each: the stored labels are
    "0", "1" or empty, which a plain read_csv turns into floats 0.0 / 1.0 / NaN."""
    one_each = {"NORMAL": [0, 0], "bacteria": [1, 0], "virus": [0, 1]}
    data = _multilabel_npz(tmp_path / "one.npz", one_each)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--quiet", "--epochs", "1"]
    more = ["--image-size", str(SIZE), "--bootstrap", "0", "--val-fraction", "0.25"]
    assert main([*args, *more]) == 0
    rows = RunFolder(out).read_predictions("test")
    expected = [s for s in ("", "0", "1") for _ in range(5)]
    assert [("" if pd.isna(v) else v) for v in rows.label] == expected
    assert all(isinstance(v, str) for v in rows.label), rows.label.tolist()
    assert all(isinstance(v, str) for v in rows.predicted), rows.predicted.tolist()


def test_predictions_keep_class_names_that_look_like_numbers_or_missing(tmp_path):
    """Class names are text: "01", "NA", "1.0" and an empty label set come back as written."""
    folder = RunFolder(tmp_path)
    written = pd.DataFrame(
        {
            "split": ["test"] * 4,
            "file": ["a.png", "b.png", "c.png", "d.png"],
            "patient": ["001", "002", "NA", "file:d.png"],
            "label": ["01", "NA", "1.0", ""],
            "probability_01": [0.1, 0.2, np.nan, 0.4],
            "predicted": ["01", "", "NA", "1.0"],
        }
    )
    folder.write_predictions(written)
    back = folder.read_predictions("test")
    for column in ("patient", "label", "predicted"):
        assert back[column].tolist() == written[column].tolist(), column
    assert back.probability_01.dtype == np.float64 and np.isnan(back.probability_01[2])


# -- bad input through the CLI: one line, nothing written ------------------------------------
def _rows(header: str, body: list[str]) -> str:
    return "\n".join([header, *body]) + "\n"


def _three_class_lines(column: str = "label") -> tuple[str, list[str]]:
    lines = []
    for split, n in (("train", 2), ("test", 2)):
        for kind, name in (("NORMAL", "NORMAL"), ("bacteria", "BACTERIA"), ("virus", "VIRUS")):
            lines += [f"{f},{name},{split}" for f in _kermany_files(split, kind, n)]
    return f"path,{column},split", lines


def test_bad_input_stops_in_one_line_before_writing(tmp_path, capsys):
    header, lines = _three_class_lines()
    first = lines[0].split(",")[0]
    no_train_virus = [x for x in lines if not (x.endswith(",VIRUS,train"))]
    images = np.zeros((6, 8, 8), dtype=np.uint8)
    np.savez(
        tmp_path / "bad.npz",
        train_images=images,
        train_labels=np.full((6, 2), 2),
        test_images=images,
        test_labels=np.full((6, 2), 2),
    )
    never = np.array([[1, 0], [0, 0], [1, 0], [0, 0], [1, 0], [0, 0]], dtype=np.uint8)
    np.savez(
        tmp_path / "never.npz",
        train_images=images,
        train_labels=never,
        test_images=images,
        test_labels=np.array([[1, 1], [0, 0], [1, 0], [0, 1], [1, 0], [0, 0]], dtype=np.uint8),
    )
    ml_header, _ = _three_class_lines("labels")
    cases = {
        "nolabel.csv": (
            "path,split\n" + "".join(f"{x.split(',')[0]},train\n" for x in lines),
            [],
            "one of label / labels",
        ),
        "empty.csv": (_rows(header, [*lines, f"{first},,train"]), [], "empty label"),
        "notrain.csv": (_rows(header, no_train_virus), [], "'VIRUS' is in the test split"),
        "valonly.csv": (_rows(header, [*lines, f"{first},EDEMA,val"]), [], "'EDEMA' is in the val"),
        "mltest.csv": (
            _rows(ml_header, [*lines, f"{first},EDEMA|NORMAL,test"]),
            [],
            "'EDEMA' is in the test",
        ),
        "bad.npz": (None, [], "fits no task"),
        "never.npz": (None, [], "'1' is in the test split"),
        "positive.csv": (_rows(header, lines), ["--positive", "VIRUS"], "only a binary task"),
    }
    for name, (text, extra, message) in cases.items():
        data = tmp_path / name
        if text is not None:
            data.write_text(text)
        out = tmp_path / f"run-{name}"
        code = main(["train", "--data", str(data), "--out", str(out), "--quiet", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (name, err)
        assert name in err[0] or "--positive" in err[0], (name, err)
        assert not out.exists(), name


# -- Grad-CAM of the negative class of a binary model ---------------------------------------
class _Negated(torch.nn.Module):
    """The binary network with its one logit negated: its output 0 is the negative class."""

    def __init__(self, network) -> None:
        super().__init__()
        self.backbone, self.network = network.backbone, network

    def forward(self, image):
        return -self.network(image)


def test_binary_cam_class_negative_explains_the_negative_logit():
    """``--cam-class NORMAL`` on a binary model: the map of NORMAL (the negated logit), not
    silently the positive class's map."""
    from medxfer.inference.cam import grad_cam, overlays

    torch.manual_seed(0)
    network = create_model(ModelSpec("mobilenet_v2", "transfer")).eval()  # ImageNet backbone
    cfg = RunConfig(data="d", out="o", image_size=64)
    model = TrainedModel(network, cfg, make_task("binary", ["NORMAL", "PNEUMONIA"]))
    pixels = torch.from_numpy(
        np.stack([load_image(f, 64, "gray") for f in _kermany_files("test", "NORMAL", 2)])
    )
    image = pixels.float().div(255).unsqueeze(1)
    positive, negative = grad_cam(network, image), grad_cam(_Negated(network), image)
    assert not np.allclose(positive, negative)
    expected = [overlay(p, h) for p, h in zip(pixels.numpy(), negative, strict=True)]
    for got, want in zip(overlays(model, pixels, "NORMAL"), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, pix, h in zip(
        overlays(model, pixels, "PNEUMONIA"), pixels.numpy(), positive, strict=True
    ):
        np.testing.assert_array_equal(got, overlay(pix, h))


# -- class weights ---------------------------------------------------------------------------
def test_class_weights_and_weighted_losses_match_sklearn_balanced():
    """multiclass: N / (K N_c) = scikit-learn's "balanced" weights, in torch's weighted CE;
    multilabel: per label, N / (2 N_c) for its positives and its negatives."""
    from sklearn.utils.class_weight import compute_class_weight

    rng = np.random.default_rng(1)
    y = rng.choice(4, size=60, p=[0.55, 0.25, 0.15, 0.05])
    multi = make_task("multiclass", ["a", "b", "c", "d"])
    weights = multi.class_weights(torch.from_numpy(y)).numpy()
    balanced = compute_class_weight("balanced", classes=np.arange(4), y=y)
    np.testing.assert_allclose(weights, balanced, rtol=1e-6)
    z = rng.normal(0, 2, (60, 4))
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    w = balanced[y]
    expected = -(w * log_p[np.arange(60), y]).sum() / w.sum()
    got = multi.loss(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(weights))
    assert float(got) == pytest.approx(expected, rel=1e-5)

    targets = (rng.random((50, 3)) < [0.5, 0.2, 0.08]).astype(np.float32)
    ml = make_task("multilabel", ["x", "y", "z"])
    per_label = ml.class_weights(torch.from_numpy(targets)).numpy()  # (2, L): negative, positive
    for j in range(3):
        ref = compute_class_weight("balanced", classes=np.array([0, 1]), y=targets[:, j])
        np.testing.assert_allclose(per_label[:, j], ref, rtol=1e-6)
    logits = rng.normal(0, 2, (50, 3))
    p = 1 / (1 + np.exp(-logits))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    picked = np.where(targets > 0.5, per_label[1][None, :], per_label[0][None, :])
    got = ml.loss(torch.from_numpy(logits), torch.from_numpy(targets), torch.from_numpy(per_label))
    assert float(got) == pytest.approx((bce * picked).mean(), rel=1e-5)


# -- options refused when the config is built ------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"patient_regex": "(unclosed"}, "--patient-regex"),
        ({"limit_per_class": 0}, "--limit-per-class"),
        ({"weight_decay": -1.0}, "--weight-decay"),
        ({"momentum": 1.5}, "--momentum"),
        ({"seed": -1}, "--seed"),
        ({"amp": "no"}, "--amp"),
        ({"skip_bad": "yes"}, "--skip-bad"),
        ({"feature_cache": "x"}, "--feature-cache"),
    ],
)
def test_run_options_are_refused_when_built(options, message):
    """A study file is checked cell by cell when loaded; a value no run could use (or, for a
    switch, a string that Python would read as true) must stop there, not when a cell runs."""
    with pytest.raises(MedxferError, match=re.escape(message)):
        RunConfig(data="d", out="o", **options)
