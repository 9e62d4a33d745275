"""Run options as typed dataclasses whose fields carry their own help, choices and bounds
(timm's typed configs are the model), composed from shared parts:

    RunLocation (data, out) -> BackboneOptions (arch, mode, weights) -> TrainingOptions
    (epochs, batch, optimiser, seed, device, bootstrap, tracking) -> LayerOptions (frozen
    layers' BatchNorm and normalisation, precision, evaluation batch)

``RunConfig`` (classification) and ``SegmentationOptions`` build on ``LayerOptions``,
``DetectionOptions`` on ``TrainingOptions``; each family redeclares a field to change its
default or choices. ``check_options`` validates any of them from the metadata, and the command
line builds every ``train`` command's flags from the same metadata. Imports no torch.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from medxfer.errors import MedxferError
from medxfer.models.spec import BN_POLICIES, DEFAULT_TAG, MODES, NORMALIZATIONS

OPTIMIZERS = ("adam", "adamw", "sgd")
TRACKERS = ("none", "mlflow")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field with its help text, its allowed ``choices`` and its bounds
    (``min <= value <= max``, ``above < value < below``)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    meta |= {"above": above, "below": below}
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(options: Any) -> None:
    """Every field of the options dataclass ``options`` holds a value of its annotated type
    (``int`` for ``int``, a number for ``float``, ``True``/``False`` for ``bool``: a study's
    "no" would read as true; text for ``str``, a list of text for ``list[str]``; None where the
    annotation allows it), one of its choices and within its bounds; else one line."""
    hints = typing.get_type_hints(type(options))
    for f in fields(options):
        value = getattr(options, f.name)
        _check_type(f.name, value, hints[f.name])
        if value is not None:
            _check_meta(f, value)


def _check_type(name: str, value: Any, hint: Any) -> None:
    allowed = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is None and type(None) in typing.get_args(hint):
        return
    if not any(_is_a(value, kind) for kind in allowed):
        names = " or ".join(_KIND_NAMES.get(k, "a list of names") for k in allowed)
        raise MedxferError(f"{flag(name)} {value!r}: must be {names}")


def _check_meta(f: Field, value: Any) -> None:
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every bound
        raise MedxferError(f"{flag(f.name)} {value}: must be a finite number")
    if meta.get("choices") and value not in meta["choices"]:
        raise MedxferError(f"{flag(f.name)} {value!r}: choose from {', '.join(meta['choices'])}")
    bounds = (
        ("min", lambda v, b: v >= b, "at least"),
        ("max", lambda v, b: v <= b, "at most"),
        ("above", lambda v, b: v > b, "above"),
        ("below", lambda v, b: v < b, "below"),
    )
    for key, holds, words in bounds:
        bound = meta.get(key)
        if bound is not None and not holds(value, bound):
            raise MedxferError(f"{flag(f.name)} {value}: must be {words} {bound}")


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _is_a(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def from_values(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` built from stored options, refusing names it does not know."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MedxferError(f"unknown run option(s): {', '.join(unknown)}")
    return cls(**values)


# -- the shared parts -----------------------------------------------------------------------
@dataclass
class RunLocation:
    data: str = option(help="the dataset: a folder, a manifest or an archive")
    out: str = option(help="run folder to write")


@dataclass
class BackboneOptions(RunLocation):
    arch: str = option("mobilenet_v2", "torchvision classifier name (e.g. resnet18) or timm/NAME")
    mode: str = option(
        "transfer",
        "transfer (frozen ImageNet backbone, new head), scratch, finetune, or partial",
        choices=MODES,
    )
    weights: str | None = option(None, "a local weights file instead of the standard download")


@dataclass
class TrainingOptions(BackboneOptions):
    epochs: int = option(20, "training epochs", min=1)
    batch_size: int = option(64, "training batch size", min=1)
    optimizer: str = option("adam", "adam, adamw or sgd", choices=OPTIMIZERS)
    lr: float = option(1e-3, "learning rate", above=0.0)
    weight_decay: float = option(0.0, "weight decay", min=0.0)
    bootstrap: int = option(
        1000, "bootstrap resamples for the 95%% intervals of test metrics (0: none)", min=0
    )
    seed: int = option(0, "seeds model init, data order, augmentation and splits", min=0)
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    track: str = option(
        "none",
        "experiment tracking: none or mlflow (params, every epoch, test metrics, files)",
        choices=TRACKERS,
    )
    tracking_uri: str | None = option(
        None,
        "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite store mlflow.db in "
        "the run folder)",
    )


@dataclass
class LayerOptions(TrainingOptions):
    bn: str = option(
        "frozen",
        "BatchNorm of frozen layers: frozen (eval statistics), adapt (re-estimated once on the "
        "training images), train (batch statistics)",
        choices=BN_POLICIES,
    )
    trainable_stages: int = option(1, "partial mode: how many of the last stages train", min=1)
    normalize: str = option(
        "paper",
        "paper (mean 0.5, std 0.5) or imagenet (the weights' own mean/std)",
        choices=NORMALIZATIONS,
    )
    momentum: float = option(0.9, "SGD momentum", min=0.0, below=1.0)
    amp: bool = option(True, "mixed precision on CUDA (bf16 where supported)")
    eval_batch_size: int | None = option(
        None,
        "batch size for evaluation and feature extraction (default: 8 on CPU, 256 on GPU)",
        min=1,
    )


__all__ = [
    "DEFAULT_TAG",
    "BackboneOptions",
    "LayerOptions",
    "RunLocation",
    "TrainingOptions",
    "check_options",
    "default_of",
    "flag",
    "from_values",
    "option",
]
