"""The classifier medxfer trains: gray (or colour) input -> 3 channels -> backbone -> head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class GrayToRGB(nn.Module):
    """Replicate the gray channel into RGB (the paper's Eq. 14) and normalise.

    Input: float (B, 1, H, W) gray or (B, 3, H, W) colour, in [0, 1]. Output: (B, 3, H, W),
    ``(x - mean) / std`` (a gray channel is broadcast to the three).
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
    """``prep`` -> ``backbone`` (pooled features) -> ``head`` (Linear).

    ``forward`` returns logits: (B,) with one output (binary), (B, K) otherwise; the task turns
    them into probabilities (see ``medxfer.tasks``). In training mode an Inception v3 backbone
    also returns its auxiliary logits: ``(logits, aux_logits)``.
    """

    def __init__(
        self,
        prep: GrayToRGB,
        backbone: nn.Module,
        num_features: int,
        outputs: int = 1,
        head: str = "linear",
    ) -> None:
        super().__init__()
        self.prep = prep
        self.backbone = backbone
        self.head = (
            MLPHead(num_features, outputs)
            if head == "mlp"
            else HeadOnly(nn.Linear(num_features, outputs))
        )
        self.num_features = num_features
        self.frozen: list[nn.Module] = []  # modules kept in eval mode while training (see modes)

    def features(self, gray: torch.Tensor) -> torch.Tensor:
        out = self.backbone(self.prep(gray))
        return out[0] if isinstance(out, tuple) else out

    def forward(self, gray: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(self.prep(gray))
        if isinstance(out, tuple):  # Inception v3 in training mode: (features, aux logits)
            return self.head(out[0]), _squeeze_single(out[1])
        return self.head(out)

    def train(self, mode: bool = True) -> XrayClassifier:
        super().train(mode)
        if mode:
            for module in self.frozen:
                module.eval()
        return self


class HeadOnly(nn.Module):
    """The classifier's head: features (B, D) -> logits, (B,) for a single output."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _squeeze_single(self.linear(features))


class MLPHead(nn.Module):
    """``--head mlp``: features (B, D) -> Linear(D, 512) -> ReLU -> Dropout(0.2) -> logits."""

    HIDDEN, DROPOUT = 512, 0.2

    def __init__(self, num_features: int, outputs: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(num_features, self.HIDDEN)
        self.dropout = nn.Dropout(self.DROPOUT)
        self.linear = nn.Linear(self.HIDDEN, outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(torch.relu(self.hidden(features)))
        return _squeeze_single(self.linear(hidden))


def _squeeze_single(logits: torch.Tensor) -> torch.Tensor:
    return logits.squeeze(1) if logits.shape[1] == 1 else logits
