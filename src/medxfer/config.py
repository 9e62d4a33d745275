"""The complete description of one run. Every option of ``medxfer train`` is a field here, so a
run folder's ``config.json`` is enough to rerun it. Importing this module loads no torch; every
value is checked when a config is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from medxfer.data.options import KERMANY_PATIENT_REGEX, MAX_PIXELS, DataOptions
from medxfer.errors import MedxferError
from medxfer.models.spec import DEFAULT_TAG, POOLS, ModelSpec, default_image_size
from medxfer.options import LayerOptions, check_options, from_values, option

DEFAULT_VAL_FRACTION = 0.1
TASK_CHOICES = ("auto", "binary", "multiclass", "multilabel")
COLOR_CHOICES = ("auto", "gray", "rgb")
AUGMENTATIONS = ("paper", "none")
CALIBRATIONS = ("none", "temperature")
SELECTIONS = ("val_loss", "val_auc", "last")
HEADS = ("paper", "logreg", "mlp")
FEATURES = ("last", "stages")
ENGINES = ("auto", "torch", "onnxruntime")


@dataclass
class RunConfig(LayerOptions):
    """A classification run: the shared parts (``medxfer.options``) and its own options."""

    task: str = option(
        "auto",
        "auto (binary for 2 classes, multiclass for more, multilabel for label sets), binary, "
        "multiclass or multilabel; segmentation or detection run `medxfer segment train` or "
        "`medxfer detect train` (see their --help for their options)",
        choices=TASK_CHOICES,
    )
    weights_tag: str = option(DEFAULT_TAG, "torchvision weights enum member")
    image_size: int | None = option(
        None, "working resolution (default: 224, 299 for inception_v3)", min=32
    )
    color: str = option(
        "auto", "auto (gray when every image has R = G = B), gray or rgb", choices=COLOR_CHOICES
    )
    augment: str = option("paper", "augmentation preset: paper or none", choices=AUGMENTATIONS)
    feature_cache: bool = option(
        True, "frozen backbones: compute features once per view, train the head on them"
    )
    views: int = option(2, "augmented views per training image kept in the feature cache", min=1)
    head: str = option(
        "paper",
        "paper (a linear layer trained with the optimizer, the paper's), logreg (L2 logistic "
        "or softmax regression on standardised cached features, one strength C per epoch from "
        "1e-4 to 1e2, the best chosen on validation) or mlp (one hidden layer of 512)",
        choices=HEADS,
    )
    pool: str | None = option(
        None,
        "transformers (timm ViTs, DINOv2): cls (the class token), mean (of the patch tokens) "
        "or both (concatenated); default: the model's own pooling",
        choices=POOLS,
    )
    tta: int = option(
        1,
        "test-time augmentation: the mean probability over N fixed views (1: the image alone; "
        "2 adds its mirror, 3-7 90%% crops at the centre and corners, 8 the mirrored centre "
        "crop), for validation, test, evaluate and predict",
        min=1,
        max=8,
    )
    features: str = option(
        "last",
        "last (the pooled output of the last backbone stage) or stages (the pooled outputs of "
        "the last three stages, concatenated)",
        choices=FEATURES,
    )
    val_fraction: float | None = option(
        None,
        "carve this fraction of train (by patient, stratified) into validation (default 0.1; "
        "not with --folds)",
    )
    folds: int | None = option(
        None, "K-fold cross-validation over train+val, grouped by patient (with --fold)"
    )
    fold: int | None = option(None, "which fold (0..K-1) is the validation set")
    patient_regex: str = option(
        KERMANY_PATIENT_REGEX, "regex whose first group is the patient id in a file name"
    )
    positive: str | None = option(
        None, "positive class (default: PNEUMONIA, else the second class in sorted order)"
    )
    select: str = option(
        "val_loss",
        "best-epoch rule on validation data: val_loss, val_auc or last",
        choices=SELECTIONS,
    )
    threshold: str | None = option(
        None,
        "operating point chosen on validation: 0.5 (default), youden, or sens=0.95; per label "
        "for multilabel tasks; not for multiclass tasks",
    )
    calibrate: str = option(
        "none",
        "temperature: fit a temperature on validation logits (Guo et al. 2017)",
        choices=CALIBRATIONS,
    )
    engine: str = option(
        "auto",
        "who runs frozen networks forward (features, evaluation, predict): auto (onnxruntime on "
        "a CPU, torch elsewhere), torch or onnxruntime",
        choices=ENGINES,
    )
    skip_bad: bool = option(
        False, "leave unreadable images out (listed in metrics.json) instead of stopping"
    )
    limit_per_class: int | None = option(
        None, "use at most N images per class in each split (quick looks, tests)"
    )
    cache_dir: str | None = option(
        None,
        "cache of decoded images and features (default: $MEDXFER_CACHE or ~/.cache/medxfer)",
    )
    max_pixels: int = option(
        MAX_PIXELS, "refuse images with more pixels than this (decompression bombs)", min=1
    )
    workers: int = option(
        0,
        "data-parallel workers on Ray Train (0: this process alone): a frozen backbone's "
        "feature extraction is shared out, a trained one runs DistributedDataParallel",
        min=0,
    )
    address: str | None = option(
        None,
        "the Ray cluster --workers runs on: auto (the one started on this machine) or "
        "HOST:PORT (default: a local one for this run)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.threshold, int | float) and not isinstance(self.threshold, bool):
            self.threshold = str(self.threshold)  # a study file's ``threshold = 0.5``
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
            head="mlp" if self.head == "mlp" else "linear",
            features=self.features,
            pool=self.pool,
            image_size=self.resolution,
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

        check_options(self)
        self.model_spec.validate()
        if self.threshold is not None:
            check_threshold_rule(self.threshold)
        for ok, message in self._cross_checks():
            if not ok:
                raise MedxferError(message)
        self.data_options().validate()

    def _cross_checks(self) -> list[tuple[bool, str]]:
        """Rules between options (one value alone is checked from its field's metadata)."""
        folds = self.folds or 0
        return [
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
            ((self.folds is None) == (self.fold is None), "--folds K and --fold f go together"),
            (
                self.folds is None or (folds >= 2 and 0 <= (self.fold or 0) < folds),
                f"--fold must be in 0..{folds - 1} and --folds at least 2",
            ),
            (
                self.head != "logreg" or self.uses_feature_cache,
                "--head logreg fits the cached features of a frozen backbone: it needs --mode "
                "transfer with --bn frozen or adapt and the feature cache on",
            ),
            (self.address is None or self.workers > 0, "--address goes with --workers N"),
            (
                self.val_fraction is None or 0 <= self.val_fraction < 0.5,
                f"--val-fraction {self.val_fraction}: must be in [0, 0.5)",
            ),
        ]

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
        return from_values(cls, values)
