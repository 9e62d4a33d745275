"""One detection run end to end: boxes -> detector -> epochs -> run folder.

The run folder mirrors classification's: ``config.json``, ``history.csv`` (per epoch: train
losses, validation mAP), ``model.pt`` (best epoch by validation mAP@0.5, with its
``DetectorSpec``), and ``metrics.json`` last (selected epoch, test mAP overall and per class,
clipped/dropped box counts). ``checkpoint.pt`` holds the last finished epoch while training, so
rerunning the same options resumes; other options on the same folder are refused.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from medxfer.atomic import write_json, write_with
from medxfer.detection.data import DetectionData, box_scales, decode_rgb, load_detection_data
from medxfer.detection.engine import evaluate, train_one_epoch
from medxfer.detection.model import DetectorSpec, anchors_from_boxes, build_detector
from medxfer.device import select_device
from medxfer.errors import MedxferError
from medxfer.run.folder import RunFolder, environment

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class DetectionOptions:
    """Every option of a detection run (all land in config.json)."""

    data: str
    out: str
    arch: str = "mobilenet_v2"
    mode: str = "transfer"
    image_size: int = 320
    epochs: int = 10
    batch_size: int = 4
    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 1e-4
    classes: list[str] | None = None
    weights: str | None = None
    fpn_channels: int = 64
    augment: bool = True
    limit: int | None = None
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise MedxferError(f"--optimizer {self.optimizer!r}: use {' or '.join(OPTIMIZERS)}")
        for name in ("image_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise MedxferError(f"--{name.replace('_', '-')} must be at least 1")


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


def train_detection(options: DetectionOptions, *, log: Callable[[str], None] = print) -> Path:
    """Train (resume, or skip if finished) the detection run of ``options``; return its folder.

    Bad input stops the run before anything is written.
    """
    options.validate()
    out = Path(options.out)
    if RunFolder(out).is_complete():
        _check_same(options, out)
        log(f"{out}: run already complete")
        return out
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(options, params)
    checkpoint = out / RunFolder.CHECKPOINT
    state: dict = {"epoch": 0, "history": [], "best": None, "best_score": -1.0, "seconds": 0.0}
    if (out / RunFolder.CONFIG).exists():
        _check_same(options, out)
        if checkpoint.exists():
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state = saved["state"]
            log(f"{out}: resuming after epoch {state['epoch']}")
    elif out.exists() and any(out.iterdir()):
        raise MedxferError(f"{out}: output folder is not empty and holds no medxfer run")
    write_json(out / RunFolder.CONFIG, _config(options, spec, data, device))

    generator = torch.Generator().manual_seed(options.seed + state["epoch"])
    train_loader = _loader(tensors["train"], options, shuffle=True, generator=generator)
    val_loader = _loader(tensors["val"], options)
    for epoch in range(state["epoch"] + 1, options.epochs + 1):
        started = time.perf_counter()
        losses = train_one_epoch(model, optimizer, train_loader, device)
        val = evaluate(model, val_loader, device, list(data.classes))
        seconds = time.perf_counter() - started
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in losses.items()}}
        row |= {"val_map_50": val["map_50"], "val_map": val["map"], "seconds": seconds}
        state["history"].append(row)
        state["epoch"], state["seconds"] = epoch, state["seconds"] + seconds
        score = val["map_50"] if val["map_50"] is not None else 0.0
        if score > state["best_score"]:
            state["best_score"], state["best"] = score, (epoch, copy.deepcopy(model.state_dict()))
        log(f"epoch {epoch}: loss {losses['loss']:.4f}  val mAP@0.5 {score:.4f} ({seconds:.0f} s)")
        _save_epoch(out, state, model, optimizer)

    model.load_state_dict(state["best"][1])
    test = None
    if data.splits.get("test"):
        test = evaluate(model, _loader(tensors["test"], options), device, list(data.classes))
    write_with(
        out / RunFolder.MODEL,
        lambda tmp: torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict()}, tmp),
    )
    write_json(out / RunFolder.METRICS, _metrics(state, data, test, device))
    checkpoint.unlink(missing_ok=True)
    return out


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


def _save_epoch(out: Path, state: dict, model, optimizer) -> None:
    frame = pd.DataFrame(state["history"])
    write_with(out / RunFolder.HISTORY, lambda tmp: frame.to_csv(tmp, index=False))
    saved = {"state": state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    write_with(out / RunFolder.CHECKPOINT, lambda tmp: torch.save(saved, tmp))


def _metrics(state: dict, data: DetectionData, test: dict | None, device) -> dict:
    best_epoch = state["best"][0]
    row = state["history"][best_epoch - 1]
    return {
        "selected_epoch": best_epoch,
        "selection": "val_map_50",
        "val": {"map_50": row["val_map_50"], "map": row["val_map"]},
        "test": test,
        "boxes": {s: asdict(c) for s, c in data.counts.items()},
        "images": {s: len(items) for s, items in data.splits.items()},
        "train_seconds": state["seconds"],
        "device": str(device),
    }


def _config(options: DetectionOptions, spec: DetectorSpec, data: DetectionData, device) -> dict:
    return {
        "task": "detection",
        "run": asdict(options),
        "resolved": {
            "detector": spec.to_dict(),
            "images": {s: len(items) for s, items in data.splits.items()},
            "device": str(device),
        },
        "environment": environment(),
    }


def _check_same(options: DetectionOptions, out: Path) -> None:
    previous = json.loads((out / RunFolder.CONFIG).read_text()).get("run", {})
    names = [f.name for f in fields(DetectionOptions) if f.name != "device"]
    diff = [n for n in names if previous.get(n) != asdict(options)[n]]
    if diff:
        raise MedxferError(
            f"{out}: holds a run with other settings ({', '.join(diff)}); use another --out"
        )


def remove_run(out: Path) -> None:
    """Delete a run folder (``--overwrite``)."""
    shutil.rmtree(out, ignore_errors=True)
