"""Frozen-backbone features: batched extraction, BatchNorm re-estimation, and an on-disk cache.

With a frozen backbone only the head learns, so each image view goes through the backbone once
and every epoch trains the head on stored features.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medxfer.cache import ChunkedArray, StoredRows
from medxfer.data.augment import Augmentation, augment_batch, draw_augmentation, tta_view
from medxfer.device import Runtime, autocast, single_thread, to_input
from medxfer.engine import Engine
from medxfer.models.classifier import XrayClassifier
from medxfer.progress import track
from medxfer.shard import ONE, Shard


@dataclass(frozen=True)
class View:
    """Which view of the images to pass: clean (no ``augmentation``), or augmented with random
    parameters drawn from a generator seeded with ``seed``; ``tta`` > 0 is a fixed test-time
    view of the clean images (``data.augment.TTA_VIEWS``)."""

    augmentation: Augmentation | None = None
    seed: int = 0
    tta: int = 0

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
    *,
    engine: Engine | None = None,
    seconds: dict[str, float] | None = None,
    shard: Shard = ONE,
) -> torch.Tensor:
    """Backbone features (len(indices), D) float32 on the CPU, through ``engine`` (default:
    torch on ``model``). Clean views are computed in float32 (they are what a run is evaluated
    on, and ``evaluate`` must reproduce them); augmented training views in the run's training
    precision. Augmentation runs in torch on each batch before the engine. ``seconds`` (if
    given) accumulates the time spent in ``augment`` and ``forward``. A ``shard`` computes
    its batches only (``Shard.batches``), concatenated, drawing every batch's augmentation."""
    model.eval()
    engine = engine or Engine(model)
    generator = torch.Generator().manual_seed(view.seed)
    amp = None if view.clean else runtime.amp
    # Filled in place: a list of small per-batch outputs kept alive among the freed buffers
    # of each forward pass fragments the heap, which then grew with the collection (~80 kB
    # per image, measured at 6,000 images); one array allocated before the loop does not.
    out: torch.Tensor | None = None
    done = 0
    seconds = {} if seconds is None else seconds
    mine = sum(len(r) for r in shard.batches(len(indices), runtime.batch_size))
    for i, chunk in enumerate(
        track(
            indices.split(runtime.batch_size),
            "features" if view.clean else f"augmented features (view seed {view.seed})",
            total=len(indices),
            size=len,
            enabled=runtime.progress,
        )
    ):
        if not shard.takes(i):  # another worker's batch: its random draws only
            if not view.clean:
                draw_augmentation(len(chunk), view.augmentation, generator)
            continue
        started = time.perf_counter()
        with single_thread(runtime.device):
            x = to_input(pixels[chunk], runtime.device)
            if not view.clean:
                x = augment_batch(x, view.augmentation, generator)
            x = tta_view(x, view.tta)
        between = time.perf_counter()
        with autocast(runtime.device, amp):
            features = engine.features(x)
        if out is None:
            out = torch.empty((mine, *features.shape[1:]), dtype=features.dtype)
        out[done : done + len(features)] = features
        done += len(features)
        del features
        ended = time.perf_counter()
        seconds["augment"] = seconds.get("augment", 0.0) + between - started
        seconds["forward"] = seconds.get("forward", 0.0) + ended - between
    return out if out is not None else torch.zeros(0, model.num_features)


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


FEATURE_CHUNK_BYTES = 64 << 20  # per chunk of stored features: the unit of resumption


class FeatureCache:
    """Feature arrays on disk (``medxfer.cache.ChunkedArray``, kind ``features``), one per key:
    a dict of everything that changes them. Each is extracted chunk by chunk (an interrupted
    extraction resumes) and read back by rows, so memory does not grow with the collection."""

    def __init__(self, root: Path, shard: Shard = ONE, batch_size: int = 1) -> None:
        self.root, self.shard, self.batch_size = root, shard, batch_size

    def get(
        self,
        parts: dict,
        shape: tuple[int, int],
        extract: Callable[[range, int], torch.Tensor],
    ) -> StoredRows:
        """The features of ``shape`` (rows, dim) for ``parts``; ``extract(rows, chunk)`` computes
        the missing chunks (``chunk`` seeds its augmentation, so a resumed extraction equals an
        uninterrupted one)."""
        store = ChunkedArray(
            self.root,
            "features",
            parts,
            shape,
            np.float32,
            chunk_rows=max(1, FEATURE_CHUNK_BYTES // (4 * max(shape[1], 1))),
        )
        if self.shard.world > 1:
            self._fill_sharded(store, extract)
            return StoredRows(store)
        for chunk in store.missing():
            if not store.done_elsewhere(chunk):
                store.write(chunk, extract(store.rows_of(chunk), chunk).numpy())
        return StoredRows(store)

    def _fill_sharded(self, store: ChunkedArray, extract) -> None:
        """Each worker extracts and writes its batches of every missing chunk (``extract``
        computes the shard's rows only), then rank 0 seals the chunk."""
        shard = self.shard
        for chunk in shard.first_worker_value(store.missing() if shard.primary else None):
            rows = store.rows_of(chunk)
            features = extract(rows, chunk).numpy()
            done = 0
            for batch in shard.batches(len(rows), self.batch_size):
                store.write_rows(rows.start + batch.start, features[done : done + len(batch)])
                done += len(batch)
            shard.sync()  # every worker's rows are on disk
            if shard.primary:
                store.seal(chunk)
            shard.sync()


def chunk_seed(seed: int, chunk: int) -> int:
    """The augmentation seed of one chunk of a view: the view's own for the first chunk (so
    a collection that fits one chunk gets the augmentation of one pass), a derived one after."""
    if chunk == 0:
        return seed
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0] >> 1)
