"""Grad-CAM overlays (the ``grad-cam`` package) for every architecture medxfer builds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from medxfer.atomic import write_with
from medxfer.errors import MedxferError
from medxfer.models.classifier import XrayClassifier
from medxfer.models.stages import TokenPooling, backbone_stages, stage_output

if TYPE_CHECKING:  # inference takes a trained model; it never loads one
    from medxfer.classification.trained import TrainedModel

NEGATIVE = -1  # Grad-CAM target: the negative class of a one-logit binary model


class _Logits(nn.Module):
    """(B, C, H, W) -> (B, outputs) logits. The input requires grad so that the activations of
    a frozen backbone still carry gradients for Grad-CAM."""

    def __init__(self, model: XrayClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not image.requires_grad:
            image = image.detach().requires_grad_(True)
        logits = self.model(image)
        return logits.unsqueeze(1) if logits.ndim == 1 else logits


def target_layer(model: XrayClassifier, channels: int = 1, size: int = 64) -> tuple[str, nn.Module]:
    """The last backbone stage whose output is still a spatial map (B, C, H, W)."""
    if any(isinstance(m, TokenPooling) for m in model.backbone.modules()):
        raise MedxferError(
            "Grad-CAM: a transformer's stages give tokens, not spatial maps; use --cam with a CNN"
        )
    stages = backbone_stages(model.backbone)
    ndims: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out, n=n: ndims.__setitem__(
                n, (out[0] if isinstance(out, tuple) else out).ndim
            )
        )
        for n, m in ((n, stage_output(m)) for n, m in stages)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, max(size, 75), max(size, 75)))
    finally:
        for h in hooks:
            h.remove()
    spatial = [(n, stage_output(m)) for n, m in stages if ndims.get(n) == 4]
    if not spatial:
        raise MedxferError(
            f"Grad-CAM: {type(model.backbone).__name__} has no stage with a spatial map "
            "(a transformer gives tokens); use --cam with a CNN"
        )
    return spatial[-1]


def grad_cam(
    model: XrayClassifier, image: torch.Tensor, classes: list[int] | None = None
) -> np.ndarray:
    """Heat maps (B, H, W) in [0, 1] for inputs (B, C, H, W): of output ``classes[i]`` for
    image i (default output 0: the positive class of a one-logit binary model). A one-logit
    model's negative class is ``-1``: the map of the negated logit."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import (
        BinaryClassifierOutputTarget,
        ClassifierOutputTarget,
    )

    model = model.cpu().eval()
    _, layer = target_layer(model, image.shape[1])
    targets = [
        BinaryClassifierOutputTarget(0) if c == NEGATIVE else ClassifierOutputTarget(c)
        for c in (classes or [0] * len(image))
    ]
    with GradCAM(model=_Logits(model), target_layers=[layer]) as cam:
        return cam(input_tensor=image, targets=targets)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heat map over the image (gray (H, W) or colour (3, H, W) uint8): (H, W, 3) uint8 RGB,
    jet colours, 50% blend."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = image.transpose(1, 2, 0) if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    rgb = rgb.astype(np.float32) / 255.0
    return show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.5)


def overlays(
    model: TrainedModel, pixels: torch.Tensor, cam_class: str | None = None
) -> list[np.ndarray]:
    """Grad-CAM overlays (H, W, 3) of decoded images ``pixels`` (the model's input format)."""
    image = pixels.float().div(255.0)
    image = image.unsqueeze(1) if image.ndim == 3 else image
    heat = grad_cam(model.network, image, _cam_targets(model, pixels, cam_class))
    return [overlay(pix, h) for pix, h in zip(pixels.numpy(), heat, strict=True)]


def write_cams(
    model: TrainedModel, files: list[Path], folder: Path, cam_class: str | None = None
) -> list[Path]:
    """A Grad-CAM overlay ``NAME_cam.png`` per file (files must decode), for ``cam_class`` or,
    by default, the positive class (binary) or the most probable class/label."""
    from medxfer.errors import MedxferError
    from medxfer.inference.predict import load_inputs

    if cam_class is not None and cam_class not in model.classes:
        raise MedxferError(f"--cam-class {cam_class!r}: not one of {list(model.classes)}")
    written: list[Path] = []
    used: set[str] = set()
    for start in range(0, len(files), 16):
        chunk = files[start : start + 16]
        pixels, _ = load_inputs(model, chunk)
        for f, picture in zip(chunk, overlays(model, pixels, cam_class), strict=True):
            name, n = f"{f.stem}_cam.png", 1
            while name in used:
                n += 1
                name = f"{f.stem}_{n}_cam.png"
            used.add(name)
            image = Image.fromarray(picture)
            write_with(folder / name, lambda tmp, image=image: image.save(tmp, format="PNG"))
            written.append(folder / name)
    return written


def _cam_targets(model: TrainedModel, pixels: torch.Tensor, cam_class: str | None) -> list[int]:
    if model.task.name == "binary":  # one logit: the positive class, or its negation
        return [NEGATIVE if cam_class == model.classes[0] else 0] * len(pixels)
    if cam_class is not None:
        return [model.classes.index(cam_class)] * len(pixels)
    return model.probabilities(pixels).argmax(axis=1).tolist()
