"""Hand-written COCO mAP on the test box table against torchmetrics' MeanAveragePrecision
(pycocotools), on random cases built to hit COCO's corners and on real BCCD truth boxes; its
bootstrap intervals and paired comparisons."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from medxfer.detection.data import load_detection_data
from medxfer.detection.metrics import (
    TABLE_COLUMNS,
    DetectionScores,
    align,
    box_table,
    detection_intervals,
    match_boxes,
    mean_average_precision,
    paired_detection,
)
from medxfer.errors import MedxferError
from medxfer.evaluation.intervals import resample_rows
from tests.conftest import SHARED

BCCD = SHARED / "data" / "bccd" / "BCCD"
needs_bccd = pytest.mark.skipif(not BCCD.is_dir(), reason=f"{BCCD} not present")
CLASSES = ["Platelets", "RBC", "WBC"]


def _reference(predictions: list[dict], targets: list[dict], classes: list[str]) -> dict:
    """torchmetrics' mAP in float64: pycocotools' precision array (IoU x recall x class, area
    "all", 100 detections), averaged over its defined entries as COCO's summary does."""
    metric = MeanAveragePrecision(box_format="xyxy", class_metrics=True, extended_summary=True)
    metric.warn_on_many_detections = False
    metric.update(predictions, targets)
    out = metric.compute()
    precision = out["precision"].numpy()[:, :, :, 0, -1]
    ids = torch.atleast_1d(out["classes"]).tolist()
    per_class = {}
    for i, name in enumerate(classes):
        p = precision[:, :, ids.index(i + 1)] if i + 1 in ids else -np.ones((10, 101))
        defined = (p > -1).all()
        per_class[name] = {
            "map_50": p[0].mean() if defined else None,
            "map": p.mean() if defined else None,
        }
    valid = precision[:, :, (precision > -1).all(axis=(0, 1))]
    result = {
        "map_50": valid[0].mean() if valid.size else None,
        "map": valid.mean() if valid.size else None,
        "per_class": per_class,
    }
    # the float32 values torchmetrics reports agree to float32's rounding
    for key in ("map_50", "map"):
        assert float(out[key]) == pytest.approx(result[key] if valid.size else -1, abs=6e-8)
    return result


def _assert_same(ours: dict, reference: dict, tol: float = 1e-9) -> None:
    def close(a, b):
        return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= tol)

    assert close(ours["map_50"], reference["map_50"]), (ours, reference)
    assert close(ours["map"], reference["map"]), (ours, reference)
    for name, ref in reference["per_class"].items():
        got = ours["per_class"][name]
        assert close(got["map_50"], ref["map_50"]) and close(got["map"], ref["map"]), name


def _ours(predictions, targets, classes, images=None) -> dict:
    files = [f"img{i}.jpg" for i in range(len(targets))]
    matches = match_boxes(box_table(files, predictions, targets, classes), classes)
    return mean_average_precision(matches, images)


def _random_case(rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Boxes on a half-pixel grid (exact IoUs such as 0.5 or 0.75 happen), scores from a few
    values (ties within and across images), images without truths, a class (WBC) sometimes
    present but never predicted, and now and then more than 100 detections of a class."""
    predictions, targets = [], []
    for _ in range(rng.integers(1, 7)):
        n_gt = int(rng.choice([0, 0, 1, 3, 6]))
        xy = rng.integers(0, 80, (n_gt, 2)) / 2
        gt = np.concatenate([xy, xy + rng.integers(4, 40, (n_gt, 2)) / 2], axis=1)
        gt_labels = rng.integers(1, 4, n_gt)
        keep = rng.random(n_gt) < 0.8
        det = gt[keep] + rng.integers(-4, 5, (int(keep.sum()), 4)) / 2
        det_labels = gt_labels[keep]
        n_extra = int(rng.choice([0, 2, 5, 130] if rng.random() < 0.15 else [0, 2, 5]))
        xy = rng.integers(0, 80, (n_extra, 2)) / 2
        extra = np.concatenate([xy, xy + rng.integers(2, 30, (n_extra, 2)) / 2], axis=1)
        det = np.concatenate([det, extra])
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
        extra_labels = rng.integers(1, 3, n_extra) if n_extra < 100 else np.ones(n_extra, int)
        det_labels = np.concatenate([det_labels, extra_labels])  # never WBC
        scores = rng.choice([0.2, 0.5, 0.7, 0.9], len(det)) if rng.random() < 0.5 else None
        if scores is None:
            scores = rng.random(len(det))
        targets.append(
            {"boxes": torch.tensor(gt, dtype=torch.float32), "labels": torch.tensor(gt_labels)}
        )
        predictions.append(
            {
                "boxes": torch.tensor(det, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(det_labels, dtype=torch.int64),
            }
        )
    return predictions, targets


def test_map_equals_torchmetrics_on_random_cases_with_cocos_corners():
    rng = np.random.default_rng(0)
    seen = {"over_100": 0, "no_truth_image": 0, "ties": 0}
    for _ in range(60):
        predictions, targets = _random_case(rng)
        _assert_same(
            _ours(predictions, targets, CLASSES), _reference(predictions, targets, CLASSES)
        )
        seen["over_100"] += any((p["labels"] == k).sum() > 100 for p in predictions for k in (1, 2))
        seen["no_truth_image"] += any(len(t["labels"]) == 0 for t in targets)
        scores = torch.cat([p["scores"] for p in predictions])
        seen["ties"] += len(scores.unique()) < len(scores)
    assert all(v >= 3 for v in seen.values()), seen


def test_a_detection_equally_close_to_two_truths_takes_the_last_as_pycocotools_does():
    """A box as close to two truths (IoU 0.5 each) takes the second; the next detection, which
    only fits that second truth, is then a false positive at IoU 0.5."""
    targets = [{"boxes": _tensor([0, 0, 10, 20], [0, 0, 20, 10]), "labels": torch.tensor([2, 2])}]
    predictions = [
        {
            "boxes": _tensor([0, 0, 10, 10], [0, 0, 20, 10]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([2, 2]),
        }
    ]
    ours = _ours(predictions, targets, CLASSES)
    _assert_same(ours, _reference(predictions, targets, CLASSES))
    assert ours["per_class"]["RBC"]["map_50"] == pytest.approx(51 / 101)


def _tensor(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_map_equals_the_projects_detection_scores():
    """The point estimate is the one DetectionScores (training's mAP) reports, to float32."""
    rng = np.random.default_rng(1)
    predictions, targets = _random_case(rng)
    while not any(len(t["labels"]) for t in targets):
        predictions, targets = _random_case(rng)
    wrapper = DetectionScores(CLASSES)
    wrapper.update(predictions, targets)
    _assert_same(_ours(predictions, targets, CLASSES), wrapper.compute(), tol=6e-8)


@pytest.fixture(scope="module")
def bccd_case() -> tuple[list[str], list[dict], list[dict]]:
    """Real truth boxes of 12 BCCD test images; predictions jittered by a few pixels, a fifth
    dropped, false alarms added, scores with ties."""
    data = load_detection_data(BCCD.parent, limit=12)
    items = data.splits["test"]
    rng = np.random.default_rng(2)
    predictions, targets = [], []
    for item in items:
        labels = data.label_ids(item)
        targets.append({"boxes": torch.from_numpy(item.boxes).float(), "labels": labels})
        keep = rng.random(len(labels)) < 0.8
        det = item.boxes[keep] + rng.normal(0, 6, (int(keep.sum()), 4))
        extra_xy = rng.uniform(0, 560, (3, 2))
        det = np.concatenate([det, np.concatenate([extra_xy, extra_xy + 60], axis=1)])
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 1)
        det_labels = torch.cat([labels[torch.from_numpy(keep)], torch.tensor([1, 2, 3])])
        scores = np.round(rng.uniform(0.3, 1.0, len(det)), 1)
        predictions.append(
            {
                "boxes": torch.tensor(det, dtype=torch.float32),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": det_labels,
            }
        )
    return [str(a.path) for a in items], predictions, targets


@needs_bccd
def test_map_equals_torchmetrics_on_real_bccd_truths(bccd_case):
    files, predictions, targets = bccd_case
    assert len(files) == 12 and sum(len(t["labels"]) for t in targets) > 100
    ours = _ours(predictions, targets, CLASSES)
    reference = _reference(predictions, targets, CLASSES)
    _assert_same(ours, reference)
    assert 0.3 < ours["map_50"] < 1 and ours["map"] < ours["map_50"]


@needs_bccd
def test_a_resample_with_repeats_equals_torchmetrics_on_the_duplicated_images(bccd_case):
    files, predictions, targets = bccd_case
    matches = match_boxes(box_table(files, predictions, targets, CLASSES), CLASSES)
    for images in ([3, 3, 0, 7, 3, 11, 0], [5], [1, 1]):
        picked = _reference([predictions[i] for i in images], [targets[i] for i in images], CLASSES)
        _assert_same(mean_average_precision(matches, images), picked)


def test_the_box_table_keeps_every_image_and_survives_a_csv(tmp_path):
    rng = np.random.default_rng(3)
    predictions, targets = _random_case(rng)
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    predictions.append({**empty, "scores": torch.zeros(0)})
    targets.append(empty)
    files = [f"dir{i}/x.png" for i in range(len(targets))]
    table = box_table(files, predictions, targets, CLASSES)
    assert list(table.columns) == TABLE_COLUMNS
    assert table["file"].unique().tolist() == files
    last = table[table.file == files[-1]]
    assert last["source"].tolist() == ["image"] and last["label"].isna().all()
    truth = table[table.source == "truth"]
    assert truth["score"].isna().all() and len(truth) == sum(len(t["labels"]) for t in targets)
    assert set(table.loc[table.source == "prediction", "label"]) <= set(CLASSES)
    table.to_csv(tmp_path / "boxes.csv", index=False)
    again = match_boxes(pd.read_csv(tmp_path / "boxes.csv"), CLASSES)
    matches = match_boxes(table, CLASSES)
    assert again.files == matches.files and len(again.files) == len(targets)
    _assert_same(mean_average_precision(again), mean_average_precision(matches), tol=0)

    with pytest.raises(MedxferError, match="unknown class 'Monocyte'"):
        match_boxes(table.assign(label=table.label.replace("RBC", "Monocyte")), CLASSES)
    with pytest.raises(MedxferError, match="missing columns score"):
        match_boxes(table.drop(columns="score"), CLASSES)


@needs_bccd
def test_intervals_are_the_quantiles_of_torchmetrics_on_the_same_resamples(bccd_case):
    files, predictions, targets = bccd_case
    matches = match_boxes(box_table(files, predictions, targets, CLASSES), CLASSES)
    result = detection_intervals(matches, resamples=20, seed=5)
    assert result["method"] == "image bootstrap" and result["clusters"] == 12
    values = {"map_50": [], "map": []}
    for rows in resample_rows(12, resamples=20, seed=5):
        reference = _reference([predictions[i] for i in rows], [targets[i] for i in rows], CLASSES)
        for key in values:
            values[key].append(reference[key])
    for key, v in values.items():
        expected = np.quantile(v, [0.025, 0.975])
        np.testing.assert_allclose(result["intervals"][key], expected, atol=1e-9)
        assert expected[1] > expected[0]


@needs_bccd
def test_paired_detection_identical_better_and_refused(bccd_case):
    files, predictions, targets = bccd_case
    table = box_table(files, predictions, targets, CLASSES)
    noisy = match_boxes(table, CLASSES)
    same = paired_detection(noisy, noisy, resamples=200, seed=0)
    assert same["diff"] == {"map_50": 0.0, "map": 0.0}
    assert same["intervals"] == {"map_50": [0.0, 0.0], "map": [0.0, 0.0]}
    assert same["p_values"] == {"map_50": 1.0, "map": 1.0}

    perfect = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    better = match_boxes(box_table(files, perfect, targets, CLASSES), CLASSES)
    result = paired_detection(noisy, better, resamples=200, seed=0)
    assert result["values_b"] == {"map_50": pytest.approx(1.0), "map": pytest.approx(1.0)}
    for key in ("map_50", "map"):
        assert result["diff"][key] == pytest.approx(1.0 - result["values_a"][key])
        assert result["diff"][key] > 0 and result["intervals"][key][0] > 0
        assert result["p_values"][key] < 0.05

    # the same images in another order pair: b is reordered to a's images (truths of an
    # image in any order)
    order = np.random.default_rng(0).permutation(files).tolist()
    shuffled = pd.concat(
        [table[(table.file == f) & (table.source == "truth")].iloc[::-1] for f in order]
        + [table[(table.file == f) & (table.source != "truth")] for f in order]
    )
    assert shuffled.file.unique().tolist() == order
    again = paired_detection(noisy, match_boxes(shuffled, CLASSES), resamples=50, seed=0)
    assert again["intervals"] == {"map_50": [0.0, 0.0], "map": [0.0, 0.0]}
    # truths at another working resolution (boxes x 0.5) still pair
    half = box_table(
        files,
        [{**p, "boxes": p["boxes"] / 2} for p in predictions],
        [{**t, "boxes": t["boxes"] / 2} for t in targets],
        CLASSES,
    )
    assert align(noisy, match_boxes(half, CLASSES)).files == noisy.files

    fewer = match_boxes(table[table.file != files[4]], CLASSES)
    with pytest.raises(MedxferError, match=r"test images differ \(1 in one only") as err:
        paired_detection(noisy, fewer, resamples=10, seed=0)
    assert "\n" not in str(err.value)
    moved = [dict(t) for t in targets]
    moved[2] = {**targets[2], "boxes": targets[2]["boxes"] + torch.tensor([9.0, 0, 9, 0])}
    other = match_boxes(box_table(files, predictions, moved, CLASSES), CLASSES)
    with pytest.raises(MedxferError, match=rf"{files[2]}: the runs' truth boxes differ"):
        paired_detection(noisy, other, resamples=10, seed=0)


def test_unique_stem_numbers_repeated_names_past_those_taken():
    from medxfer.inference.predict import unique_stem

    used: set[str] = set()
    for stem in ["x", "x_2", "x", "x", "y"]:
        used.add(unique_stem(stem, used))
    assert used == {"x", "x_2", "x_3", "x_4", "y"}
