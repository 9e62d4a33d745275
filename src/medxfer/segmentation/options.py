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
        from medxfer.data.augment import get_augmentation
        from medxfer.segmentation.losses import SegmentationLoss

        self.model_spec.validate()
        self.label_values  # noqa: B018 - parses, raising on bad input
        get_augmentation(self.augment)
        SegmentationLoss(self.criterion, ce_weight=self.ce_weight, dice_weight=self.dice_weight)
        if self.select not in SELECTIONS:
            raise MedxferError(f"--select {self.select!r}: choose from {', '.join(SELECTIONS)}")
        if self.image_size < 32 or self.epochs < 1 or self.batch_size < 1:
            raise MedxferError("--image-size must be >= 32, --epochs and --batch-size >= 1")

    @property
    def caches_features(self) -> bool:
        return self.feature_cache and self.mode == "transfer" and self.bn in ("frozen", "adapt")


def options_from_dict(values: dict) -> SegmentationOptions:
    values = {"criterion" if k == "loss" else k: v for k, v in values.items()}  # first name
    known = {f.name for f in fields(SegmentationOptions)}
    return SegmentationOptions(**{k: v for k, v in values.items() if k in known})
