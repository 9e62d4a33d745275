"""One run as a pipeline of stages, each returning a typed value:

    validate -> data -> model -> resume -> inputs -> fit -> assess -> write

``train`` runs them all; ``evaluate`` shares the data stage. Everything that can fail on bad
input fails in the first two stages, before the run folder is touched.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from medxfer.checkpoint import load_checkpoint_or_none
from medxfer.config import RunConfig
from medxfer.data.augment import get_augmentation
from medxfer.data.cache import default_cache_dir
from medxfer.data.options import DataOptions
from medxfer.data.prepared import prepare_data
from medxfer.device import Runtime, single_thread
from medxfer.engine import own_engine
from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import task_metrics
from medxfer.figures import reliability_diagram
from medxfer.locking import run_folder_lock
from medxfer.models.classifier import XrayClassifier
from medxfer.models.factory import create_model, weights_digest
from medxfer.run.assess import assess, metric_thresholds
from medxfer.run.card import write_model_card
from medxfer.run.context import Assessment, Context, Inputs, Log
from medxfer.run.folder import RunFolder
from medxfer.run.inputs import prepare_inputs
from medxfer.run.trained import TrainedModel
from medxfer.tasks import make_task
from medxfer.tracking import Handler, check_store, configured_handlers
from medxfer.training.loop import (
    Schedule,
    TrainState,
    build_optimizer,
    fit,
)


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
    folder = RunFolder(cfg.out)
    if folder.is_complete() and not overwrite:
        folder.check_same(cfg)
        log(f"{folder.path}: run already complete")
        return folder
    runtime = validate(cfg, progress)
    with run_folder_lock(folder.path):  # a second process on this folder stops here
        return _train_locked(folder, cfg, runtime, overwrite=overwrite, log=log, handlers=handlers)


def _train_locked(
    folder: RunFolder,
    cfg: RunConfig,
    runtime: Runtime,
    *,
    overwrite: bool,
    log: Log,
    handlers: Sequence[Handler],
) -> RunFolder:
    loading = time.perf_counter()
    ctx = load_data(cfg, runtime)
    loaded = time.perf_counter() - loading
    network = build_network(ctx)
    state = resume(folder, ctx, network, overwrite, log)
    started = time.perf_counter()
    folder.write_config(cfg, resolved(ctx))
    handlers = [*handlers, *configured_handlers(cfg)]
    for handler in handlers:
        handler.started(folder, cfg)
    try:
        inputs = prepare_inputs(ctx, network, adapted=state.epoch > 0)
        # a linear head on cached features is too small a job to share between threads
        small = (
            single_thread(runtime.device) if cfg.uses_feature_cache else contextlib.nullcontext()
        )
        with small:
            state = fit_stage(ctx, network, inputs, state, folder, log=log, handlers=handlers)
            inputs.trainable.load_state_dict(state.best_state)  # strict: the selected epoch
            outcome = assess(ctx, network, inputs, state)
        outcome.metrics["seconds"] = {
            "total": loaded + time.perf_counter() - started,
            "data": loaded,  # hashing, and decoding on a cold cache
            **inputs.seconds,  # features: augment and forward (zero on a warm feature cache)
            "epochs": sum(r["seconds"] for r in state.history),
        }
        write(folder, outcome)
        folder.file(RunFolder.CHECKPOINT).unlink(missing_ok=True)
        for handler in handlers:
            handler.finished(folder, outcome.metrics)
    except BaseException as error:  # interrupted or crashed: the observers hear of it
        for handler in handlers:
            handler.failed(folder, error)
        raise
    return folder


def validate(cfg: RunConfig, progress: bool) -> Runtime:
    """Files, tracking store and device; option values were checked when ``cfg`` was built."""
    cfg.model_spec.check_files()
    check_store(cfg.track, cfg.tracking_uri)
    return Runtime.create(
        cfg.device,
        amp=cfg.amp,
        batch_size=cfg.eval_batch_size,
        progress=progress,
        engine=cfg.engine_request,
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


def build_network(ctx: Context) -> XrayClassifier:
    torch.manual_seed(ctx.cfg.seed)
    spec = replace(ctx.cfg.model_spec, outputs=ctx.task.outputs)
    network = create_model(spec)
    return network.to(ctx.runtime.device, memory_format=torch.channels_last)


def resume(
    folder: RunFolder, ctx: Context, network: XrayClassifier, overwrite: bool, log: Log
) -> TrainState:
    """The state to continue from: a fresh one, or the last finished epoch of an interrupted
    run of the same settings in ``folder``."""
    if overwrite and folder.path.exists():
        shutil.rmtree(folder.path)
    if folder.is_foreign():
        raise MedxferError(
            f"{folder.path}: output folder is not empty and holds no medxfer run "
            "(use --overwrite to replace it)"
        )
    if not folder.has_run():
        return TrainState()
    folder.check_same(ctx.cfg)
    before = folder.read_resolved().get("engine", "torch")
    if before != ctx.runtime.engine:
        log(
            f"{folder.path}: resuming under engine {ctx.runtime.engine} (was {before}); "
            "features are cached per engine"
        )
    checkpoint = folder.file(RunFolder.CHECKPOINT)
    saved = load_checkpoint_or_none(checkpoint) if checkpoint.exists() else None
    if saved is None:  # none, or unreadable (warned): start afresh
        return TrainState()
    network.load_state_dict(saved["model"])
    state = TrainState(**saved["state"])
    log(f"{folder.path}: resuming after epoch {state.epoch}")
    return state


def fit_stage(
    ctx: Context,
    network: XrayClassifier,
    inputs: Inputs,
    state: TrainState,
    folder: RunFolder,
    *,
    log: Log,
    handlers: Sequence[Handler] = (),
) -> TrainState:
    """The epoch loop; after each epoch the history and a checkpoint of the whole network
    (a head-only source trains the network's own head) are written."""
    cfg = ctx.cfg
    params = [p for p in inputs.trainable.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)
    schedule = Schedule(
        optimizer, cfg.epochs, cfg.batch_size, cfg.select, cfg.seed, ctx.runtime.amp
    )

    def save(s: TrainState) -> None:
        folder.write_history(s.history)
        folder.write_file(
            RunFolder.CHECKPOINT,
            lambda tmp: torch.save({"state": s.__dict__, "model": network.state_dict()}, tmp),
        )
        for handler in handlers:
            handler.epoch_ended(s.history[-1])

    return fit(
        inputs.source,
        ctx.data,
        ctx.task,
        schedule,
        state,
        on_epoch_end=save,
        progress=ctx.runtime.progress,
        log=log,
    )


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
    logits = model.logits(ctx.data.pixels[idx], runtime.batch_size)
    prob = model.task.probabilities(logits, model.temperature)
    scores = model.task.scores(logits, model.temperature)
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
        "value from the training split",
    }
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
    }
