"""Using a trained run: predict, calibration, Grad-CAM, export."""

import json
import shutil
from itertools import pairwise

import numpy as np
import pytest
import torch

from medxfer.classification.run import train
from medxfer.classification.trained import TrainedModel
from medxfer.cli import main
from medxfer.config import RunConfig
from medxfer.data.images import load_image
from medxfer.inference.cam import grad_cam, target_layer
from medxfer.inference.predict import expand_inputs
from medxfer.models.factory import create_model
from medxfer.models.spec import PAPER_ARCHS, ModelSpec
from medxfer.storage.folder import RunFolder

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained_run(small_kermany, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    cfg = RunConfig(
        data=str(small_kermany),
        out=str(out),
        image_size=64,
        epochs=2,
        bootstrap=0,
        calibrate="temperature",
        threshold="youden",
    )
    return train(cfg, progress=False, log=lambda _: None)


def test_run_records_calibration(trained_run):
    metrics = json.loads((trained_run / RunFolder.METRICS).read_text())
    cal = metrics["calibration"]
    assert cal["method"] == "temperature" and cal["temperature"] > 0
    # the stored ECE is that of the stored test probabilities, recomputed bin by bin here
    import pandas as pd

    rows = pd.read_csv(trained_run / RunFolder.PREDICTIONS)
    rows = rows[rows.split == "test"]
    y = (rows.label == metrics["positive"]).to_numpy(float)
    prob = rows.probability.to_numpy()
    edges = np.linspace(0, 1, 16)
    gaps = [
        abs(y[m].mean() - prob[m].mean()) * m.sum()
        for lo, hi in pairwise(edges)
        if (m := (prob >= lo) & ((prob < hi) | (hi == 1))).any()
    ]
    assert cal["test_ece"] == pytest.approx(sum(gaps) / len(y), abs=1e-9)
    assert cal["test_ece"] != cal["test_ece_uncalibrated"]  # the temperature changed them
    assert cal["val_nll"] <= cal["val_nll_uncalibrated"] + 1e-9  # T minimises validation NLL
    assert (trained_run / RunFolder.RELIABILITY).stat().st_size > 5000
    model = TrainedModel.load(trained_run)
    assert model.thresholds == [metrics["threshold"]] and model.temperature == cal["temperature"]


def test_predict_folder_with_a_corrupt_file(trained_run, small_kermany, tmp_path, capsys):
    folder = tmp_path / "inputs"
    shutil.copytree(small_kermany / "test" / "PNEUMONIA", folder)
    bad = folder / "zz_broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xffnot really")
    out = tmp_path / "pred.csv"
    code = main(["predict", str(trained_run), str(folder), "--out", str(out), "--quiet"])
    assert code == 1  # some input failed
    assert "zz_broken.jpeg" in capsys.readouterr().err
    import pandas as pd

    rows = pd.read_csv(out)
    assert len(rows) == 11
    broken = rows[rows.file == str(bad)].iloc[0]
    assert "unreadable image" in broken.error and np.isnan(broken.probability)
    good = rows[rows.error.isna()]
    assert len(good) == 10 and good.probability.between(0, 1).all()
    threshold = TrainedModel.load(trained_run).thresholds[0]
    expected = np.where(good.probability >= threshold, "PNEUMONIA", "NORMAL")
    assert list(good.predicted) == list(expected)
    # the stored predictions of the same test images agree
    stored = pd.read_csv(trained_run / RunFolder.PREDICTIONS).set_index("file")
    for _, row in good.iterrows():
        original = str(small_kermany / "test" / "PNEUMONIA" / row.file.split("/")[-1])
        assert row.probability == pytest.approx(stored.loc[original, "probability"], abs=1e-5)


def test_predict_json_threshold_override_and_glob(trained_run, small_kermany, tmp_path):
    out = tmp_path / "pred.json"
    pattern = str(small_kermany / "test" / "NORMAL" / "*.jpeg")
    assert (
        main(
            [
                "predict",
                str(trained_run),
                pattern,
                "--out",
                str(out),
                "--threshold",
                "1.0",
                "--quiet",
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert len(rows) == 10 and all(r["predicted"] == "NORMAL" and r["error"] is None for r in rows)


def test_expand_inputs_errors(tmp_path):
    from medxfer.errors import MedxferError

    with pytest.raises(MedxferError, match="no such file"):
        expand_inputs([str(tmp_path / "missing*.png")])


@pytest.mark.parametrize("arch", [*PAPER_ARCHS, "timm/tf_efficientnet_lite0"])
def test_every_architecture_has_a_cam_layer(arch):
    model = create_model(ModelSpec(arch, mode="scratch"))
    name, _ = target_layer(model)
    assert name in dict(
        __import__("medxfer.models.stages", fromlist=["x"]).backbone_stages(model.backbone)
    )


def _blobs(n, size=224, seed=0):
    """Noise with 40 small bright dots in every image; label 1 iff a large bright disc is
    present too, so that only the disc, not overall brightness, tells the classes apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels, centres = [], [], []
    for i in range(n):
        img = rng.normal(90, 20, (size, size))
        for _ in range(40):
            dy, dx = rng.integers(4, size - 4, 2)
            img[(yy - dy) ** 2 + (xx - dx) ** 2 < 9] = 245
        cy, cx = rng.integers(32, size - 32, 2)
        if i % 2:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 18**2] = 245
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append([i % 2])
        centres.append((cy, cx))
    return np.stack(images), np.array(labels), centres


def test_grad_cam_peaks_on_the_blob(tmp_path):
    arrays = {}
    for split, n, seed in (("train", 120, 0), ("val", 20, 1), ("test", 20, 2)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"], _ = _blobs(n, seed=seed)
    np.savez(tmp_path / "blobs.npz", **arrays)
    cfg = RunConfig(
        data=str(tmp_path / "blobs.npz"),
        out=str(tmp_path / "run"),
        epochs=15,
        augment="none",
        bootstrap=0,
        val_fraction=0,
        lr=1e-2,
    )
    run = train(cfg, progress=False, log=lambda _: None)
    assert json.loads((run / RunFolder.METRICS).read_text())["test"]["accuracy"] >= 0.9
    model = TrainedModel.load(run).network
    images, _, centres = _blobs(12, seed=7)
    positives = [i for i in range(12) if i % 2]
    gray = torch.from_numpy(images[positives]).unsqueeze(1).float() / 255
    heat = grad_cam(model, gray)  # frozen backbone: gradients must still reach the stage
    assert heat.shape == (len(positives), 224, 224)
    yy, xx = np.mgrid[:224, :224]
    for h, i in zip(heat, positives, strict=True):
        cy, cx = centres[i]
        py, px = np.unravel_index(np.argmax(h), h.shape)
        # MobileNet v2's last stage is a 7 x 7 grid of 32 px cells at 224 px
        assert np.hypot(py - cy, px - cx) < 48, (py, px, cy, cx)
        near = (yy - cy) ** 2 + (xx - cx) ** 2 < 32**2
        assert h[near].mean() > 3 * h[~near].mean()


def test_cam_overlays_from_cli(trained_run, small_kermany, tmp_path):
    cams = tmp_path / "cams"
    files = sorted((small_kermany / "test" / "PNEUMONIA").iterdir())[:3]
    assert main(["predict", str(trained_run), *map(str, files), "--cam", str(cams), "--quiet"]) == 0
    written = sorted(p.name for p in cams.iterdir())
    assert written == sorted(f"{f.stem}_cam.png" for f in files)


def test_onnx_export_matches_pytorch(trained_run, kermany, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(out)]) == 0
    files = (
        sorted((kermany / "test" / "PNEUMONIA").iterdir())[:5]
        + sorted((kermany / "test" / "NORMAL").iterdir())[:4]
    )
    gray = np.stack([load_image(f, 64) for f in files])[:, None].astype(np.float32) / 255
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    onnx_prob = session.run(None, {"image": gray})[0]
    trained = TrainedModel.load(trained_run)
    with torch.no_grad():
        logits = trained.network(torch.from_numpy(gray))
        torch_prob = torch.sigmoid(logits / trained.temperature).numpy()
    assert onnx_prob.shape == (9,)
    np.testing.assert_allclose(onnx_prob, torch_prob, atol=1e-4)
    meta = json.loads((tmp_path / "model.onnx.json").read_text())
    assert meta["input"]["shape"] == ["batch", 1, 64, 64]
    assert meta["classes"] == ["NORMAL", "PNEUMONIA"] and meta["task"] == "binary"


def test_torchscript_export_matches_pytorch(trained_run, tmp_path):
    out = tmp_path / "model.ts"
    assert main(["export", str(trained_run), "--format", "torchscript", "--out", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    trained = TrainedModel.load(trained_run)
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        expected = torch.sigmoid(trained.network(x) / trained.temperature)
        torch.testing.assert_close(scripted(x), expected, atol=1e-5, rtol=0)
