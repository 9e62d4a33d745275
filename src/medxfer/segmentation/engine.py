"""One training epoch and one evaluation pass, in the style of torchvision's references.

Speed path for frozen backbones: the encoder's outputs on clean (unaugmented) images never
change, so :func:`encode_all` computes them once and :func:`evaluate` decodes from them.
Training images are augmented afresh every epoch, so their encoder pass is repeated, but
without autograd when no encoder weight trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medxfer.data.augment import Augmentation, augment_batch
from medxfer.device import autocast, to_input
from medxfer.segmentation.model import SegmentationModel


@dataclass
class Loader:
    """Mini-batches of in-memory uint8 images and class-index masks (rows ``indices``)."""

    images: torch.Tensor
    masks: torch.Tensor
    indices: torch.Tensor
    batch_size: int

    def __len__(self) -> int:
        return len(self.indices)

    def batches(
        self, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(positions, x float (B, 1, S, S) in [0, 1], y long (B, S, S))``; shuffled when a
        generator is given. ``positions`` index into ``indices``."""
        n = len(self.indices)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, self.batch_size):
            pos = torch.arange(start, min(start + self.batch_size, n))
            if order is not None:
                pos = order[pos]
            rows = self.indices[pos]
            yield pos, to_input(self.images[rows], device), self.masks[rows].to(device).long()


def augment_pair(
    x: torch.Tensor, y: torch.Tensor, aug: Augmentation, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random affine for images and masks.

    The mask pass replays the generator's state through :func:`augment_batch` with the
    photometric jitter off, so it draws the same crop, rotation and flip. Masks are warped as
    one-hot maps and put back with argmax: every output pixel gets one of the input labels,
    as with nearest-neighbour, and pixels that fall outside the image become background.
    """
    state = generator.get_state()
    x = augment_batch(x, aug, generator)
    replay = torch.Generator().manual_seed(0)
    replay.set_state(state)
    onehot = F.one_hot(y, int(y.max()) + 1 if y.numel() else 1).permute(0, 3, 1, 2).float()
    geometric = dataclasses.replace(aug, brightness=0.0, contrast=0.0)
    warped = augment_batch(onehot, geometric, replay)
    return x, warped.argmax(dim=1)


def train_one_epoch(
    model: SegmentationModel,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Loader,
    *,
    device: torch.device,
    generator: torch.Generator,
    aug: Augmentation | None = None,
    amp: torch.dtype | None = None,
) -> float:
    """Train on every image once (shuffled, augmented); return the mean loss per image."""
    model.train()
    total = 0.0
    for _, x, y in loader.batches(device, generator):
        if aug is not None:
            x, y = augment_pair(x, y, aug, generator)
        with autocast(device, amp):
            if model.encoder_trainable:
                logits = model(x)
            else:
                with torch.no_grad():
                    feats = model.encode(x)
                logits = model.decode(feats, x.shape[-2:])
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
    return total / max(len(loader), 1)


@torch.inference_mode()
def encode_all(
    model: SegmentationModel, loader: Loader, device: torch.device, amp: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Encoder outputs of every image in ``loader`` (in its order), one tensor per stride."""
    model.eval()
    parts: list[list[torch.Tensor]] = []
    for _, x, _ in loader.batches(device):
        with autocast(device, amp):
            parts.append([f.float() for f in model.encode(x)])
    return [torch.cat(level) for level in zip(*parts, strict=True)]


@torch.inference_mode()
def evaluate(
    model: SegmentationModel,
    criterion: torch.nn.Module,
    loader: Loader,
    *,
    device: torch.device,
    encoded: list[torch.Tensor] | None = None,
    amp: torch.dtype | None = None,
) -> tuple[float, torch.Tensor]:
    """Mean loss per image and the predicted class map (N, S, S) uint8 on the CPU."""
    model.eval()
    total, preds = 0.0, []
    for pos, x, y in loader.batches(device):
        with autocast(device, amp):
            if encoded is None:
                logits = model(x)
            else:
                logits = model.decode([f[pos.to(f.device)] for f in encoded], x.shape[-2:])
            total += criterion(logits, y).item() * len(x)
        preds.append(logits.argmax(dim=1).to(torch.uint8).cpu())
    return total / max(len(loader), 1), torch.cat(preds)
