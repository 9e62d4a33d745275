"""Frozen-backbone features: batched extraction, BatchNorm re-estimation, and an on-disk cache.

With a frozen backbone only the head learns, so each image view goes through the backbone once
and every epoch trains the head on stored features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medxfer.cache import ArrayCache
from medxfer.data.augment import Augmentation, augment_batch
from medxfer.device import Runtime, autocast, to_input
from medxfer.models.classifier import XrayClassifier


@dataclass(frozen=True)
class View:
    """Which view of the images to pass: clean (no ``augmentation``), or augmented with random
    parameters drawn from a generator seeded with ``seed``."""

    augmentation: Augmentation | None = None
    seed: int = 0

    @property
    def clean(self) -> bool:
        return self.augmentation is None


@torch.inference_mode()
def extract_features(
    model: XrayClassifier,
    pixels: torch.Tensor,
    indices: torch.Tensor,
    runtime: Runtime,
    view: View = View(),
) -> torch.Tensor:
    """Backbone features (len(indices), D) float32 on the CPU. Clean views are computed in
    float32 (they are what a run is evaluated on, and ``evaluate`` must reproduce them);
    augmented training views in the run's training precision."""
    model.eval()
    generator = torch.Generator().manual_seed(view.seed)
    amp = None if view.clean else runtime.amp
    out = []
    for chunk in tqdm(
        indices.split(runtime.batch_size),
        desc="features" if view.clean else "augmented features",
        disable=None if runtime.progress else True,
        leave=False,
    ):
        x = to_input(pixels[chunk], runtime.device)
        if not view.clean:
            x = augment_batch(x, view.augmentation, generator)
        with autocast(runtime.device, amp):
            out.append(model.features(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.num_features)


@torch.no_grad()
def adapt_batchnorm(
    norms: list[nn.modules.batchnorm._BatchNorm],
    forward: Callable[[torch.Tensor], object],
    batches: Iterable[torch.Tensor],
) -> int:
    """Replace the running statistics of ``norms`` by the per-channel mean and variance of
    their inputs over every pixel of every image in ``batches``; return the pixel count.

    Sums of x and x^2 are accumulated in float64 (law of total variance), so the result does
    not depend on the batch size, unlike averaging per-batch statistics. What remains
    approximate: all layers adapt in one pass, so each layer's inputs are those produced with
    the *previous* (ImageNet) statistics upstream, not with the adapted ones. The model is
    evaluated in eval mode; weights are untouched.
    """
    sums: dict[int, list] = {}

    def accumulate(module, inputs):
        x = inputs[0].detach().double()
        dims = [d for d in range(x.ndim) if d != 1]
        entry = sums.setdefault(id(module), [0.0, 0.0, 0])
        entry[0] = entry[0] + x.sum(dims)
        entry[1] = entry[1] + (x * x).sum(dims)
        entry[2] += x.numel() // x.shape[1]

    hooks = [m.register_forward_pre_hook(accumulate) for m in norms]
    try:
        for batch in batches:
            forward(batch)
    finally:
        for hook in hooks:
            hook.remove()
    for m in norms:
        total, squares, count = sums[id(m)]
        mean = total / count
        var = (squares / count - mean * mean).clamp(min=0) * (count / max(count - 1, 1))
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return sums[id(norms[0])][2] if norms else 0


def frozen_norms(model: XrayClassifier) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep ImageNet weights and evaluation statistics (those of the
    frozen part of the backbone): the ones ``--bn adapt`` re-estimates."""
    return [
        m
        for frozen in model.frozen
        for m in frozen.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


class FeatureCache:
    """Feature arrays on disk (``medxfer.cache.ArrayCache``, kind ``features``), one verified
    entry per key: a dict of everything that changes them."""

    def __init__(self, root: Path) -> None:
        self.cache = ArrayCache(root, "features")

    def get(self, parts: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        array = self.cache.get_or_compute(parts, lambda: compute().numpy())
        return torch.from_numpy(array)
