"""Frozen-backbone features: batched extraction, BatchNorm re-estimation, and an on-disk cache.

With a frozen backbone only the head learns, so each image view goes through the backbone once
and every epoch trains the head on stored features.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medxfer.cache import ArrayCache
from medxfer.data.augment import Augmentation, augment_batch
from medxfer.models.classifier import XrayClassifier
from medxfer.training.device import autocast


def to_input(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S) -> float (B, 1, S, S) in [0, 1] on ``device``."""
    return pixels.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)


def inference_batch_size(requested: int | None, device: torch.device) -> int:
    """Small batches keep a CPU's caches warm (measured: see benchmarks/README.md)."""
    return requested or (256 if device.type == "cuda" else 8)


@torch.inference_mode()
def extract_features(
    model: XrayClassifier,
    pixels: torch.Tensor,
    indices: torch.Tensor,
    device: torch.device,
    batch_size: int = 128,
    aug: Augmentation | None = None,
    generator: torch.Generator | None = None,
    amp: torch.dtype | None = None,
    desc: str = "features",
    progress: bool = True,
) -> torch.Tensor:
    """Backbone features (len(indices), D) float32 on the CPU, optionally of augmented views."""
    model.eval()
    out = []
    for chunk in tqdm(
        indices.split(batch_size), desc=desc, disable=None if progress else True, leave=False
    ):
        x = to_input(pixels[chunk], device)
        if aug is not None:
            x = augment_batch(x, aug, generator)
        with autocast(device, amp):
            out.append(model.features(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.num_features)


@torch.no_grad()
def adapt_batchnorm(
    model: XrayClassifier,
    pixels: torch.Tensor,
    indices: torch.Tensor,
    device: torch.device,
    batch_size: int = 128,
    progress: bool = True,
) -> None:
    """Re-estimate every BatchNorm's running statistics on the given images (a cumulative
    average over one pass), leaving the weights untouched and the model in eval mode."""
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in norms:
        m.train()
    for chunk in tqdm(
        indices.split(batch_size), desc="adapt BN", disable=None if progress else True, leave=False
    ):
        model.features(to_input(pixels[chunk], device))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


class FeatureCache:
    """Feature arrays on disk (``medxfer.cache.ArrayCache``, kind ``features``), one verified
    entry per key: a dict of everything that changes them."""

    def __init__(self, root: Path) -> None:
        self.cache = ArrayCache(root, "features")

    def get(self, parts: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        array = self.cache.get_or_compute(parts, lambda: compute().numpy())
        return torch.from_numpy(array)
