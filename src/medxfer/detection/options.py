"""The options of a detection run: light to import, so the command line and studies can list
them without loading torchvision."""

from __future__ import annotations

from dataclasses import dataclass, fields

from medxfer.errors import MedxferError

OPTIMIZERS = ("sgd", "adamw")
MODES = ("transfer", "scratch", "finetune")


@dataclass
class DetectionOptions:
    """Every option of a detection run (all land in config.json)."""

    data: str
    out: str
    arch: str = "mobilenet_v2"
    mode: str = "transfer"
    image_size: int = 320
    epochs: int = 10
    batch_size: int = 4
    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 1e-4
    classes: list[str] | None = None
    weights: str | None = None
    fpn_channels: int = 64
    augment: bool = True
    limit: int | None = None
    bootstrap: int = 1000
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        from medxfer.config import check_types

        check_types(self)
        if self.optimizer not in OPTIMIZERS:
            raise MedxferError(f"--optimizer {self.optimizer!r}: use {' or '.join(OPTIMIZERS)}")
        if self.mode not in MODES:
            raise MedxferError(
                f"--mode {self.mode!r}: unknown for detection (choose from {', '.join(MODES)})"
            )
        for name in ("image_size", "epochs", "batch_size", "fpn_channels"):
            if getattr(self, name) < 1:
                raise MedxferError(f"--{name.replace('_', '-')} must be at least 1")
        for ok, message in (
            (self.lr > 0 and self.weight_decay >= 0, "--lr must be positive, --weight-decay >= 0"),
            ((self.limit or 1) >= 1, "--limit must be at least 1"),
            (self.bootstrap >= 0, "--bootstrap must be 0 (no intervals) or more"),
            (self.seed >= 0, "--seed must be 0 or more"),
        ):
            if not ok:
                raise MedxferError(message)


def options_from_dict(values: dict) -> DetectionOptions:
    known = {f.name for f in fields(DetectionOptions)}
    return DetectionOptions(**{k: v for k, v in values.items() if k in known})
