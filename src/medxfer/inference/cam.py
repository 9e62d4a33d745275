"""Grad-CAM overlays (the ``grad-cam`` package) for every architecture medxfer builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from medxfer.atomic import write_with
from medxfer.models.classifier import XrayClassifier
from medxfer.models.stages import backbone_stages


class _PositiveLogit(nn.Module):
    """(B, 1, H, W) gray -> (B, 1) positive-class logit. The input requires grad so that the
    activations of a frozen backbone still carry gradients for Grad-CAM."""

    def __init__(self, model: XrayClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        if not gray.requires_grad:
            gray = gray.detach().requires_grad_(True)
        return self.model(gray).unsqueeze(1)


def target_layer(model: XrayClassifier, size: int = 64) -> tuple[str, nn.Module]:
    """The last backbone stage whose output is still a spatial map (B, C, H, W)."""
    stages = backbone_stages(model.backbone)
    ndims: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out, n=n: ndims.__setitem__(
                n, (out[0] if isinstance(out, tuple) else out).ndim
            )
        )
        for n, m in stages
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 1, max(size, 75), max(size, 75)))
    finally:
        for h in hooks:
            h.remove()
    spatial = [(n, m) for n, m in stages if ndims.get(n) == 4]
    return spatial[-1]


def grad_cam(model: XrayClassifier, gray: torch.Tensor) -> np.ndarray:
    """Heat maps (B, H, W) in [0, 1] of the positive class for gray inputs (B, 1, H, W)."""
    from pytorch_grad_cam import GradCAM

    model = model.cpu().eval()
    _, layer = target_layer(model)
    with GradCAM(model=_PositiveLogit(model), target_layers=[layer]) as cam:
        return cam(input_tensor=gray, targets=[lambda out: out.squeeze()] * len(gray))


def save_overlay(gray: np.ndarray, heat: np.ndarray, path: Path) -> None:
    """Write the heat map over the gray image as a PNG (jet colours, 50% blend)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    overlay = show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.5)
    write_with(path, lambda tmp: Image.fromarray(overlay).save(tmp, format="PNG"))
