"""The options of a detection run: the shared parts (``medxfer.options``) and the detector's
own; light to import, so the command line and studies can list them without torchvision."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from medxfer.models.spec import check_feature_maps
from medxfer.options import TrainingOptions, check_options, option

OPTIMIZERS = ("sgd", "adamw")
MODES = ("transfer", "scratch", "finetune")


@dataclass
class DetectionOptions(TrainingOptions):
    """Every option of a detection run (all land in config.json)."""

    mode: str = option(
        "transfer", "transfer (frozen ImageNet backbone), scratch, or finetune", choices=MODES
    )
    arch: str = option(
        "mobilenet_v2", "backbone: mobilenet_v2, resnet18, timm/tf_efficientnet_lite0, ..."
    )
    epochs: int = option(10, "training epochs", min=1)
    batch_size: int = option(4, "training batch size", min=1)
    optimizer: str = option("sgd", "sgd (momentum 0.9) or adamw", choices=OPTIMIZERS)
    lr: float = option(0.01, "learning rate", above=0.0)
    weight_decay: float = option(1e-4, "weight decay", min=0.0)
    image_size: int = option(320, "longer image side at the working resolution", min=1)
    classes: list[str] | None = field(
        default=None,
        metadata={"help": "comma-separated class names; none: those of the training boxes"},
    )
    fpn_channels: int = option(64, "channels of the feature pyramid and the detection heads", min=1)
    augment: bool = option(True, "random horizontal and vertical flips of training images")
    limit: int | None = option(
        None, "use only the first N images of each split (quick looks, tests)", min=1
    )

    def validate(self) -> None:
        check_options(self)
        check_feature_maps(self.arch, "detection")


def options_from_dict(values: dict[str, Any]) -> DetectionOptions:
    """Options as a run folder stores them; runs of earlier versions lack the options added
    since (their defaults apply)."""
    known = {f.name for f in fields(DetectionOptions)}
    return DetectionOptions(**{k: v for k, v in values.items() if k in known})
