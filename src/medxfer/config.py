"""The complete description of one run. Every option of ``medxfer train`` is a field here, so a
run folder's ``config.json`` is enough to rerun it. Importing this module loads no torch; every
value is checked when a config is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from medxfer.data.options import KERMANY_PATIENT_REGEX, MAX_PIXELS, DataOptions
from medxfer.errors import MedxferError
from medxfer.models.spec import DEFAULT_TAG, ModelSpec, default_image_size

DEFAULT_VAL_FRACTION = 0.1
TASK_CHOICES = ("auto", "binary", "multiclass", "multilabel")
COLOR_CHOICES = ("auto", "gray", "rgb")
AUGMENTATIONS = ("paper", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")
CALIBRATIONS = ("none", "temperature")
SELECTIONS = ("val_loss", "val_auc", "last")
TRACKERS = ("none", "mlflow")
SWITCHES = ("feature_cache", "amp", "skip_bad")  # must be real booleans ("no" reads as true)
ENGINES = ("auto", "torch", "onnxruntime")


@dataclass
class RunConfig:
    data: str
    out: str
    task: str = "auto"  # auto: binary for 2 classes, multiclass for more, multilabel for label sets
    arch: str = "mobilenet_v2"
    mode: str = "transfer"
    bn: str = "frozen"
    trainable_stages: int = 1
    normalize: str = "paper"
    weights: str | None = None
    weights_tag: str = DEFAULT_TAG
    image_size: int | None = None  # None: the architecture's own (299 for inception_v3)
    color: str = "auto"  # auto: gray when every image has R = G = B
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
    val_fraction: float | None = None  # None: 0.1, or no carving when --folds is given
    folds: int | None = None  # K-fold cross-validation over train+val ...
    fold: int | None = None  # ... with this fold as the validation set
    patient_regex: str = KERMANY_PATIENT_REGEX
    positive: str | None = None
    select: str = "val_loss"
    threshold: str | None = None  # None: 0.5 (binary, multilabel); multiclass takes none
    calibrate: str = "none"  # none | temperature (fitted on validation data)
    seed: int = 0
    device: str = "auto"
    engine: str = "auto"  # frozen forward passes: auto = onnxruntime on a CPU, torch elsewhere
    amp: bool = True
    skip_bad: bool = False
    bootstrap: int = 1000
    limit_per_class: int | None = None  # use at most this many images per class and split
    cache_dir: str | None = None
    max_pixels: int = MAX_PIXELS  # larger images are unreadable inputs (decompression bombs)
    track: str = "none"  # none | mlflow: log params, epochs, metrics and files to MLflow
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a store in the run folder

    # Fields that do not change what a run computes; a run may resume under other values.
    RESUMABLE_DIFFERENCES = (
        "out",
        "device",
        "engine",
        "cache_dir",
        "eval_batch_size",
        "track",
        "tracking_uri",
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def model_spec(self) -> ModelSpec:
        """The model without its head width (that comes from the data: see ``with_outputs``)."""
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
    def validation_fraction(self) -> float:
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.0 if self.folds else DEFAULT_VAL_FRACTION

    @property
    def threshold_rule(self) -> str:
        return self.threshold or "0.5"

    @property
    def engine_request(self) -> str:
        """The engine asked for, with one rule applied: ``auto`` keeps adapted BatchNorm
        statistics in PyTorch. Adaptation leaves near-zero variances that amplify float32
        rounding up to 1/sqrt(eps), and onnxruntime's kernels then drift ~3e-2 from float64
        where PyTorch stays ~2e-3 (measured); an explicit ``--engine onnxruntime`` is kept."""
        adapted = self.bn == "adapt" and self.model_spec.has_frozen_layers
        return "torch" if self.engine == "auto" and adapted else self.engine

    @property
    def uses_feature_cache(self) -> bool:
        return self.feature_cache and self.mode == "transfer" and self.bn in ("frozen", "adapt")

    def validate(self) -> None:
        """Refuse any value a run could not use, before anything is read or written."""
        from medxfer.evaluation.thresholds import check_threshold_rule

        self.model_spec.validate()
        if self.threshold is not None:
            check_threshold_rule(self.threshold)
        for name, allowed in (
            ("task", TASK_CHOICES),
            ("color", COLOR_CHOICES),
            ("augment", AUGMENTATIONS),
            ("optimizer", OPTIMIZERS),
            ("calibrate", CALIBRATIONS),
            ("select", SELECTIONS),
            ("track", TRACKERS),
            ("engine", ENGINES),
        ):
            if getattr(self, name) not in allowed:
                raise MedxferError(
                    f"--{name} {getattr(self, name)!r}: choose from {', '.join(allowed)}"
                )
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (
                self.batch_size >= 1 and (self.eval_batch_size or 1) >= 1,
                "batch sizes must be positive",
            ),
            (self.lr > 0, "--lr must be positive"),
            (self.views >= 1, "--views must be at least 1"),
            (self.resolution >= 32, "--image-size must be at least 32"),
            (self.bootstrap >= 0, "--bootstrap must be 0 or more"),
            (self.max_pixels >= 1, "--max-pixels must be positive"),
            (
                self.task != "multiclass" or self.threshold is None,
                "--threshold: a multi-class task decides by the most probable class; "
                "threshold rules apply to binary and multi-label tasks only",
            ),
            (
                self.task not in ("multiclass", "multilabel") or self.positive is None,
                f"--positive: a {self.task} task has no positive class",
            ),
            (
                not (self.folds and self.val_fraction),
                "--folds replaces --val-fraction: give one of them",
            ),
            (
                (self.folds is None) == (self.fold is None),
                "--folds K and --fold f go together",
            ),
            (
                self.folds is None or (self.folds >= 2 and 0 <= (self.fold or 0) < self.folds),
                f"--fold must be in 0..{(self.folds or 0) - 1} and --folds at least 2",
            ),
            (
                self.val_fraction is None or 0 <= self.val_fraction < 0.5,
                f"--val-fraction {self.val_fraction}: must be in [0, 0.5)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise MedxferError(message)
        self._validate_numbers()
        self.data_options().validate()

    def _validate_numbers(self) -> None:
        for name in SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise MedxferError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r}: must be true or false"
                )
        for ok, message in (
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be 0 or more"),
            (0 <= self.momentum < 1, f"--momentum {self.momentum}: must be in [0, 1)"),
            (self.seed >= 0, f"--seed {self.seed}: must be 0 or more"),
        ):
            if not ok:
                raise MedxferError(message)

    def data_options(self, *, own_splits: bool = False) -> DataOptions:
        """How this run reads its data; ``own_splits``: the dataset's splits as they are
        (another data set scored by a trained model)."""
        return DataOptions(
            task=None if self.task == "auto" else self.task,
            positive=self.positive,
            val_fraction=0.0 if own_splits else self.validation_fraction,
            folds=None if own_splits else self.folds,
            fold=None if own_splits else self.fold,
            patient_regex=self.patient_regex,
            seed=self.seed,
            skip_bad=self.skip_bad,
            limit_per_class=None if own_splits else self.limit_per_class,
            color=self.color,
            max_pixels=self.max_pixels,
        )

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


def check_types(options) -> None:
    """Every field of the options dataclass ``options`` holds a value of its annotated type
    (``int`` for ``int``, a number for ``float``, ``True``/``False`` for ``bool``, text for
    ``str``, a list of text for ``list[str]``; None where the annotation allows it): values
    from a study file, ``--set`` or the Python API are refused in one line otherwise."""
    import typing
    from dataclasses import fields

    hints = typing.get_type_hints(type(options))
    for f in fields(options):
        value, hint = getattr(options, f.name), hints[f.name]
        allowed = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if value is None and type(None) in typing.get_args(hint):
            continue
        if not any(_is_a(value, kind) for kind in allowed):
            names = " or ".join(_KIND_NAMES.get(k, "a list of names") for k in allowed)
            raise MedxferError(f"--{f.name.replace('_', '-')} {value!r}: must be {names}")


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _is_a(value, kind) -> bool:
    import typing

    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)
