"""The complete description of one run. Every CLI option of ``medxfer train`` is a field here,
so a run directory's ``config.json`` is enough to rerun it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from medxfer.data.splits import KERMANY_PATIENT_REGEX
from medxfer.errors import MedxferError
from medxfer.models.factory import ModelSpec, default_image_size
from medxfer.models.weights import DEFAULT_TAG


@dataclass
class RunConfig:
    data: str
    out: str
    arch: str = "mobilenet_v2"
    mode: str = "transfer"
    bn: str = "frozen"
    trainable_stages: int = 1
    normalize: str = "paper"
    weights: str | None = None
    weights_tag: str = DEFAULT_TAG
    image_size: int | None = None  # None: the architecture's own (299 for inception_v3)
    augment: str = "paper"
    feature_cache: bool = True  # frozen backbones: train the head on cached features
    views: int = 2  # augmented views per training image in the feature cache
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int | None = None  # None: 8 on CPU (fastest there), 256 on GPUs
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    val_fraction: float = 0.1
    patient_regex: str = KERMANY_PATIENT_REGEX
    positive: str | None = None
    select: str = "val_loss"
    threshold: str = "0.5"
    calibrate: str = "none"  # none | temperature (fitted on validation data)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    skip_bad: bool = False
    bootstrap: int = 1000
    limit_per_class: int | None = None  # use at most this many images per class and split
    cache_dir: str | None = None

    # Fields that do not change what a run computes; a run may resume under other values.
    RESUMABLE_DIFFERENCES = ("out", "device", "cache_dir", "eval_batch_size")

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            self.arch,
            self.mode,
            self.bn,
            self.trainable_stages,
            self.normalize,
            self.weights,
            self.weights_tag,
            inception_aux=self.resolution >= 299,
        )

    @property
    def resolution(self) -> int:
        return self.image_size or default_image_size(self.arch)

    @property
    def uses_feature_cache(self) -> bool:
        return self.feature_cache and self.mode == "transfer" and self.bn in ("frozen", "adapt")

    def validate(self) -> None:
        from medxfer.data.augment import get_augmentation
        from medxfer.evaluation.thresholds import check_threshold_rule

        self.model_spec.validate()
        get_augmentation(self.augment)
        check_threshold_rule(self.threshold)
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (
                self.batch_size >= 1 and (self.eval_batch_size or 1) >= 1,
                "batch sizes must be positive",
            ),
            (self.lr > 0, "--lr must be positive"),
            (self.views >= 1, "--views must be at least 1"),
            (self.resolution >= 32, "--image-size must be at least 32"),
            (self.optimizer in ("adam", "adamw", "sgd"), "--optimizer: choose adam, adamw or sgd"),
            (self.calibrate in ("none", "temperature"), "--calibrate: choose none or temperature"),
            (
                self.select in ("val_loss", "val_auc", "last"),
                "--select: choose val_loss, val_auc or last",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise MedxferError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedxferError(f"unknown run option(s): {', '.join(unknown)}")
        return cls(**values)

    def differences(self, other: RunConfig) -> list[str]:
        """Names of the fields that differ in ways that change results."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in self.RESUMABLE_DIFFERENCES and a[k] != b[k]]
