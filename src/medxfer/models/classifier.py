"""The classifier medxfer trains: gray input -> 3 channels -> backbone -> one-logit head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class GrayToRGB(nn.Module):
    """Replicate the gray channel into RGB (the paper's Eq. 14) and normalise.

    Input: float (B, 1, H, W) in [0, 1]. Output: (B, 3, H, W), ``(x - mean) / std``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        # Broadcasting (B, H, W, 1) against (3,) writes each pixel's three channels side by
        # side: one pass, and the result is already channels-last, which convolutions prefer.
        rgb = (gray.permute(0, 2, 3, 1) - self.mean) / self.std
        return rgb.permute(0, 3, 1, 2)


class XrayClassifier(nn.Module):
    """``prep`` -> ``backbone`` (pooled features) -> ``head`` (Linear, one logit).

    ``forward`` returns logits of shape (B,); apply a sigmoid for probabilities. In training
    mode an Inception v3 backbone also returns its auxiliary logits: ``(logits, aux_logits)``.
    """

    def __init__(self, prep: GrayToRGB, backbone: nn.Module, num_features: int) -> None:
        super().__init__()
        self.prep = prep
        self.backbone = backbone
        self.head = nn.Linear(num_features, 1)
        self.num_features = num_features
        self.frozen: list[nn.Module] = []  # modules kept in eval mode while training (see modes)

    def features(self, gray: torch.Tensor) -> torch.Tensor:
        out = self.backbone(self.prep(gray))
        return out[0] if isinstance(out, tuple) else out

    def forward(self, gray: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(self.prep(gray))
        if isinstance(out, tuple):  # Inception v3 in training mode: (features, aux logits)
            return self.head(out[0]).squeeze(1), out[1].squeeze(1)
        return self.head(out).squeeze(1)

    def train(self, mode: bool = True) -> XrayClassifier:
        super().train(mode)
        if mode:
            for module in self.frozen:
                module.eval()
        return self
