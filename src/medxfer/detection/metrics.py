"""COCO mean average precision, overall and per class: via torchmetrics (pycocotools backend)
for training, and by hand on a table of test boxes for bootstrap intervals and paired
comparisons (see ``match_boxes``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.detection import MeanAveragePrecision

from medxfer.errors import MedxferError
from medxfer.evaluation.intervals import bootstrap_intervals
from medxfer.evaluation.paired import paired_bootstrap


class DetectionScores:
    """Accumulates predictions and targets; ``compute`` gives mAP@0.5 and mAP@[.5:.95].

    torchmetrics reports per-class AP only at @[.5:.95], so a second metric restricted to
    IoU 0.5 supplies the per-class mAP@0.5. A class with no ground truth in the data gets
    ``None`` (COCO's -1), a class never detected gets 0.
    """

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self._all = MeanAveragePrecision(box_format="xyxy", class_metrics=True)
        self._at50 = MeanAveragePrecision(
            box_format="xyxy", class_metrics=True, iou_thresholds=[0.5]
        )

    def update(self, predictions: list[dict], targets: list[dict]) -> None:
        """Boxes xyxy; labels are class indices from 1 as the detector emits them."""
        preds = [
            {k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in predictions
        ]
        gts = [{k: t[k].detach().cpu() for k in ("boxes", "labels")} for t in targets]
        self._all.update(preds, gts)
        self._at50.update(preds, gts)

    def compute(self) -> dict:
        full, at50 = self._all.compute(), self._at50.compute()
        return {
            "map_50": _value(full["map_50"]),
            "map": _value(full["map"]),
            "per_class": {
                name: {"map_50": _per_class(at50, i + 1), "map": _per_class(full, i + 1)}
                for i, name in enumerate(self.classes)
            },
        }


def _per_class(result: dict, label: int) -> float | None:
    classes = torch.atleast_1d(result["classes"]).tolist()
    if label not in classes:
        return None
    return _value(torch.atleast_1d(result["map_per_class"])[classes.index(label)])


def _value(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if v < 0 else v


# --- the test box table and a hand-written COCO mAP for resampling ----------------------------
#
# Bootstrap intervals and paired comparisons recompute mAP on 1000 resamples of the test images.
# Rebuilding pycocotools' evaluation 1000 times is far too slow, so the COCO computation is
# written here in two parts: ``match_boxes`` does the per-image work once (sorting, IoUs, the
# greedy matching at every IoU threshold), and ``mean_average_precision`` only concatenates
# the chosen images' detections and accumulates them, which takes about a millisecond. It is
# tested against torchmetrics' MeanAveragePrecision (pycocotools backend) to 1e-9.

TABLE_COLUMNS = ["file", "source", "label", "score", "xmin", "ymin", "xmax", "ymax"]
SOURCES = ("truth", "prediction", "image")
BOX = ["xmin", "ymin", "xmax", "ymax"]
# The thresholds torchmetrics hands to pycocotools: float32 linspaces, not numpy's float64 ones
# (a recall of exactly 7/100 falls below float32's 0.07), so the point estimate equals
# DetectionScores' to the last bit.
IOU_THRESHOLDS = np.array(torch.linspace(0.5, 0.95, 10).tolist())
RECALL_POINTS = np.array(torch.linspace(0.0, 1.0, 101).tolist())
MAX_DETECTIONS = 100  # COCO's maxDets, per image and class
SUMMARY = ("map_50", "map")  # what intervals and paired comparisons report


def box_table(
    files: Sequence[str | Path],
    predictions: list[dict],
    targets: list[dict],
    classes: Sequence[str],
) -> pd.DataFrame:
    """One row per box of every image: ``file, source, label, score, xmin, ymin, xmax, ymax``.

    ``source`` is ``truth`` (score empty) or ``prediction``; ``label`` is the class name
    (``labels`` count from 1 as the detector emits them); boxes are xyxy in the pixels the
    detector saw. An image with no box at all gets one row of source ``image`` (label and
    numbers empty), so that resampling the table's images counts it.
    """
    if not len(files) == len(predictions) == len(targets):
        raise MedxferError(
            f"box table: {len(files)} files, {len(predictions)} predictions and"
            f" {len(targets)} targets differ in number"
        )
    rows: list[list] = []
    for file, prediction, target in zip(files, predictions, targets, strict=True):
        before = len(rows)
        rows += _box_rows(str(file), "truth", target, classes)
        rows += _box_rows(str(file), "prediction", prediction, classes)
        if len(rows) == before:
            rows.append([str(file), "image", None] + [np.nan] * 5)
    frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return frame.astype({c: np.float64 for c in ["score", *BOX]})


def _box_rows(file: str, source: str, boxes: dict, classes: Sequence[str]) -> list[list]:
    labels = boxes["labels"].detach().cpu().tolist()
    if any(not 1 <= i <= len(classes) for i in labels):
        raise MedxferError(f"{file}: {source} label outside 1..{len(classes)} in {labels}")
    coords = boxes["boxes"].detach().cpu().double().reshape(-1, 4).tolist()
    scores = (
        boxes["scores"].detach().cpu().double().tolist()
        if source == "prediction"
        else [np.nan] * len(labels)
    )
    return [
        [file, source, classes[i - 1], s, *c]
        for i, s, c in zip(labels, scores, coords, strict=True)
    ]


@dataclass(frozen=True)
class Matches:
    """COCO's per-image work on a box table, done once: for each image and class, the kept
    detections' scores (at most 100, by score, ties in table order), whether each is a true
    positive at each of the 10 IoU thresholds, and the number of truths.

    Per class the detections of all images lie in one array, image after image in ``files``
    order; ``counts[i, k]`` says how many belong to image ``i``.
    """

    files: tuple[str, ...]
    classes: tuple[str, ...]
    truths: np.ndarray  # (images, classes): truth boxes
    counts: np.ndarray  # (images, classes): detections kept
    scores: tuple[np.ndarray, ...]  # per class, (detections,)
    hits: tuple[np.ndarray, ...]  # per class, (10, detections) bool: true positive at threshold
    truth_boxes: tuple[np.ndarray, ...]  # per image, (truths, 5): class index, xyxy

    def take(self, images) -> Matches:
        """The images ``images`` (indices, in that order, repeats allowed) as their own Matches."""
        picks = _image_indices(images, len(self.files))
        rows = [_rows_of(self.counts[:, k], picks) for k in range(len(self.classes))]
        return Matches(
            files=tuple(self.files[i] for i in picks),
            classes=self.classes,
            truths=self.truths[picks],
            counts=self.counts[picks],
            scores=tuple(s[r] for s, r in zip(self.scores, rows, strict=True)),
            hits=tuple(h[:, r] for h, r in zip(self.hits, rows, strict=True)),
            truth_boxes=tuple(self.truth_boxes[i] for i in picks),
        )


def match_boxes(table: pd.DataFrame, classes: Sequence[str]) -> Matches:
    """Match every image's detections to its truths by COCO's rules (all areas, no crowds):
    per class, detections by descending score (stable), the first 100 kept, each taking the
    still unmatched truth of highest IoU at or above the threshold (the last of equals, as
    pycocotools does). Images in order of first appearance in ``table``."""
    classes = tuple(classes)
    _check_table(table, classes)
    files = tuple(dict.fromkeys(table["file"].astype(str)))
    index = {c: k for k, c in enumerate(classes)}
    truths = np.zeros((len(files), len(classes)), dtype=np.int64)
    counts = np.zeros_like(truths)
    scores: list[list[np.ndarray]] = [[] for _ in classes]
    hits: list[list[np.ndarray]] = [[] for _ in classes]
    truth_boxes = []
    groups = dict(iter(table.groupby(table["file"].astype(str), sort=False)))
    for i, file in enumerate(files):
        rows = groups[file]
        truth, found = rows[rows.source == "truth"], rows[rows.source == "prediction"]
        labels = truth["label"].map(index).to_numpy(np.float64)
        truth_boxes.append(np.column_stack([labels, truth[BOX].to_numpy(np.float64)]))
        for k, name in enumerate(classes):
            gt = truth.loc[truth.label == name, BOX].to_numpy(np.float64)
            det = found[found.label == name]
            order = np.argsort(-det["score"].to_numpy(np.float64), kind="mergesort")
            order = order[:MAX_DETECTIONS]
            boxes = det[BOX].to_numpy(np.float64)[order]
            truths[i, k], counts[i, k] = len(gt), len(order)
            scores[k].append(det["score"].to_numpy(np.float64)[order])
            hits[k].append(_greedy(_coco_iou(boxes, gt)))
    return Matches(
        files=files,
        classes=classes,
        truths=truths,
        counts=counts,
        scores=tuple(np.concatenate(s) if s else np.zeros(0) for s in scores),
        hits=tuple(
            np.concatenate(h, axis=1) if h else np.zeros((len(IOU_THRESHOLDS), 0), bool)
            for h in hits
        ),
        truth_boxes=tuple(truth_boxes),
    )


def _check_table(table: pd.DataFrame, classes: tuple[str, ...]) -> None:
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise MedxferError(f"box table: missing columns {', '.join(missing)}")
    sources = set(table["source"]) - set(SOURCES)
    if sources:
        raise MedxferError(f"box table: unknown source {sorted(map(str, sources))[0]!r}")
    boxes = table[table.source != "image"]
    unknown = set(boxes["label"]) - set(classes)
    if unknown:
        name = sorted(map(str, unknown))[0]
        raise MedxferError(f"box table: unknown class {name!r} (classes: {', '.join(classes)})")
    if boxes[BOX].isna().to_numpy().any():
        raise MedxferError("box table: a box lacks xmin/ymin/xmax/ymax")
    if table.loc[table.source == "prediction", "score"].isna().any():
        raise MedxferError("box table: a prediction lacks its score")


def _coco_iou(dets: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """IoU (detections, truths) as pycocotools computes it: boxes as x, y, w, h with the widths
    taken in float32 (torchmetrics converts xyxy tensors), areas w * h, no +1."""
    d, g = _xywh(dets), _xywh(truths)
    w = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2]) - np.maximum(
        d[:, None, 0], g[None, :, 0]
    )
    h = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3]) - np.maximum(
        d[:, None, 1], g[None, :, 1]
    )
    overlap = (w > 0) & (h > 0)
    inter = np.where(overlap, w * h, 0.0)
    union = (d[:, 2] * d[:, 3])[:, None] + (g[:, 2] * g[:, 3])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    xyxy = boxes.astype(np.float32)
    return np.column_stack([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]]).astype(np.float64)


def _greedy(iou: np.ndarray) -> np.ndarray:
    """True positives (10, detections) of COCO's greedy matching, detections in score order."""
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[:, None]
    n_det, n_gt = iou.shape
    hit = np.zeros((len(thresholds), n_det), dtype=bool)
    taken = np.zeros((len(thresholds), n_gt), dtype=bool)
    every = np.arange(len(thresholds))
    for i in range(n_det if n_gt else 0):
        value = np.where(taken | (iou[i] < thresholds), -np.inf, iou[i])
        best = value.max(axis=1)
        found = best > -np.inf
        last = n_gt - 1 - np.argmax(value[:, ::-1] == best[:, None], axis=1)
        hit[found, i] = True
        taken[every[found], last[found]] = True
    return hit


def mean_average_precision(matches: Matches, images=None) -> dict:
    """``map_50``, ``map`` and ``per_class`` {name: {map_50, map}} of the images ``images``
    (indices, repeats counted as often as they occur, in that order; None: all). As COCO:
    the chosen images' detections per class, stably sorted by score, cumulative true and false
    positives, precision made monotone, read at 101 recall points. A class without truths in
    the images has AP None (COCO's -1) and stays out of the means."""
    picks = _image_indices(
        np.arange(len(matches.files)) if images is None else images, len(matches.files)
    )
    per_class = {}
    for k, name in enumerate(matches.classes):
        ap = _class_ap(matches, k, picks)
        per_class[name] = (
            {"map_50": None, "map": None}
            if ap is None
            else {"map_50": float(ap[0]), "map": float(ap.mean())}
        )
    defined = [v for v in per_class.values() if v["map"] is not None]
    return {
        "map_50": float(np.mean([v["map_50"] for v in defined])) if defined else None,
        "map": float(np.mean([v["map"] for v in defined])) if defined else None,
        "per_class": per_class,
    }


def _class_ap(matches: Matches, k: int, picks: np.ndarray) -> np.ndarray | None:
    """AP of class ``k`` at each IoU threshold on the images ``picks``, or None without truths."""
    positives = int(matches.truths[picks, k].sum())
    if positives == 0:
        return None
    rows = _rows_of(matches.counts[:, k], picks)
    order = np.argsort(-matches.scores[k][rows], kind="mergesort")
    hit = matches.hits[k][:, rows[order]]
    if hit.shape[1] == 0:
        return np.zeros(len(IOU_THRESHOLDS))
    tp = np.cumsum(hit, axis=1, dtype=np.float64)
    fp = np.cumsum(~hit, axis=1, dtype=np.float64)
    recall = tp / positives
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    ap = np.empty(len(IOU_THRESHOLDS))
    for t in range(len(IOU_THRESHOLDS)):
        at = np.searchsorted(recall[t], RECALL_POINTS, side="left")
        reached = at < hit.shape[1]
        ap[t] = np.where(reached, precision[t, np.minimum(at, hit.shape[1] - 1)], 0.0).mean()
    return ap


def _image_indices(images, n: int) -> np.ndarray:
    picks = np.asarray(images).reshape(-1)
    if picks.size and (
        not np.issubdtype(picks.dtype, np.integer) or picks.min() < 0 or picks.max() >= n
    ):
        raise MedxferError(f"mAP: image indices must be integers in 0..{n - 1}")
    return picks.astype(np.int64)


def _rows_of(counts: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Indices of the rows of images ``picks``, in that order, where image i owns ``counts[i]``
    consecutive rows."""
    starts = np.cumsum(counts) - counts
    size = counts[picks]
    first = np.repeat(starts[picks] - (np.cumsum(size) - size), size)
    return first + np.arange(size.sum(), dtype=np.int64)


def detection_intervals(matches: Matches, *, resamples: int = 1000, seed: int = 0) -> dict:
    """95% percentile bootstrap intervals of ``map_50`` and ``map``, resampling test images
    (``bootstrap_intervals``' result: method, clusters, resamples, level, intervals)."""

    def score(rows: np.ndarray) -> dict[str, float | None]:
        m = mean_average_precision(matches, rows)
        return {k: m[k] for k in SUMMARY}

    return bootstrap_intervals(score, len(matches.files), resamples=resamples, seed=seed)


def align(matches_a: Matches, matches_b: Matches) -> Matches:
    """``matches_b`` in the image order of ``matches_a``, once both are shown to score the same
    test images with the same truths (equal up to one scale per image: runs at different
    working resolutions pair); else one line saying what differs."""
    if matches_a.classes != matches_b.classes:
        raise MedxferError(
            f"paired mAP: classes differ ({', '.join(matches_a.classes)} vs"
            f" {', '.join(matches_b.classes)})"
        )
    position = {f: i for i, f in enumerate(matches_b.files)}
    only = sorted(set(matches_a.files) ^ set(position))
    if only:
        raise MedxferError(
            f"paired mAP: the runs' test images differ ({len(only)} in one only, e.g. {only[0]})"
        )
    aligned = matches_b.take([position[f] for f in matches_a.files])
    for file, a, b in zip(matches_a.files, matches_a.truth_boxes, aligned.truth_boxes, strict=True):
        if not _same_truth(a, b):
            raise MedxferError(f"paired mAP: {file}: the runs' truth boxes differ")
    return aligned


def _same_truth(a: np.ndarray, b: np.ndarray) -> bool:
    """The same boxes of the same classes, in any order, up to one scale factor."""
    if a.shape != b.shape:
        return False
    if not len(a):
        return True
    a, b = (t[np.lexsort(t.T[::-1])] for t in (a, b))
    if not np.array_equal(a[:, 0], b[:, 0]):
        return False
    scale = b[:, 1:].sum() / max(a[:, 1:].sum(), np.finfo(float).tiny)
    return bool(np.allclose(a[:, 1:] * scale, b[:, 1:], rtol=1e-4, atol=1e-3))


def paired_detection(
    matches_a: Matches, matches_b: Matches, *, resamples: int = 1000, seed: int = 0
) -> dict:
    """Paired bootstrap of b - a of ``map_50`` and ``map`` on the same resampled test images
    (``paired_bootstrap``' result, with ``p_values``), plus both runs' values and their
    difference on the whole test set (``values_a``, ``values_b``, ``diff``)."""
    matches_b = align(matches_a, matches_b)

    def score(rows: np.ndarray) -> dict[str, float | None]:
        a, b = mean_average_precision(matches_a, rows), mean_average_precision(matches_b, rows)
        return {k: _minus(b[k], a[k]) for k in SUMMARY}

    result = paired_bootstrap(score, len(matches_a.files), resamples=resamples, seed=seed)
    full_a, full_b = mean_average_precision(matches_a), mean_average_precision(matches_b)
    result["values_a"] = {k: full_a[k] for k in SUMMARY}
    result["values_b"] = {k: full_b[k] for k in SUMMARY}
    result["diff"] = {k: _minus(full_b[k], full_a[k]) for k in SUMMARY}
    return result


def _minus(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None else b - a
