"""One detection run end to end: boxes -> detector -> epochs -> run folder.

The run folder is classification's, kept by the skeleton segmentation shares
(``medxfer.run.recorder``): ``config.json``, ``history.csv`` (per epoch: train losses,
validation mAP), ``model.pt`` (best epoch by validation mAP@0.5, with its ``DetectorSpec``),
``predictions.csv`` (every test box, true and predicted: the paired comparisons of a study
recompute mAP from it), and ``metrics.json`` last (selected epoch, test mAP overall and per
class with 95% intervals, clipped/dropped box counts). ``checkpoint.pt`` holds the last
finished epoch while training, so rerunning the same options resumes; other options on the
same folder are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from medxfer.detection.data import DetectionData, box_scales, decode_rgb, load_detection_data
from medxfer.detection.engine import detect, evaluate, train_one_epoch
from medxfer.detection.metrics import (
    DetectionScores,
    box_table,
    detection_intervals,
    match_boxes,
)
from medxfer.detection.model import DetectorSpec, anchors_from_boxes, build_detector
from medxfer.detection.options import DetectionOptions
from medxfer.device import select_device
from medxfer.run.folder import RunFolder
from medxfer.run.recorder import EpochState, Recorder, train_in_folder

TASK = "detection"


class BoxDataset(Dataset):
    """Decoded images (uint8, working resolution) and targets; flips when ``augment``.

    Horizontal and vertical flips only: a microscope field has no up or left, and both leave
    the cells' sizes, on which the anchors are based, unchanged.
    """

    def __init__(self, images: list[torch.Tensor], targets: list[dict], augment: bool) -> None:
        self.images, self.targets = images, targets
        self.flip = (
            v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]) if augment else None
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        image, target = self.images[i], self.targets[i]
        if self.flip is None:
            return image, target
        boxes = tv_tensors.BoundingBoxes(
            target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:])
        )
        image, boxes = self.flip(tv_tensors.Image(image), boxes)
        return image.as_subclass(torch.Tensor), {**target, "boxes": boxes.as_subclass(torch.Tensor)}


def train_detection(
    options: DetectionOptions, *, log: Callable[[str], None] = print, overwrite: bool = False
) -> Path:
    """Train (resume, or skip if finished) the detection run of ``options``; return its folder.

    Bad input stops the run before anything is written.
    """
    return train_in_folder(options, TASK, _train, log=log, overwrite=overwrite)


def _train(options: DetectionOptions, recorder: Recorder, log: Callable[[str], None]) -> None:
    data = load_detection_data(options.data, options.classes, options.limit)
    tensors = {s: _decode(data, s, options.image_size) for s in data.splits}
    scale_of = {p: sc for imgs in tensors.values() for p, sc in imgs[2].items()}
    anchor_sizes, ratios = anchors_from_boxes(box_scales(data.splits["train"], scale_of))
    spec = DetectorSpec(
        arch=options.arch,
        mode=options.mode,
        classes=data.classes,
        image_size=options.image_size,
        anchor_sizes=anchor_sizes,
        aspect_ratios=ratios,
        weights=options.weights,
        fpn_channels=options.fpn_channels,
    )
    torch.manual_seed(options.seed)
    device = select_device(options.device)
    model = build_detector(spec).to(device)
    optimizer = _optimizer(options, [p for p in model.parameters() if p.requires_grad])
    state = recorder.resume(model, optimizer, log)
    recorder.start(_resolved(spec, data, device))
    val_loader = _loader(tensors["val"], options)
    for epoch in range(state.epoch + 1, options.epochs + 1):
        started = time.perf_counter()
        # every random draw of the epoch (order, flips, the detector's box sampling) from the
        # seed and the epoch alone, so that a resumed run is the uninterrupted one
        torch.manual_seed(options.seed * 1000 + epoch)
        generator = torch.Generator().manual_seed(options.seed * 1000 + epoch)
        train_loader = _loader(tensors["train"], options, shuffle=True, generator=generator)
        losses = train_one_epoch(model, optimizer, train_loader, device)
        val = evaluate(model, val_loader, device, list(data.classes))
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in losses.items()}}
        row |= {"val_map_50": val["map_50"], "val_map": val["map"]}
        row["seconds"] = time.perf_counter() - started
        # no validation box found at all: mAP undefined, ranked below any defined value
        row["score"] = val["map_50"] if val["map_50"] is not None else float("-inf")
        recorder.end_epoch(state, row, model=model, optimizer=optimizer)
        log(
            f"epoch {epoch}: loss {losses['loss']:.4f}  val mAP@0.5 {val['map_50'] or 0:.4f} "
            f"({row['seconds']:.0f} s)"
        )
    model.load_state_dict(state.best_model)
    test = None
    if data.splits.get("test"):
        boxes = detect(model, _loader(tensors["test"], options), device)
        scores = DetectionScores(data.classes)
        scores.update(*boxes)
        files = [str(item.path) for item in data.splits["test"]]
        table = _test_table(files, boxes, data.classes)
        recorder.folder.write_predictions(table)
        test = _with_intervals(scores.compute(), table, data.classes, options)
    saved = {"spec": spec.to_dict(), "state_dict": model.state_dict()}
    recorder.folder.write_file(RunFolder.MODEL, lambda tmp: torch.save(saved, tmp))
    recorder.finish(state, _metrics(state, data, test, device))


def _decode(data: DetectionData, split: str, size: int):
    """Images of ``split`` at the working resolution, their targets, and each image's scale."""
    images, targets, scales = [], [], {}
    for item in data.splits[split]:
        image, scale = decode_rgb(item.path, size)
        boxes = torch.from_numpy(item.boxes * scale).float()
        images.append(image)
        targets.append({"boxes": boxes, "labels": data.label_ids(item)})
        scales[item.path] = scale
    return images, targets, scales


def _loader(tensors, options: DetectionOptions, *, shuffle=False, generator=None) -> DataLoader:
    images, targets, _ = tensors
    dataset = BoxDataset(images, targets, augment=shuffle and options.augment)
    return DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda batch: tuple(map(list, zip(*batch, strict=True))),
    )


def _optimizer(options: DetectionOptions, params) -> torch.optim.Optimizer:
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    return torch.optim.SGD(params, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)


def _metrics(state: EpochState, data: DetectionData, test: dict | None, device) -> dict:
    row = state.history[state.best_epoch - 1]
    return {
        "selected_epoch": state.best_epoch,
        "selection": "val_map_50",
        "val": {"map_50": row["val_map_50"], "map": row["val_map"]},
        "test": test,
        "boxes": {s: asdict(c) for s, c in data.counts.items()},
        "images": {s: len(items) for s, items in data.splits.items()},
        "device": str(device),
    }


def _resolved(spec: DetectorSpec, data: DetectionData, device) -> dict:
    return {
        "detector": spec.to_dict(),
        "images": {s: len(items) for s, items in data.splits.items()},
        "image_size": spec.image_size,
        "device": str(device),
    }


def _test_table(files: list[str], boxes: tuple[list, list], classes: list[str]):
    """Every true and predicted test box (``predictions.csv``), with its split."""
    table = box_table(files, boxes[0], boxes[1], classes)
    table.insert(0, "split", "test")
    return table


def _with_intervals(test: dict, table, classes: list[str], options: DetectionOptions) -> dict:
    """Test mAP with 95% intervals over images (COCO's matching, recomputed per resample)."""
    if not options.bootstrap:
        return test
    matches = match_boxes(table, classes)
    found = detection_intervals(matches, resamples=options.bootstrap, seed=options.seed)
    method = {k: found[k] for k in ("method", "clusters", "resamples", "level")}
    return {**test, "ci95": found["intervals"], "interval_method": method}
