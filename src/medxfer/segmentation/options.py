"""The options of a segmentation run: light to import, so the command line can list them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from medxfer.errors import MedxferError

if TYPE_CHECKING:
    from medxfer.models.factory import ModelSpec

SELECTIONS = ("val_dice", "val_loss", "last")


@dataclass
class SegmentationOptions:
    """Every option of a segmentation run (all saved in ``config.json``)."""

    data: str
    out: str
    arch: str = "mobilenet_v2"
    mode: str = "transfer"
    bn: str = "frozen"
    trainable_stages: int = 1
    normalize: str = "paper"
    weights: str | None = None
    image_size: int = 128
    labels: str = "0,255"
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    criterion: str = "ce+dice"  # not ``loss``: a study table's ``loss`` is the test loss
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    decoder_width: int = 64
    augment: str = "paper"
    select: str = "val_dice"
    feature_cache: bool = False  # measured: no gain at 128 px (benchmarks/)
    bootstrap: int = 1000
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    eval_batch_size: int | None = None

    @property
    def label_values(self) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in str(self.labels).split(","))
        except ValueError:
            raise MedxferError(f"--labels {self.labels!r}: give mask values like 0,255") from None

    @property
    def model_spec(self) -> ModelSpec:
        from medxfer.models.factory import ModelSpec

        return ModelSpec(
            arch=self.arch,
            mode=self.mode,
            bn=self.bn,
            trainable_stages=self.trainable_stages,
            normalization=self.normalize,
            weights=self.weights,
            inception_aux=False,
        )

    def validate(self) -> None:
        from medxfer.config import check_types
        from medxfer.data.augment import get_augmentation
        from medxfer.segmentation.losses import SegmentationLoss

        check_types(self)
        self.model_spec.validate()
        self.label_values  # noqa: B018 - parses, raising on bad input
        get_augmentation(self.augment)
        SegmentationLoss(self.criterion, ce_weight=self.ce_weight, dice_weight=self.dice_weight)
        if self.select not in SELECTIONS:
            raise MedxferError(f"--select {self.select!r}: choose from {', '.join(SELECTIONS)}")
        for ok, message in (
            (self.image_size >= 32, "--image-size must be at least 32"),
            (self.epochs >= 1 and self.batch_size >= 1, "--epochs, --batch-size: at least 1"),
            ((self.eval_batch_size or 1) >= 1, "--eval-batch-size must be at least 1"),
            (self.decoder_width >= 1, "--decoder-width must be at least 1"),
            (self.lr > 0 and self.weight_decay >= 0, "--lr must be positive, --weight-decay >= 0"),
            (self.ce_weight >= 0 and self.dice_weight >= 0, "loss weights must be 0 or more"),
            (self.bootstrap >= 0, "--bootstrap must be 0 (no intervals) or more"),
            (self.seed >= 0, "--seed must be 0 or more"),
        ):
            if not ok:
                raise MedxferError(message)

    @property
    def caches_features(self) -> bool:
        return self.feature_cache and self.mode == "transfer" and self.bn in ("frozen", "adapt")


def options_from_dict(values: dict) -> SegmentationOptions:
    values = {"criterion" if k == "loss" else k: v for k, v in values.items()}  # first name
    known = {f.name for f in fields(SegmentationOptions)}
    return SegmentationOptions(**{k: v for k, v in values.items() if k in known})
