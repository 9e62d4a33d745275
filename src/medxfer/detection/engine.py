"""One training epoch and one evaluation pass, in the style of torchvision's
references/detection (lists of images and target dicts; the model returns its losses)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from medxfer.detection.metrics import DetectionScores
from medxfer.errors import MedxferError

Batch = tuple[list[torch.Tensor], list[dict]]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """uint8 images become float in [0, 1] (the detector normalises them itself)."""
    images, targets = batch
    images = [img.to(device).float().div_(255) for img in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images, targets


def train_one_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable[Batch], device
) -> dict[str, float]:
    """Mean of each loss term (and their sum, ``loss``) over the epoch's batches."""
    model.train()
    sums: dict[str, float] = {}
    batches = 0
    for batch in loader:
        images, targets = to_device(batch, device)
        losses = model(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):  # diverged: one clear line, the checkpoint is kept
            raise MedxferError(f"training diverged (loss {total.item()}): lower --lr")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        for k, v in {"loss": total, **losses}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        batches += 1
    return {k: v / max(batches, 1) for k, v in sums.items()}


@torch.inference_mode()
def detect(model: nn.Module, loader: Iterable[Batch], device) -> tuple[list[dict], list[dict]]:
    """Every image's detections and targets, on the CPU, in the loader's order: what
    ``DetectionScores`` scores and ``metrics.box_table`` lists."""
    model.eval()
    predictions: list[dict] = []
    targets: list[dict] = []
    for batch in loader:
        images, truth = to_device(batch, device)
        predictions += [{k: v.detach().cpu() for k, v in p.items()} for p in model(images)]
        targets += [{k: v.cpu() for k, v in t.items()} for t in truth]
    return predictions, targets


def evaluate(model: nn.Module, loader: Iterable[Batch], device, classes: list[str]) -> dict:
    """mAP@0.5 and mAP@[.5:.95], overall and per class, of ``model`` on ``loader``."""
    scores = DetectionScores(classes)
    scores.update(*detect(model, loader, device))
    return scores.compute()
