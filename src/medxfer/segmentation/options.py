"""The options of a segmentation run: the shared parts (``medxfer.options``) and the U-Net
decoder's own; light to import, so the command line can list them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medxfer.errors import MedxferError
from medxfer.models.spec import check_feature_maps
from medxfer.options import LayerOptions, check_options, option

if TYPE_CHECKING:
    from medxfer.models.factory import ModelSpec

SELECTIONS = ("val_dice", "val_loss", "last")
CRITERIA = ("ce+dice", "ce", "dice")
AUGMENTATIONS = ("paper", "none")


@dataclass
class SegmentationOptions(LayerOptions):
    """Every option of a segmentation run (all saved in ``config.json``)."""

    batch_size: int = option(16, "training batch size", min=1)
    image_size: int = option(
        128, "working resolution: images and masks resized to a square of this side", min=32
    )
    labels: str = option("0,255", "mask values, comma-separated; the i-th becomes class i")
    criterion: str = option("ce+dice", "training loss: ce+dice, ce or dice", choices=CRITERIA)
    ce_weight: float = option(1.0, "weight of the per-pixel cross-entropy in ce+dice", min=0.0)
    dice_weight: float = option(1.0, "weight of the soft Dice loss in ce+dice", min=0.0)
    decoder_width: int = option(64, "channels of every U-Net decoder level", min=1)
    augment: str = option("paper", "augmentation preset: paper or none", choices=AUGMENTATIONS)
    select: str = option(
        "val_dice",
        "best-epoch rule on validation data: val_dice, val_loss or last",
        choices=SELECTIONS,
    )
    # measured: no gain at 128 px (benchmarks/segmentation_cache.py)
    feature_cache: bool = option(False, "frozen encoder: encode validation and test images once")

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
        from medxfer.segmentation.losses import SegmentationLoss

        check_options(self)
        self.model_spec.validate()
        check_feature_maps(self.arch, "segmentation")
        self.label_values  # noqa: B018 - parses, raising on bad input
        SegmentationLoss(self.criterion, ce_weight=self.ce_weight, dice_weight=self.dice_weight)

    @property
    def caches_features(self) -> bool:
        return self.feature_cache and self.mode == "transfer" and self.bn in ("frozen", "adapt")


def options_from_dict(values: dict[str, Any]) -> SegmentationOptions:
    """Options as a run folder stores them; ``loss`` was the first name of ``criterion``, and
    runs of earlier versions lack the options added since (their defaults apply)."""
    from dataclasses import fields

    values = {"criterion" if k == "loss" else k: v for k, v in values.items()}
    known = {f.name for f in fields(SegmentationOptions)}
    return SegmentationOptions(**{k: v for k, v in values.items() if k in known})
