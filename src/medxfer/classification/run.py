"""One run as a pipeline of stages, each returning a typed value:

    validate -> data -> model -> resume -> inputs -> fit -> assess -> write

``train`` runs them all; ``evaluate`` shares the data stage. Everything that can fail on bad
input fails in the first two stages, before the run folder is touched.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from medxfer.cache import StoredRows
from medxfer.classification.assess import assess, metric_thresholds, unknown_counts
from medxfer.classification.card import write_model_card
from medxfer.classification.context import Assessment, Context, Inputs, Log
from medxfer.classification.inputs import prepare_inputs
from medxfer.classification.paired import paired_rows
from medxfer.classification.trained import TrainedModel
from medxfer.config import RunConfig
from medxfer.data.augment import get_augmentation
from medxfer.data.cache import default_cache_dir
from medxfer.data.options import DataOptions
from medxfer.data.prepared import prepare_data
from medxfer.device import Runtime, single_thread
from medxfer.engine import own_engine
from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import task_metrics
from medxfer.evaluation.thresholds import is_fixed
from medxfer.figures import reliability_diagram
from medxfer.models.classifier import XrayClassifier
from medxfer.models.factory import create_model, weights_digest
from medxfer.storage.folder import RunFolder
from medxfer.tasks import make_task
from medxfer.tracking import Handler
from medxfer.training.loop import ClassifierEpochs, Schedule, build_optimizer, epoch_line
from medxfer.training.parallel import data_parallel
from medxfer.training.probe import LogisticProbe
from medxfer.training.trainer import EpochState, Family, Trainer


# -- the pipeline --------------------------------------------------------------------------
def train(
    cfg: RunConfig,
    *,
    progress: bool = True,
    overwrite: bool = False,
    log: Log = print,
    handlers: Sequence[Handler] = (),
) -> RunFolder:
    """Train (or resume, or skip if finished) the run described by ``cfg``; return its folder.
    ``handlers`` (and those ``cfg.track`` asks for) hear of the start, each epoch and the end."""
    trainer = Trainer(
        FAMILY, cfg, log=log, progress=progress, overwrite=overwrite, handlers=handlers
    )
    return trainer.run()


class ClassificationJob:
    """One classification run for the trainer: data -> network -> (BN adapt, feature cache)
    -> epochs -> choices on validation, test metrics, files."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, log: Log) -> None:
        loading = time.perf_counter()
        self.ctx, self.log = load_data(cfg, runtime), log
        check_validation_choices(self.ctx)
        self.seconds = {"data": time.perf_counter() - loading}  # hashing, cold-cache decoding
        self.network = build_network(self.ctx)
        self.optimizer: torch.optim.Optimizer | None = None
        self.inputs: Inputs | None = None
        self.epochs: ClassifierEpochs | None = None
        # a linear head on cached features is too small a job to share between threads
        self.small = cfg.uses_feature_cache

    @property
    def trainable(self) -> torch.nn.Module:
        return self.inputs.trainable if self.inputs is not None else self.network

    def resolved(self) -> dict:
        return resolved(self.ctx)

    def start(self, resumed: bool) -> None:
        cfg = self.ctx.cfg
        if RunFolder(cfg.out).has_run():  # the folder's run is being continued
            _note_engine_change(RunFolder(cfg.out), self.ctx.runtime, self.log)
        self.inputs = prepare_inputs(self.ctx, self.network, adapted=resumed)
        self.seconds.update(self.inputs.seconds)  # features: augment and forward
        params = [p for p in self.inputs.trainable.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(
            params, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum
        )
        schedule = Schedule(
            self.optimizer, cfg.epochs, cfg.batch_size, cfg.select, cfg.seed, self.ctx.runtime.amp
        )
        runtime = self.ctx.runtime
        if runtime.shard.distributed:  # a worker of a data-parallel run of the whole network
            self.epochs = ClassifierEpochs(
                self.inputs.source,
                self.ctx.data,
                self.ctx.task,
                schedule,
                progress=runtime.progress and runtime.shard.primary,
                shard=runtime.shard,
                train_net=data_parallel(self.network, runtime.device, runtime.shard),
            )
            return
        epochs = LogisticProbe if cfg.head == "logreg" else ClassifierEpochs
        self.epochs = epochs(
            self.inputs.source, self.ctx.data, self.ctx.task, schedule, progress=runtime.progress
        )

    def _threads(self):
        return single_thread(self.ctx.runtime.device) if self.small else contextlib.nullcontext()

    def train_one_epoch(self, epoch: int) -> dict:
        with self._threads():
            return self.epochs.train_one_epoch(epoch)

    def evaluate(self, epoch: int) -> dict:
        with self._threads():
            return self.epochs.evaluate(epoch)

    def finish(self, folder: RunFolder, state: EpochState) -> dict:
        with self._threads():
            outcome = assess(self.ctx, self.network, self.inputs, state)
        outcome.metrics["seconds"] = dict(self.seconds)
        write(folder, outcome)
        return outcome.metrics

    def epoch_line(self, row: dict) -> str:
        return epoch_line(row)

    def random_state(self) -> dict:
        return self.epochs.random_state()

    def set_random_state(self, state: dict) -> None:
        self.epochs.set_random_state(state)


FAMILY = Family(
    "classification", RunConfig.from_dict, ClassificationJob, TrainedModel.from_file, paired_rows
)


def _note_engine_change(folder: RunFolder, runtime: Runtime, log: Log) -> None:
    before = folder.read_resolved().get("engine", "torch")
    if before != runtime.engine:
        log(
            f"{folder.path}: resuming under engine {runtime.engine} (was {before}); "
            "features are cached per engine"
        )


def load_data(cfg: RunConfig, runtime: Runtime, options: DataOptions | None = None) -> Context:
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    data = prepare_data(
        cfg.data,
        cfg.resolution,
        options or cfg.data_options(),
        cache_dir=cache_dir,
        progress=runtime.progress,
    )
    if data.task == "multiclass" and cfg.threshold is not None:
        raise MedxferError(
            f"{cfg.data}: --threshold {cfg.threshold}: this is a multi-class task "
            f"({len(data.classes)} classes), decided by the most probable class"
        )
    return Context(cfg, runtime, data, make_task(data.task, data.classes), cache_dir)


def check_validation_choices(ctx: Context) -> None:
    """A multi-label threshold rule (other than a number) is chosen per label on validation:
    each label needs both values among its known validation entries, checked before the
    folder is touched (binary validation sets are checked when they are carved)."""
    cfg, data = ctx.cfg, ctx.data
    rows = data.splits.get("val")
    needs_rule = ctx.task.uses_thresholds and not is_fixed(cfg.threshold_rule)
    if rows is None or data.task != "multilabel" or not needs_rule:
        return
    y = data.targets[rows]
    for j, name in enumerate(data.classes):
        known = y[:, j][~y[:, j].isnan()]
        if len(known.unique()) < 2:
            raise MedxferError(
                f"{cfg.data}: --threshold {cfg.threshold_rule}: label {name} has "
                f"{len(known)} known validation entries, not both values"
            )


def build_network(ctx: Context) -> XrayClassifier:
    torch.manual_seed(ctx.cfg.seed)
    spec = replace(ctx.cfg.model_spec, outputs=ctx.task.outputs)
    network = create_model(spec)
    return network.to(ctx.runtime.device, memory_format=torch.channels_last)


def write(folder: RunFolder, outcome: Assessment) -> None:
    """Every file atomically; metrics.json last, marking the run complete."""
    folder.write_predictions(outcome.predictions)
    outcome.model.save(folder.file(RunFolder.MODEL))
    folder.write_file(RunFolder.RELIABILITY, lambda tmp: reliability_diagram(outcome.curves, tmp))
    write_model_card(folder, outcome)
    folder.write_metrics(outcome.metrics)


# -- evaluate: a trained model on a dataset ---------------------------------------------
def evaluate(
    run: str | Path,
    data_location: str,
    *,
    split: str = "test",
    threshold: float | None = None,
    device_name: str = "auto",
    engine: str | None = None,
    progress: bool = True,
) -> dict:
    """Metrics of a finished run's model on ``split`` of a dataset. On the run's own data the
    run's splits are used (its validation fold, its subset); elsewhere the dataset's own.
    The run's data is recognised by its content (``data_key``), not its path: a relative
    ``--data`` seen from another directory, or a copy, is still the run's data, and its
    dataset-level validation images may have been in the run's training pool.
    ``engine`` None: the run's own ``--engine``."""
    model = TrainedModel.load(run)
    cut = model.operating_points(threshold)  # a bad --threshold fails before any data is read
    cfg = model.config
    runtime = Runtime.create(
        device_name,
        progress=progress,
        batch_size=cfg.eval_batch_size,
        engine=engine or own_engine(cfg.engine_request),
    )
    ctx, same = _run_data(model, data_location, runtime, _recorded_data_key(run))
    if tuple(ctx.task.classes) != tuple(model.classes):
        raise MedxferError(
            f"{data_location}: classes {list(ctx.task.classes)} differ from the model's "
            f"{list(model.classes)}"
        )
    if split not in ctx.data.splits:
        raise MedxferError(f"{data_location}: no {split!r} split")
    idx = ctx.data.splits[split]
    model.to(runtime.device, runtime.engine, ctx.cache_dir)
    pixels = ctx.data.pixels  # rows on disk are read a batch at a time
    chosen = pixels.subset(idx.numpy()) if isinstance(pixels, StoredRows) else pixels[idx]
    views = model.view_logits(chosen, runtime.batch_size)  # (V, N, ...): the run's --tta
    prob = model.task.mean_probabilities(views, model.temperature)
    scores = model.task.mean_scores(views, model.temperature)
    y = ctx.data.targets[idx].numpy()
    return {
        "run": str(run),
        "data": data_location,
        "split": split,
        "split_source": "the run's splits" if same else "the dataset's own splits",
        "task": model.task.name,
        "positive": ctx.data.positive,
        **task_metrics(
            model.task.name,
            y,
            prob,
            metric_thresholds(model.task, cut),
            model.classes,
            scores=scores,
        ),
    }


def _run_data(
    model: TrainedModel, location: str, runtime: Runtime, recorded: str | None
) -> tuple[Context, bool]:
    """The data at ``location`` with the run's splits if it is the run's data, else with the
    dataset's own; and which it was."""
    cfg = model.config

    def load(own_splits: bool) -> Context:
        options = replace(
            cfg.data_options(own_splits=own_splits),
            task=model.task.name,
            positive=model.classes[1] if model.task.name == "binary" else None,
        )
        return load_data(replace(cfg, data=str(location)), runtime, options)

    if Path(location).resolve() == Path(cfg.data).resolve():
        return load(False), True
    try:
        ctx = load(False)
    except MedxferError:  # the run's split options do not fit this data: not the run's
        return load(True), False
    if recorded is not None and ctx.data.data_key == recorded:
        return ctx, True
    return load(True), False


def _recorded_data_key(run) -> str | None:
    """The content key of the data a run was trained on (config.json), if it can be read."""
    path = Path(str(run))
    try:
        return RunFolder(path.parent if path.is_file() else path).read_resolved().get("data_key")
    except (OSError, ValueError, MedxferError):
        return None


def resolved(ctx: Context) -> dict:
    """The values a run resolved from its options and data, for config.json."""
    cfg, data, runtime = ctx.cfg, ctx.data, ctx.runtime
    augmentation = get_augmentation(cfg.augment)
    losses = {
        "binary": "binary cross-entropy on one logit, per-image weights N/(2 N_class) from the "
        "training split",
        "multiclass": "cross-entropy over K logits, class weights N/(K N_class) from the "
        "training split",
        "multilabel": "binary cross-entropy per label, weights N/(2 N_value) per label and "
        "value from the training split, over the known entries",
    }
    unknown = unknown_counts(data)
    return {
        "task": ctx.task.name,
        "classes": list(ctx.task.classes),
        "positive": data.positive,
        "color": data.color,
        "image_size": cfg.resolution,
        "val_fraction": cfg.validation_fraction,
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "augmentation": augmentation.describe() if augmentation else None,
        "loss": losses[ctx.task.name],
        "feature_cache": cfg.uses_feature_cache,
        "device": str(runtime.device),
        "engine": runtime.engine,
        "amp": str(runtime.amp) if runtime.amp else None,
        "evaluation_precision": "float32",
        "threads": torch.get_num_threads(),
        "weights": weights_digest(cfg.model_spec),
        "data_key": data.data_key,
        "labelling": data.imageset.labelling,
        "unknown_label_entries": (
            {name: sum(per[name] for per in unknown.values()) for name in data.classes}
            if unknown
            else None
        ),
    }
