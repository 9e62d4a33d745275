"""Segmentation and detection are task families on the one trainer: tracked in MLflow,
loaded by ``medxfer.load``, scored on other data by ``medxfer.evaluate`` (checked against
Dice computed by hand from the reloaded model, and against the run's own test metrics)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import medxfer
from medxfer.detection.trained import TrainedDetector
from medxfer.errors import MedxferError
from medxfer.segmentation.data import load_segmentation
from medxfer.segmentation.trained import TrainedSegmenter
from medxfer.storage.folder import RunFolder
from tests.test_detection import BCCD, _split_names, _xml_boxes
from tests.test_segmentation import LUNG

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration
needs_data = pytest.mark.skipif(
    not (LUNG.is_dir() and BCCD.is_dir()), reason="lung_seg or BCCD not present"
)


def _lung_manifest(path, counts) -> str:
    table = pd.read_csv(LUNG / "split.csv")
    rows = pd.concat([table[table.split == s].head(n) for s, n in counts.items()])
    frame = pd.DataFrame(
        {
            "path": [str(LUNG / p) for p in rows["image"]],
            "mask": [str(LUNG / p) for p in rows["mask"]],
            "split": rows["split"].to_numpy(),
        }
    )
    frame.to_csv(path, index=False)
    return str(path)


def _bccd_csv(path, counts) -> str:
    rows = []
    for split, n in counts.items():
        for name in _split_names(split)[:n]:
            _, _, objs = _xml_boxes(BCCD / "Annotations" / f"{name}.xml")
            rows += [[str(BCCD / "JPEGImages" / f"{name}.jpg"), split, lab, *b] for lab, b in objs]
    columns = ["path", "split", "label", "xmin", "ymin", "xmax", "ymax"]
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tracked segmentation run and a tracked detection run, through the Python API."""
    root = tmp_path_factory.mktemp("families")
    lung = _lung_manifest(root / "lung.csv", {"train": 16, "val": 4, "test": 6})
    bccd = _bccd_csv(root / "bccd.csv", {"train": 6, "val": 3, "test": 3})
    seg = medxfer.train(
        lung,
        root / "seg",
        task="segmentation",
        image_size=32,
        epochs=2,
        batch_size=8,
        bootstrap=50,
        track="mlflow",
        quiet=True,
    )
    det = medxfer.train(
        bccd,
        root / "det",
        task="detection",
        image_size=128,
        epochs=2,
        bootstrap=50,
        device="cpu",
        track="mlflow",
        quiet=True,
    )
    return {"seg": seg, "det": det, "lung": lung, "bccd": bccd, "root": root}


@needs_data
@pytest.mark.parametrize("kind", ["seg", "det"])
def test_segmentation_and_detection_runs_are_tracked(runs, kind):
    folder: RunFolder = runs[kind]
    record = folder.read_tracking()
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["arch"] == "mobilenet_v2" and run.data.params["epochs"] == "2"
    assert run.data.tags["task"] == folder.family()
    metric = {"seg": "val_dice", "det": "val_map_50"}[kind]
    history = client.get_metric_history(record["run_id"], metric)
    assert sorted(m.step for m in history) == [1, 2]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        folder.read_history()[metric].tolist()
    )
    headline = {"seg": "dice", "det": "map_50"}[kind]
    final = run.data.metrics[f"final_test_{headline}"]
    assert final == pytest.approx(folder.read_metrics()["test"][headline])
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"config.json", "metrics.json", "predictions.csv"} <= artifacts


@needs_data
def test_load_gives_each_family_its_trained_model(runs):
    assert isinstance(medxfer.load(runs["seg"]), TrainedSegmenter)
    assert isinstance(medxfer.load(runs["det"].path / "model.pt"), TrainedDetector)
    with pytest.raises(MedxferError, match="a segmentation model, not a detection model"):
        TrainedDetector.load(runs["seg"])


@needs_data
def test_segmentation_evaluate_on_other_data_equals_dice_by_hand(runs):
    other = _lung_manifest(runs["root"] / "other.csv", {"test": 10})  # other test images too
    result = medxfer.evaluate(runs["seg"], other)
    trained = medxfer.load(runs["seg"])
    data = load_segmentation(other, 32, needs=("test",))
    idx = data.splits["test"]
    with torch.no_grad():
        x = data.images[idx].unsqueeze(1).float() / 255
        pred = trained.model(x).argmax(1).numpy()
    truth = data.masks[idx].numpy()
    both = ((pred == 1) & (truth == 1)).sum((1, 2))
    dice = 2 * both / ((pred == 1).sum((1, 2)) + (truth == 1).sum((1, 2)))
    assert result["n"] == 10 and result["task"] == "segmentation"
    assert result["dice"] == pytest.approx(float(np.mean(dice)), abs=1e-6)
    own = medxfer.evaluate(runs["seg"], runs["lung"])  # the run's own test split
    assert own["dice"] == pytest.approx(runs["seg"].read_metrics()["test"]["dice"], abs=1e-5)


@needs_data
def test_detection_evaluate_reproduces_the_runs_test_map_and_scores_other_data(runs):
    own = medxfer.evaluate(runs["det"], runs["bccd"])
    test = runs["det"].read_metrics()["test"]
    assert own["map_50"] == pytest.approx(test["map_50"], abs=1e-6)
    assert own["map"] == pytest.approx(test["map"], abs=1e-6)
    other = _bccd_csv(runs["root"] / "other.csv", {"train": 1, "test": 6})
    scored = medxfer.evaluate(runs["det"], other)
    assert scored["n"] == 6 and 0.0 <= scored["map_50"] <= 1.0
    with pytest.raises(MedxferError, match="no images in the val split"):
        medxfer.evaluate(runs["det"], other, split="val")
    with pytest.raises(MedxferError, match="apply to classification runs"):
        medxfer.evaluate(runs["seg"], runs["lung"], threshold=0.3)


@needs_data
def test_detection_exports_to_onnx_that_onnxruntime_runs_as_pytorch(runs):
    import copy

    from medxfer.detection.data import decode_rgb
    from medxfer.detection.export import ImageDetector, check_agreement, run_onnx

    trained = medxfer.load(runs["det"])
    path = trained.export()
    assert path == runs["det"].path / "model.onnx" and path.with_suffix(".onnx.json").exists()
    image = sorted((BCCD / "JPEGImages").glob("*.jpg"))[-1]  # a real, non-square image
    pixels, _ = decode_rgb(image, trained.spec.image_size)
    x = pixels.float() / 255
    boxes, labels, scores = run_onnx(path, x)
    with torch.inference_mode():
        found = medxfer.load(runs["det"]).model([x])[0]  # reloaded: independent of the export
    assert boxes.shape == tuple(found["boxes"].shape) and len(boxes) > 0
    np.testing.assert_allclose(boxes, found["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(scores, found["scores"].numpy(), atol=1e-4)
    np.testing.assert_array_equal(labels, found["labels"].numpy())
    other = copy.deepcopy(trained.model)
    with torch.no_grad():
        for p in other.roi_heads.parameters():
            p.add_(0.05)
    with pytest.raises(MedxferError, match="ONNX"):  # a graph that is not this model's
        check_agreement(path, ImageDetector(other).eval(), x)


def test_onnx_detections_are_matched_whatever_their_order():
    """Two boxes of equal score may leave NMS in either order; a moved box still fails."""
    from medxfer.detection.export import BOX_TOLERANCE, _unmatched_gaps

    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 9, 9]], dtype=np.float32)
    labels, scores = np.array([1, 1, 2]), np.array([0.9, 0.9, 0.5], dtype=np.float32)
    want = [boxes, labels, scores]
    swapped = [a[[1, 0, 2]] for a in want]
    assert _unmatched_gaps(swapped, want) is None
    moved = [boxes.copy(), labels, scores]
    moved[0][1, 0] += 10 * BOX_TOLERANCE
    assert _unmatched_gaps(moved, want)["boxes"] == pytest.approx(10 * BOX_TOLERANCE, rel=1e-3)
    relabelled = [boxes, np.array([1, 2, 2]), scores]
    assert _unmatched_gaps(relabelled, want) is not None
