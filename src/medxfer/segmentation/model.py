"""The segmentation network: gray -> RGB (``prep``) -> ImageNet backbone (theta*) -> the
outputs where its stride reaches 4, 8, 16 and 32 -> a small U-Net decoder (psi) -> logits.

The backbone comes from :func:`medxfer.models.factory.create_model`, so modes, BatchNorm
policy and offline weights are exactly those of classification. The decoder is ours rather
than ``segmentation_models_pytorch``'s: smp builds its own encoders and loads their weights
by URL, so it cannot take this backbone, with its mode's freezing, as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medxfer.errors import MedxferError
from medxfer.models.factory import ModelSpec, create_model
from medxfer.models.stages import backbone_stages

STRIDES = (4, 8, 16, 32)
PROBE_SIZE = 256  # input side used once to find where each stride ends


@dataclass(frozen=True)
class Tap:
    """The backbone stage whose output is the feature map at ``stride``."""

    stride: int
    stage: str
    channels: int


def find_taps(backbone: nn.Module) -> list[Tap]:
    """The last stage at each stride in :data:`STRIDES`, found with forward hooks on one
    probe image (works for any backbone whose stages :func:`backbone_stages` lists)."""
    shapes: dict[str, torch.Size] = {}
    stages = backbone_stages(backbone)
    handles = [module.register_forward_hook(_recorder(shapes, name)) for name, module in stages]
    was_training = backbone.training
    try:
        with torch.no_grad():
            backbone.eval()(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
    finally:
        backbone.train(was_training)
        for h in handles:
            h.remove()
    taps = {}
    for name, _ in stages:
        shape = shapes.get(name)
        if shape is None or len(shape) != 4 or shape[-1] == 0:
            continue
        stride = PROBE_SIZE // shape[-1]
        if stride in STRIDES:
            taps[stride] = Tap(stride, name, shape[1])  # later stages overwrite earlier ones
    missing = [s for s in STRIDES if s not in taps]
    if missing:
        raise MedxferError(f"{type(backbone).__name__}: no backbone stage at stride {missing}")
    return [taps[s] for s in STRIDES]


def _recorder(shapes: dict[str, torch.Size], name: str):
    def hook(_module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        shapes[name] = out.shape

    return hook


class Block(nn.Sequential):
    """Conv 3x3 -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
        )


class UNetDecoder(nn.Module):
    """From the stride-32 map up to stride 4: upsample x2, concatenate the skip, one Block."""

    def __init__(self, channels: list[int], width: int, num_classes: int) -> None:
        super().__init__()
        deep, *skips = reversed(channels)
        self.top = Block(deep, width)
        self.ups = nn.ModuleList(Block(width + c, width) for c in skips)
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        *skips, deep = feats
        x = self.top(deep)
        for block, skip in zip(self.ups, reversed(skips), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.classify(x)


class SegmentationModel(nn.Module):
    """``forward(gray (B, 1, H, W) in [0, 1]) -> logits (B, K, H, W)``.

    ``encode`` and ``decode`` are the two halves, so that a frozen backbone's outputs can be
    computed once and the decoder trained on them. The encoder is the backbone traced with
    torch.fx up to its last tap (torchvision's or timm's ``create_feature_extractor``): it
    shares the backbone's modules, so the mode's freezing carries over, and it exports to
    ONNX, which forward hooks do not.
    """

    def __init__(
        self, spec: ModelSpec, num_classes: int, width: int = 64, *, load_weights: bool = True
    ) -> None:
        super().__init__()
        classifier = create_model(spec, load_weights=load_weights)
        self.prep = classifier.prep
        self.frozen = classifier.frozen  # modules kept in eval mode while training
        self.taps = find_taps(classifier.backbone)
        self.encoder = _feature_extractor(spec.arch, classifier.backbone, self.taps)
        self.decoder = UNetDecoder([t.channels for t in self.taps], width, num_classes)
        self.num_classes = num_classes

    @property
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    def encode(self, gray: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's feature maps at strides 4, 8, 16, 32."""
        out = self.encoder(self.prep(gray))
        return [out[str(t.stride)] for t in self.taps]

    def decode(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        logits = self.decoder(feats)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(gray), gray.shape[-2:])

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if mode:
            for module in self.frozen:
                module.eval()
        return self


def _feature_extractor(arch: str, backbone: nn.Module, taps: list[Tap]) -> nn.Module:
    nodes = {t.stage: str(t.stride) for t in taps}
    if arch.startswith("timm/"):
        from timm.models import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    return create_feature_extractor(backbone, return_nodes=nodes)
