"""Per-pixel cross-entropy (the paper's Eq. 4) plus soft Dice, from MONAI's ``DiceCELoss``.

``ce+dice`` = ``ce_weight * CE + dice_weight * (1 - soft Dice)``; ``ce`` and ``dice`` keep one
term. Soft Dice uses the softmax probabilities of the foreground classes (background is left
out, as it would dominate), summed over the whole batch (``batch=True``: steadier than a mean
of per-image ratios when an image holds little foreground).
"""

from __future__ import annotations

import torch
from torch import nn

from medxfer.errors import MedxferError

LOSSES = ("ce+dice", "ce", "dice")


class SegmentationLoss(nn.Module):
    """``loss(logits (B, K, H, W), target (B, H, W) class indices) -> scalar``."""

    def __init__(self, kind: str = "ce+dice", *, ce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        from monai.losses import DiceCELoss

        if kind not in LOSSES:
            raise MedxferError(f"--criterion {kind!r}: unknown (choose from {', '.join(LOSSES)})")
        if ce_weight < 0 or dice_weight < 0:
            raise MedxferError("--ce-weight and --dice-weight must not be negative")
        self.kind = kind
        self.loss = DiceCELoss(
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            batch=True,
            lambda_ce=ce_weight if kind != "dice" else 0.0,
            lambda_dice=dice_weight if kind != "ce" else 0.0,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target.unsqueeze(1).long())
