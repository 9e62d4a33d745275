"""Augmentation on whole batches of grayscale tensors, with independent parameters per image.

The ``paper`` preset follows Section 5.7 of Gu & Lee (2024): random resized crop, horizontal
flip and rotation (fused into one affine resampling per image), and colour jitter (brightness,
contrast). The paper's grayscale step is the identity on images that are already gray, and its
normalisation lives in the model (see ``medxfer.models.classifier.GrayToRGB``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from medxfer.errors import MedxferError


@dataclass(frozen=True)
class Augmentation:
    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation_deg: float = 10.0
    hflip_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2

    def describe(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Augmentation | None] = {"paper": Augmentation(), "none": None}


def get_augmentation(name: str) -> Augmentation | None:
    if name not in PRESETS:
        raise MedxferError(f"--augment {name!r}: unknown preset (choose from {sorted(PRESETS)})")
    return PRESETS[name]


def augment_batch(
    images: torch.Tensor, aug: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """Augment a float batch (B, 1, H, W) in [0, 1]; random draws come from ``generator`` (CPU)."""
    return apply_augmentation(images, draw_augmentation(images.shape[0], aug, generator))


def draw_augmentation(b: int, aug: Augmentation, generator: torch.Generator) -> dict:
    """The random parameters of a batch of ``b`` images, apart from the pixels, so that a
    worker of a data-parallel run can draw a whole batch's and apply its own rows' only
    (``apply_augmentation(x, take_rows(params, rows))``): its images then get the same
    augmentation as in a one-process run."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)

    area = uniform(*aug.crop_scale)
    log_ratio = uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
    half_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    half_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (1 - half_w) * uniform(-1, 1)
    cy = (1 - half_h) * uniform(-1, 1)
    angle = torch.deg2rad(uniform(-aug.rotation_deg, aug.rotation_deg))
    flip = torch.where(torch.rand(b, generator=generator) < aug.hflip_p, -1.0, 1.0).double()
    brightness = uniform(1 - aug.brightness, 1 + aug.brightness)
    contrast = uniform(1 - aug.contrast, 1 + aug.contrast)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = half_w * flip, half_h
    theta = torch.stack(
        [
            torch.stack([cos * sx, -sin * sy, cx], dim=1),
            torch.stack([sin * sx, cos * sy, cy], dim=1),
        ],
        dim=1,
    )
    return {"theta": theta, "brightness": brightness, "contrast": contrast}


def take_rows(params: dict, rows: torch.Tensor | slice) -> dict:
    """The parameters of some images of a drawn batch."""
    return {name: value[rows] for name, value in params.items()}


def apply_augmentation(images: torch.Tensor, params: dict) -> torch.Tensor:
    b = images.shape[0]
    theta = params["theta"].to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out * params["brightness"].to(out.device, out.dtype).view(b, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * params["contrast"].to(out.device, out.dtype).view(b, 1, 1, 1) + mean
    return out.clamp_(0.0, 1.0)


# -- test-time augmentation ------------------------------------------------------------------
TTA_VIEWS = (
    "identity",
    "hflip",
    "center",
    "top_left",
    "top_right",
    "bottom_left",
    "bottom_right",
    "center_hflip",
)
TTA_CROP = 0.9  # crops keep this share of the side, resized back to the working size


def tta_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """Fixed view ``view`` (index into ``TTA_VIEWS``) of a float batch (B, C, S, S): the image
    itself, its mirror, or a 90% crop (centre or a corner) resized back to S x S."""
    name = TTA_VIEWS[view]
    if name == "identity":
        return x
    if name == "hflip":
        return x.flip(-1)
    side = x.shape[-1]
    crop = max(1, round(TTA_CROP * side))
    offset = {"center": (side - crop) // 2, "center_hflip": (side - crop) // 2}
    top = offset.get(name, 0 if name.startswith("top") else side - crop)
    left = offset.get(name, 0 if name.endswith("left") else side - crop)
    out = x[..., top : top + crop, left : left + crop]
    out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out.flip(-1) if name == "center_hflip" else out
