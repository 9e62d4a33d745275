"""A Faster R-CNN whose backbone is the paper's ImageNet classifier (f = psi o theta*).

Why Faster R-CNN: on a CPU at a few hundred pixels its dense part is one 3x3 convolution per
pyramid level (the RPN head), where RetinaNet and FCOS run eight 3x3 convolutions per level;
the second stage then only sees a few hundred regions through a small MLP. Two-stage detectors
also reach useful accuracy in few epochs on small sets such as BCCD.

The backbone comes from :func:`medxfer.models.factory.create_model` (same architectures, modes
and offline weight mechanisms as classification). Its last three stages of stride 8, 16 and 32
feed a small feature pyramid; ``psi`` is that pyramid, the RPN and the box head.

Modes: ``transfer`` freezes theta* entirely, BatchNorm included (eval statistics); ``finetune``
trains theta* but keeps BatchNorm statistics at their ImageNet values (detection batches of a few
images give poor batch statistics: torchvision's detection practice); ``scratch`` trains
everything, BatchNorm in train mode.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

from medxfer.detection.options import MODES as DETECTION_MODES
from medxfer.errors import MedxferError
from medxfer.models.factory import ModelSpec, create_model
from medxfer.models.stages import backbone_stages

LEVEL_STRIDES = (8, 16, 32)
SIZES_PER_LEVEL = 2


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to rebuild the detector (stored in model.pt)."""

    arch: str
    mode: str
    classes: tuple[str, ...]
    image_size: int
    anchor_sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[float, ...]
    weights: str | None = None
    fpn_channels: int = 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorSpec:
        d = dict(d)
        d["classes"] = tuple(d["classes"])
        d["anchor_sizes"] = tuple(tuple(s) for s in d["anchor_sizes"])
        d["aspect_ratios"] = tuple(d["aspect_ratios"])
        return cls(**d)


def anchors_from_boxes(scales: np.ndarray) -> tuple[tuple[tuple[float, ...], ...], tuple]:
    """Anchor sizes per pyramid level and aspect ratios from the training boxes.

    ``scales``: (N, 2) of sqrt(w h) and h / w at the working resolution. The box sizes from the
    1st to the 99th percentile are covered by 6 geometrically spaced sizes, two per level,
    smallest on the finest level (BCCD train at 320 px: median platelet 19 px, RBC 51, WBC 94;
    anchors 16.5 to 115 px); the aspect ratios are the 10th, 50th and 90th percentiles of h / w
    (0.77, 0.96, 1.18 on BCCD). Quantiles of all boxes alone would follow the RBC, 85% of boxes.
    """
    if len(scales) == 0:
        raise MedxferError("no training boxes to size the anchors from")
    lo, hi = np.quantile(scales[:, 0], [0.01, 0.99])
    hi = max(hi, lo * 1.5)
    sizes = np.geomspace(lo, hi, len(LEVEL_STRIDES) * SIZES_PER_LEVEL).round(1)
    per_level = tuple(
        tuple(float(s) for s in sizes[i : i + SIZES_PER_LEVEL])
        for i in range(0, len(sizes), SIZES_PER_LEVEL)
    )
    ratios = tuple(float(r) for r in np.quantile(scales[:, 1], [0.1, 0.5, 0.9]).round(2))
    return per_level, ratios


class PyramidBackbone(nn.Module):
    """theta* (a factory classifier backbone) tapped at strides 8/16/32, then an FPN.

    Forward hooks, not torch.fx, tap the stages so that every factory backbone (torchvision or
    timm) works unchanged.
    """

    def __init__(self, body: nn.Module, taps: list[str], channels: list[int], out: int) -> None:
        super().__init__()
        self.body = body
        self.taps = taps
        self.fpn = FeaturePyramidNetwork(channels, out)
        self.out_channels = out
        self.frozen_bn = False  # keep the body's BatchNorm in eval mode while training
        self._seen: dict[str, torch.Tensor] = {}
        modules = dict(body.named_modules())
        for name in taps:
            # a partial of a bound method, not a closure: deepcopy then rebinds it to the copy
            modules[name].register_forward_hook(functools.partial(self._keep, name))

    def _keep(self, name: str, _module: nn.Module, _inputs, output: torch.Tensor) -> None:
        self._seen[name] = output

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        self._seen = {}
        self.body(x)
        feats = OrderedDict((str(i), self._seen[n]) for i, n in enumerate(self.taps))
        self._seen = {}
        return self.fpn(feats)

    def train(self, mode: bool = True) -> PyramidBackbone:
        super().train(mode)
        if mode and self.frozen_bn:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def build_detector(spec: DetectorSpec, load_weights: bool = True) -> FasterRCNN:
    """The detector of ``spec``; raises MedxferError for unknown arch/mode or missing weights."""
    if spec.mode not in DETECTION_MODES:
        raise MedxferError(
            f"--mode {spec.mode!r}: unknown for detection "
            f"(choose from {', '.join(DETECTION_MODES)})"
        )
    classifier = create_model(
        ModelSpec(spec.arch, mode=spec.mode, normalization="imagenet", weights=spec.weights),
        load_weights=load_weights,
    )
    body = classifier.backbone
    taps, channels = _stride_taps(body)
    backbone = PyramidBackbone(body, taps, channels, spec.fpn_channels)
    if spec.mode == "transfer":
        body.requires_grad_(False)
    backbone.frozen_bn = spec.mode != "scratch"
    mean, std = classifier.prep.mean.tolist(), classifier.prep.std.tolist()
    anchors = AnchorGenerator(spec.anchor_sizes, (spec.aspect_ratios,) * len(spec.anchor_sizes))
    names = [str(i) for i in range(len(taps))]
    box_head = TwoMLPHead(spec.fpn_channels * 7 * 7, 256)
    return FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(256, len(spec.classes) + 1),
        min_size=spec.image_size,
        max_size=spec.image_size,
        image_mean=mean,
        image_std=std,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=300,
        box_batch_size_per_image=128,
        box_detections_per_img=100,
    )


def _stride_taps(body: nn.Module) -> tuple[list[str], list[int]]:
    """For strides 8, 16, 32: the last stage whose output has that stride, and its channels."""
    stages = backbone_stages(body)
    shapes: dict[str, torch.Size] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, out.shape))
        for n, m in stages
    ]
    was_training = body.training
    body.eval()
    with torch.no_grad():
        body(torch.zeros(1, 3, 64, 64))
    body.train(was_training)
    for h in hooks:
        h.remove()
    taps, channels = [], []
    for stride in LEVEL_STRIDES:
        match = [
            n
            for n, _ in stages
            if n in shapes and len(shapes[n]) == 4 and shapes[n][-1] == 64 // stride
        ]
        if not match:
            raise MedxferError(f"backbone has no stage of stride {stride} for a feature pyramid")
        taps.append(match[-1])
        channels.append(int(shapes[match[-1]][1]))
    return taps, channels
