"""Object detection on BCCD blood cells: loading and clipping boxes, the mAP wrapper, a frozen
MobileNet v2 detector trained end to end on a real subset (interrupted and resumed), predict,
and bad input."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medxfer.cli import main
from medxfer.detection import run as detection_run
from medxfer.detection.data import load_detection_data
from medxfer.detection.metrics import DetectionScores
from medxfer.detection.run import DetectionOptions, train_detection
from medxfer.errors import MedxferError
from tests.conftest import MOBILENET_FILE, SHARED

BCCD = SHARED / "data" / "bccd" / "BCCD"
needs_bccd = pytest.mark.skipif(not BCCD.is_dir(), reason=f"{BCCD} not present")
SIZE = 160


def _xml_boxes(xml: Path) -> tuple[int, int, list[tuple[str, list[float]]]]:
    root = ET.parse(xml).getroot()
    w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
    objs = [
        (
            o.findtext("name"),
            [float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")],
        )
        for o in root.iter("object")
    ]
    return w, h, objs


def _split_names(split: str) -> list[str]:
    return (BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


@pytest.fixture(scope="module")
def bccd_csv(tmp_path_factory) -> Path:
    """A real BCCD subset as a CSV of boxes: 8 train, 4 val, 4 test images."""
    rows = []
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for name in _split_names(split)[:n]:
            _, _, objs = _xml_boxes(BCCD / "Annotations" / f"{name}.xml")
            image = BCCD / "JPEGImages" / f"{name}.jpg"
            rows += [[str(image), split, label, *box] for label, box in objs]
    path = tmp_path_factory.mktemp("bccd") / "boxes.csv"
    columns = ["path", "split", "label", "xmin", "ymin", "xmax", "ymax"]
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def trained_run(bccd_csv, tmp_path_factory) -> tuple[Path, list[str]]:
    """Frozen MobileNet v2, 2 epochs; interrupted during epoch 2, then resumed."""
    out = tmp_path_factory.mktemp("det") / "run"
    options = DetectionOptions(
        data=str(bccd_csv), out=str(out), image_size=SIZE, epochs=2, device="cpu"
    )
    real = detection_run.train_one_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    detection_run.train_one_epoch = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train_detection(options, log=lambda _: None)
    finally:
        detection_run.train_one_epoch = real
    assert (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    first = pd.read_csv(out / "history.csv")
    assert len(first) == 1
    logs: list[str] = []
    train_detection(options, log=logs.append)
    return out, logs, first


# --- data -----------------------------------------------------------------------------------


@needs_bccd
def test_clipping_counts_on_bccd_equal_a_brute_force_count():
    data = load_detection_data(BCCD.parent)
    for split in ("train", "val", "test"):
        clipped = dropped = empty = kept = 0
        for name in _split_names(split):
            w, h, objs = _xml_boxes(BCCD / "Annotations" / f"{name}.xml")
            with Image.open(BCCD / "JPEGImages" / f"{name}.jpg") as img:
                assert img.size == (w, h)
            alive = 0
            for _, (x0, y0, x1, y1) in objs:
                c = (max(x0, 0), max(y0, 0), min(x1, w), min(y1, h))
                if c[2] <= c[0] or c[3] <= c[1]:
                    dropped += 1
                else:
                    alive += 1
                    clipped += c != (x0, y0, x1, y1)
            kept += alive
            empty += alive == 0
        counts = data.counts[split]
        assert (counts.clipped, counts.dropped, counts.images_without_boxes) == (
            clipped,
            dropped,
            empty,
        )
        assert sum(len(a.boxes) for a in data.splits[split]) == kept
        assert len(data.splits[split]) == len(_split_names(split)) - empty
    assert sum(c.dropped + c.clipped for c in data.counts.values()) == 2  # the dataset's README
    assert data.classes == ("Platelets", "RBC", "WBC")


def _voc(tmp: Path, objects: dict[str, list[tuple[str, list[float]]]], splits: dict) -> Path:
    """A VOC folder of real BCCD images with hand-written boxes (640 x 480 images)."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    for name, objs in objects.items():
        shutil.copy(
            BCCD / "JPEGImages" / "BloodImage_00000.jpg", tmp / "JPEGImages" / f"{name}.jpg"
        )
        body = "".join(
            f"<object><name>{label}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for label, b in objs
        )
        xml = f"<annotation><filename>{name}.jpg</filename>{body}</annotation>"
        (tmp / "Annotations" / f"{name}.xml").write_text(xml)
    for split, names in splits.items():
        (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return tmp


@needs_bccd
def test_boxes_outside_are_clipped_and_empty_ones_dropped(tmp_path):
    root = _voc(
        tmp_path,
        {
            "a": [
                ("RBC", [600, 400, 700, 500]),
                ("RBC", [10, 10, 10, 50]),
                ("WBC", [1, 2, 30, 40]),
            ],
            "b": [("RBC", [-20, 5, -1, 30])],  # entirely left of the image
            "c": [("WBC", [5, 5, 50, 50])],
        },
        {"train": ["a", "b"], "val": ["c"]},
    )
    data = load_detection_data(root)
    counts = data.counts["train"]
    assert (counts.clipped, counts.dropped, counts.images_without_boxes) == (1, 2, 1)
    (a,) = data.splits["train"]
    np.testing.assert_array_equal(a.boxes, [[600, 400, 640, 480], [1, 2, 30, 40]])
    assert a.labels == ("RBC", "WBC")
    assert data.label_ids(a).tolist() == [1, 2]


@needs_bccd
def test_bad_inputs_stop_with_one_line_naming_the_file(tmp_path):
    ok = {"a": [("RBC", [1, 1, 20, 20])], "v": [("RBC", [1, 1, 20, 20])]}
    root = _voc(tmp_path / "empty", {**ok, "e": []}, {"train": ["a", "e"], "val": ["v"]})
    with pytest.raises(MedxferError, match=r"e\.xml: no objects"):
        load_detection_data(root)

    root = _voc(
        tmp_path / "cls",
        {**ok, "u": [("Monocyte", [1, 1, 9, 9])]},
        {"train": ["a"], "val": ["v", "u"]},
    )
    with pytest.raises(MedxferError, match=r"u\.xml: unknown class 'Monocyte'"):
        load_detection_data(root)
    with pytest.raises(MedxferError, match=r"a\.xml: unknown class 'RBC' \(classes: WBC\)"):
        load_detection_data(root, classes=["WBC"])

    root = _voc(tmp_path / "img", ok, {"train": ["a"], "val": ["v"]})
    (root / "JPEGImages" / "v.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(MedxferError, match=r"v\.jpg: unreadable image") as err:
        load_detection_data(root)
    assert "\n" not in str(err.value)

    csv = tmp_path / "boxes.csv"
    csv.write_text("path,split,label,xmin,ymin\nx.jpg,train,RBC,1,2\n")
    with pytest.raises(MedxferError, match=r"boxes\.csv: missing columns xmax, ymax"):
        load_detection_data(csv)
    out = tmp_path / "run"
    argv = ["detect", "train", "--data", str(csv), "--out", str(out)]
    assert main(argv) == 2 and not out.exists()


# --- mAP wrapper ----------------------------------------------------------------------------


def _coco_ap(scores: list[float], hits: list[bool], n_gt: int) -> float:
    """Brute-force COCO AP: precision made monotone, sampled at 101 recall points."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.cumsum(np.asarray(hits)[order])
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / n_gt
    total = 0.0
    for r in np.linspace(0, 1, 101):
        reached = precision[recall >= r - 1e-12]
        total += reached.max() if len(reached) else 0.0
    return total / 101


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_map_wrapper_on_hand_made_boxes():
    gt = [
        {
            "boxes": _boxes([0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]),
            "labels": torch.tensor([1, 1, 2]),
        }
    ]
    perfect = [{**gt[0], "scores": torch.tensor([0.9, 0.8, 0.7])}]
    scores = DetectionScores(["RBC", "WBC", "Platelets"])
    scores.update(perfect, gt)
    result = scores.compute()
    assert result["map"] == pytest.approx(1.0) and result["map_50"] == pytest.approx(1.0)
    assert result["per_class"]["RBC"] == {"map_50": pytest.approx(1.0), "map": pytest.approx(1.0)}
    assert result["per_class"]["Platelets"] == {"map_50": None, "map": None}  # no ground truth

    # RBC: a false positive above a true positive, one RBC missed; WBC never detected.
    preds = [
        {
            "boxes": _boxes([30, 0, 40, 8], [0, 0, 10, 10]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([1, 1]),
        }
    ]
    scores = DetectionScores(["RBC", "WBC"])
    scores.update(preds, gt)
    result = scores.compute()
    expected = _coco_ap([0.9, 0.8], [False, True], n_gt=2)
    assert expected == pytest.approx(51 * 0.5 / 101)
    assert result["per_class"]["RBC"]["map_50"] == pytest.approx(expected, abs=1e-6)
    assert result["per_class"]["RBC"]["map"] == pytest.approx(expected, abs=1e-6)  # exact box
    assert result["per_class"]["WBC"] == {"map_50": 0.0, "map": 0.0}
    assert result["map_50"] == pytest.approx(expected / 2, abs=1e-6)


def test_map_at_50_and_at_50_95_differ_for_a_loose_box():
    gt = [{"boxes": _boxes([0, 0, 10, 10]), "labels": torch.tensor([1])}]
    loose = [
        {
            "boxes": _boxes([0, 0, 10, 16]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]),
        }
    ]
    scores = DetectionScores(["RBC"])
    scores.update(loose, gt)
    result = scores.compute()
    iou = 100 / 160  # 0.625: a hit at thresholds 0.50, 0.55, 0.60 of the ten
    assert result["map_50"] == pytest.approx(1.0)
    assert result["map"] == pytest.approx(sum(t <= iou for t in np.linspace(0.5, 0.95, 10)) / 10)


# --- training, run folder, predict ----------------------------------------------------------


@needs_bccd
@pytest.mark.integration
def test_frozen_mobilenet_detector_trains_resumes_and_writes_the_run(trained_run):
    out, logs, first = trained_run
    assert "resuming after epoch 1" in " ".join(logs)
    for name in ("config.json", "history.csv", "metrics.json", "model.pt"):
        assert (out / name).exists()
    assert not (out / "checkpoint.pt").exists()
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(history.iloc[:1], first)  # epoch 1 kept, not retrained
    assert np.isfinite(history["train_loss"]).all()
    metrics = json.loads((out / "metrics.json").read_text())
    best = history["val_map_50"].idxmax()
    assert metrics["selected_epoch"] == history["epoch"][best]
    assert metrics["val"]["map_50"] == pytest.approx(history["val_map_50"][best])
    assert 0 <= metrics["test"]["map_50"] <= 1 and 0 <= metrics["test"]["map"] <= 1
    assert set(metrics["test"]["per_class"]) == {"Platelets", "RBC", "WBC"}
    assert metrics["images"] == {"train": 8, "val": 4, "test": 4}
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "detection" and config["run"]["mode"] == "transfer"
    sizes = config["resolved"]["detector"]["anchor_sizes"]
    flat = [s for level in sizes for s in level]
    assert flat == sorted(flat) and flat[0] < 15 < 40 < flat[-1]  # platelets .. WBC at 160 px


@needs_bccd
@pytest.mark.integration
def test_a_resumed_run_is_the_uninterrupted_run(trained_run, bccd_csv, tmp_path):
    """Order, flips and the detector's box sampling are drawn from the seed and the epoch
    alone, so the run interrupted in epoch 2 and resumed equals one that never stopped."""
    out, _, _ = trained_run
    options = DetectionOptions(
        data=str(bccd_csv), out=str(tmp_path / "run"), image_size=SIZE, epochs=2, device="cpu"
    )
    train_detection(options, log=lambda _: None)
    resumed = pd.read_csv(out / "history.csv").drop(columns="seconds")
    straight = pd.read_csv(tmp_path / "run" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(resumed, straight, rtol=1e-5)


@needs_bccd
@pytest.mark.integration
def test_transfer_keeps_the_imagenet_file_tensors_exactly(trained_run):
    """Frozen backbone: every tensor of the weight file, BatchNorm statistics included."""
    out, _, _ = trained_run
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    imagenet = torch.load(MOBILENET_FILE, map_location="cpu", weights_only=True)
    features = {k: v for k, v in imagenet.items() if k.startswith("features.")}
    assert len(features) > 250
    for key, tensor in features.items():
        assert torch.equal(state[f"backbone.body.{key}"], tensor), key
    assert not any(k.startswith("backbone.body.classifier.1") for k in state)


@needs_bccd
@pytest.mark.integration
def test_predict_writes_drawn_images_and_boxes_in_original_pixels(trained_run, tmp_path):
    out, _, _ = trained_run
    images = [BCCD / "JPEGImages" / f"{n}.jpg" for n in _split_names("test")[:2]]
    dest = tmp_path / "pred"
    argv = [
        "detect",
        "predict",
        str(out),
        *map(str, images),
        "--out",
        str(dest),
        "--min-score",
        "0",
    ]
    assert main(argv) == 0
    for image in images:
        with Image.open(dest / f"{image.stem}_boxes.png") as png:
            assert png.size == (640, 480) and png.mode == "RGB"  # drawn at the image's size
    table = pd.read_csv(dest / "detections.csv")
    columns = ["file", "picture", "label", "score", "xmin", "ymin", "xmax", "ymax", "error"]
    assert list(table.columns) == columns and table["error"].isna().all()
    assert set(table.picture) == {f"{image.stem}_boxes.png" for image in images}
    assert len(table) > 0 and set(table["label"]) <= {"Platelets", "RBC", "WBC"}
    assert (table["xmin"] >= 0).all() and (table["xmax"] <= 640).all()
    assert (table["ymax"] <= 480).all() and (table["xmax"] > table["xmin"]).all()
    assert table["xmax"].max() > SIZE  # mapped back from the working to the original pixels
    records = json.loads((dest / "detections.json").read_text())
    assert len(records) == len(table) and records[0]["file"] == table["file"][0]


@needs_bccd
@pytest.mark.integration
def test_predict_names_same_stems_apart_and_answers_past_an_unreadable_file(
    trained_run, tmp_path, capsys
):
    """Two inputs named x.jpg in different folders get x_boxes.png and x_2_boxes.png (each
    drawing its own image); a broken file gets an error row and exit status 1, the others
    their boxes; an output folder among the inputs is refused before anything is written."""
    out, _, _ = trained_run
    names = _split_names("test")[:2]
    inputs = []
    for folder, name in zip(("a", "b"), names, strict=True):
        (tmp_path / folder).mkdir()
        inputs.append(tmp_path / folder / "x.jpg")
        shutil.copy(BCCD / "JPEGImages" / f"{name}.jpg", inputs[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    dest = tmp_path / "pred"
    argv = ["detect", "predict", str(out), *map(str, [*inputs, broken]), "--out", str(dest)]
    assert main([*argv, "--min-score", "0"]) == 1
    captured = capsys.readouterr()
    assert f"{broken}: unreadable image" in captured.err and "1 failed" in captured.out
    pictures = ["x_2_boxes.png", "x_boxes.png"]
    assert sorted(p.name for p in dest.glob("*.png")) == pictures
    for png, name in zip(sorted(pictures, reverse=True), names, strict=True):
        with Image.open(dest / png) as drawn, Image.open(BCCD / "JPEGImages" / f"{name}.jpg") as im:
            # the drawing differs from its own image only where boxes were drawn
            own = np.abs(np.asarray(drawn.convert("RGB"), float) - np.asarray(im.convert("RGB")))
            assert np.mean(own.max(axis=2) == 0) > 0.5
    among = ["detect", "predict", str(out), str(tmp_path / "a"), "--out", str(tmp_path / "a")]
    assert main(among) == 2
    assert "among the inputs" in capsys.readouterr().err
    table = pd.read_csv(dest / "detections.csv")
    bad = table[table.file == str(broken)]
    assert len(bad) == 1 and bad["error"].iloc[0].startswith("unreadable image")
    assert bad[["label", "score", "xmin"]].isna().all(axis=None)
    good = table[table.file != str(broken)]
    assert set(good["file"]) == set(map(str, inputs)) and good["error"].isna().all()
    records = json.loads((dest / "detections.json").read_text())
    assert records[-1]["file"] == str(broken) and records[-1]["xmin"] is None


@needs_bccd
@pytest.mark.integration
def test_the_test_box_table_of_a_trained_run_gives_its_metrics_json_map(trained_run, bccd_csv):
    """The hand-written mAP on the run's own test detections (``engine.detect`` ->
    ``box_table`` -> ``match_boxes``) is the torchmetrics mAP the run wrote (float32)."""
    from medxfer.detection.data import decode_rgb
    from medxfer.detection.engine import detect
    from medxfer.detection.metrics import box_table, match_boxes, mean_average_precision
    from medxfer.detection.trained import load_detector

    out, _, _ = trained_run
    model, spec = load_detector(out)
    data = load_detection_data(bccd_csv)
    items = data.splits["test"]
    images, targets = [], []
    for item in items:
        image, scale = decode_rgb(item.path, spec.image_size)
        images.append(image)
        boxes = torch.from_numpy(item.boxes * scale).float()
        targets.append({"boxes": boxes, "labels": data.label_ids(item)})
    batches = [(images[i : i + 4], targets[i : i + 4]) for i in range(0, len(images), 4)]
    predictions, truths = detect(model, batches, torch.device("cpu"))
    table = box_table([a.path for a in items], predictions, truths, data.classes)
    ours = mean_average_precision(match_boxes(table, data.classes))
    assert (table.source == "prediction").sum() > 0
    written = json.loads((out / "metrics.json").read_text())["test"]
    assert written["map_50"] > 0  # float32 rounding only: relative 1e-6
    assert ours["map_50"] == pytest.approx(written["map_50"], rel=1e-6, abs=1e-12)
    assert ours["map"] == pytest.approx(written["map"], rel=1e-6, abs=1e-12)
    for name, values in written["per_class"].items():
        for key, value in values.items():
            assert ours["per_class"][name][key] == pytest.approx(value, rel=1e-6, abs=1e-12)
