"""Per-stage features of a backbone for two image sets: natural photos (RGB) and medical
images (gray replicated into RGB), each globally average-pooled to one vector per stage."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from medxfer.data.images import RASTER_SUFFIXES
from medxfer.device import to_input
from medxfer.errors import MedxferError
from medxfer.models.classifier import XrayClassifier
from medxfer.models.stages import backbone_stages, pool_output, stage_output
from medxfer.progress import track

POOLED = "pooled"  # the backbone's final feature vector, the head's input


def photo_files(folder: str | Path) -> list[Path]:
    """The JPEG and PNG files of a folder of natural photos, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedxferError(f"{folder}: natural-image folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in RASTER_SUFFIXES)
    if not files:
        raise MedxferError(f"{folder}: no JPEG or PNG photos")
    return files


def load_photos(files: list[Path], size: int, gray: bool = False) -> torch.Tensor:
    """Photos as uint8 (N, 3, size, size): shorter side resized, centre crop."""
    out = np.zeros((len(files), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img = img.convert("L" if gray else "RGB").convert("RGB")
                scale = size / min(img.size)
                w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
                img = img.resize((w, h), Image.Resampling.BILINEAR)
                left, top = (w - size) // 2, (h - size) // 2
                img = img.crop((left, top, left + size, top + size))
                out[i] = np.asarray(img).transpose(2, 0, 1)
        except (UnidentifiedImageError, OSError) as exc:
            raise MedxferError(f"{path}: unreadable image ({exc})") from None
    return torch.from_numpy(out)


def stage_names(model: XrayClassifier, layers: list[str] | None) -> list[str]:
    names = [n for n, _ in backbone_stages(model.backbone)]
    if not layers:
        return [*names, POOLED]
    unknown = [n for n in layers if n not in (*names, POOLED)]
    if unknown:
        raise MedxferError(
            f"--layers {unknown}: not stages of this backbone "
            f"(choose from {', '.join([*names, POOLED])})"
        )
    return layers


class StagePools(nn.Module):
    """The backbone on normalised RGB, returning the global-average-pooled output of each named
    stage (``pooled``: the backbone's own output), in the order of ``names``. One module for
    both engines: PyTorch runs it, onnxruntime runs its exported graph."""

    def __init__(self, backbone: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.backbone, self.names = backbone, list(names)

    def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        modules = dict(backbone_stages(self.backbone))
        captured: dict[str, torch.Tensor] = {}

        def hook(name):
            def keep(_module, _inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                captured[name] = pool_output(out) if out.ndim in (3, 4) else out

            return keep

        handles = [
            stage_output(modules[n]).register_forward_hook(hook(n))
            for n in self.names
            if n != POOLED
        ]
        try:
            pooled = self.backbone(rgb)
        finally:
            for handle in handles:
                handle.remove()
        captured[POOLED] = pooled[0] if isinstance(pooled, tuple) else pooled
        return tuple(captured[n] for n in self.names)

    def extra_repr(self) -> str:
        return ", ".join(self.names)


def stage_features(
    model: XrayClassifier,
    rgb_batches: Iterable[torch.Tensor],
    names: list[str],
    device: torch.device,
    progress: bool = False,
    *,
    engine: str = "auto",
) -> dict[str, torch.Tensor]:
    """Run normalised RGB batches through the backbone (``engine``: see ``medxfer.engine``);
    pooled output of each named stage."""
    from medxfer.data.cache import default_cache_dir
    from medxfer.engine import make_engine, resolve_engine

    model.eval().to(device)
    runner = make_engine(resolve_engine(engine, device), model, default_cache_dir())
    pools = StagePools(model.backbone, names)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for batch in track(rgb_batches, "stage features", size=len, enabled=progress):
        with torch.inference_mode():
            outputs = runner.outputs(pools, batch.to(device))
        for name, out in zip(names, outputs, strict=True):
            captured[name].append(out)
    return {n: torch.cat(v) for n, v in captured.items()}


def rgb_batches(model: XrayClassifier, images: torch.Tensor, batch: int):
    """uint8 (N, 3, S, S) photos -> batches normalised like the model's own input.

    Each batch is made on the device the model lives on when the batch is drawn (these are
    generators: ``stage_features`` moves the model first), so CPU images never meet a model
    on the GPU.
    """
    for chunk in images.split(batch):
        mean, std = model.prep.mean.view(1, 3, 1, 1), model.prep.std.view(1, 3, 1, 1)
        x = chunk.to(mean.device, non_blocking=True).float() / 255.0
        yield ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def gray_batches(model: XrayClassifier, pixels: torch.Tensor, batch: int):
    """uint8 (N, S, S) gray images -> batches through the model's gray-to-RGB ``prep``, on the
    model's device (see ``rgb_batches``)."""
    for chunk in pixels.split(batch):
        yield model.prep(to_input(chunk, model.prep.mean.device))
