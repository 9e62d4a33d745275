"""One run as a pipeline of stages, each returning a typed value:

    validate -> data -> model -> resume -> inputs -> fit -> assess -> write

``train`` runs them all; ``evaluate`` shares the data stage. Everything that can fail on bad
input fails in the first two stages, before the run folder is touched.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from medxfer.checkpoint import load_checkpoint_or_none
from medxfer.config import RunConfig
from medxfer.data.augment import get_augmentation
from medxfer.data.cache import DECODER_VERSION, default_cache_dir
from medxfer.data.options import DataOptions
from medxfer.data.prepared import PreparedData, prepare_data
from medxfer.device import Runtime, single_thread
from medxfer.engine import GRAPH_VERSION, make_engine, own_engine
from medxfer.errors import MedxferError
from medxfer.evaluation.calibration import expected_calibration_error, fit_temperature
from medxfer.evaluation.intervals import bootstrap_intervals
from medxfer.evaluation.metrics import scalar_metrics, task_metrics
from medxfer.evaluation.thresholds import choose_threshold
from medxfer.figures import reliability_diagram
from medxfer.locking import run_folder_lock
from medxfer.models.classifier import XrayClassifier
from medxfer.models.factory import create_model, weights_digest
from medxfer.run.card import write_model_card
from medxfer.run.folder import RunFolder
from medxfer.run.trained import TrainedModel
from medxfer.tasks import Task, make_task
from medxfer.tracking import Handler, configured_handlers
from medxfer.training.features import (
    FeatureCache,
    View,
    adapt_batchnorm,
    extract_features,
    frozen_norms,
)
from medxfer.training.loop import (
    FeatureSource,
    ImageSource,
    Schedule,
    TrainState,
    build_optimizer,
    fit,
    predict_logits,
)

Log = Callable[[str], None]


@dataclass
class Context:
    """What every stage after ``data`` reads: the run's options, where it computes, its data."""

    cfg: RunConfig
    runtime: Runtime
    data: PreparedData
    task: Task
    cache_dir: Path


@dataclass
class Inputs:
    """What the loop trains on: images through the whole network, or cached features through
    the head; ``trainable`` is the module whose state the loop saves and restores."""

    source: ImageSource | FeatureSource
    seconds: dict[str, float] = field(default_factory=dict)  # features: augment, forward

    @property
    def trainable(self) -> nn.Module:
        return self.source.net


@dataclass
class Assessment:
    """The selected model and everything written about it."""

    model: TrainedModel
    metrics: dict
    predictions: pd.DataFrame
    curves: dict[str, tuple[np.ndarray, np.ndarray]]


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
    """Files and device; option values were checked when ``cfg`` was built."""
    cfg.model_spec.check_files()
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


def prepare_inputs(ctx: Context, network: XrayClassifier, adapted: bool) -> Inputs:
    """Adapt frozen BatchNorm statistics (``--bn adapt``), then the training source: cached
    backbone features when the backbone is frozen, images otherwise."""
    cfg, data, runtime = ctx.cfg, ctx.data, ctx.runtime
    if cfg.bn == "adapt" and cfg.model_spec.has_frozen_layers and not adapted:
        _adapt(network, data, runtime)
    augmentation = get_augmentation(cfg.augment)
    if not cfg.uses_feature_cache:
        source = ImageSource(
            network,
            data.pixels,
            runtime.device,
            augmentation,
            seed=cfg.seed,
            eval_batch_size=runtime.batch_size,
        )
        return Inputs(source)
    started = time.perf_counter()
    seconds = {"augment": 0.0, "forward": 0.0}
    clean, clean_idx, views = _cached_features(ctx, network, augmentation, seconds)
    source = FeatureSource(
        network.head,
        clean,
        clean_idx,
        views=views,
        train_index=data.splits["train"],
        device=runtime.device,
        seed=cfg.seed,
    )
    return Inputs(source, {"features": time.perf_counter() - started, **seconds})


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


def assess(ctx: Context, network: XrayClassifier, inputs: Inputs, state: TrainState) -> Assessment:
    """Everything chosen on validation data (temperature, operating points), then the test
    metrics with intervals, the predictions of both splits, and the trained model."""
    cfg, data, task = ctx.cfg, ctx.data, ctx.task
    splits = {s: data.splits[s] for s in ("val", "test") if s in data.splits}
    logits = {s: predict_logits(inputs.trainable, inputs.source, idx) for s, idx in splits.items()}
    truth = {s: data.targets[idx].numpy() for s, idx in splits.items()}
    temperature = _temperature(cfg, task, logits.get("val"), truth.get("val"))
    prob = {s: task.probabilities(z, temperature) for s, z in logits.items()}
    scores = {s: task.scores(z, temperature) for s, z in logits.items()}  # ranks without ties
    thresholds = _thresholds(cfg, task, truth.get("val"), prob.get("val"))
    cut = _one(task, thresholds)
    test = task_metrics(
        task.name, truth["test"], prob["test"], cut, task.classes, scores=scores["test"]
    )
    if cfg.bootstrap:
        test["ci95"], test["interval_method"] = _intervals(
            ctx, truth["test"], prob["test"], scores["test"], thresholds
        )
    model = TrainedModel(network.cpu().eval(), cfg, task, thresholds, temperature, data.color)
    calibration, curves = _calibration(cfg, task, logits, truth, temperature)
    metrics = {
        "task": task.name,
        "classes": list(task.classes),
        "arch": cfg.arch,
        "mode": cfg.mode,
        "bn": cfg.bn,
        "positive": data.positive,
        "negative": data.negative,
        "thresholds": thresholds,
        "threshold": thresholds[0] if task.name == "binary" else None,
        "threshold_rule": cfg.threshold_rule if task.uses_thresholds else None,
        "calibration": calibration,
        "selected_epoch": state.best_epoch,
        "selection": cfg.select,
        "test": test,
        "val": (
            task_metrics(
                task.name, truth["val"], prob["val"], cut, task.classes, scores=scores["val"]
            )
            if "val" in prob
            else None
        ),
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "class_counts": _class_counts(data, task),
        "skipped_inputs": [{"file": f, "reason": r} for f, r in data.skipped],
        "device": str(ctx.runtime.device),
        "evaluation_precision": "float32",
    }
    predictions = pd.concat(
        [
            _prediction_rows(ctx, s, splits[s], model, prob=prob[s], scores=scores[s])
            for s in splits
        ],
        ignore_index=True,
    )
    return Assessment(model, metrics, predictions, curves)


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
            model.task.name, y, prob, _one(model.task, cut), model.classes, scores=scores
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
        return load_data(replace_data(cfg, location), runtime, options)

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


def replace_data(cfg: RunConfig, location: str) -> RunConfig:
    return replace(cfg, data=str(location))


# -- helpers --------------------------------------------------------------------------------
def _adapt(network: XrayClassifier, data: PreparedData, runtime: Runtime) -> None:
    """``--bn adapt``: the frozen layers' BatchNorm statistics from every training pixel."""
    norms = frozen_norms(network)
    network.eval()
    batches = (data.pixels[chunk] for chunk in data.splits["train"].split(runtime.batch_size))
    from medxfer.device import to_input

    with torch.inference_mode():
        adapt_batchnorm(
            norms,
            lambda pixels: network.features(to_input(pixels, runtime.device)),
            batches,
        )


def _cached_features(ctx: Context, network: XrayClassifier, augmentation, seconds: dict):
    """Clean features of val/test (and train when not augmenting), and K augmented views of
    train, from the feature cache."""
    cfg, data, runtime = ctx.cfg, ctx.data, ctx.runtime
    cache = FeatureCache(ctx.cache_dir)
    base = _feature_key(ctx)
    engine = make_engine(runtime.engine, network, ctx.cache_dir)
    train_idx = data.splits["train"]
    # With augmentation, training reads only augmented views: the clean view is needed for
    # evaluation alone, which saves one backbone pass over the training images.
    clean_idx = torch.cat([data.splits[s] for s in ("val", "test") if s in data.splits])
    if augmentation is None:
        clean_idx = torch.cat([train_idx, clean_idx])
    clean = cache.get(
        {**base, "view": "clean", "dtype": "float32", "rows": data.index_key(clean_idx)},
        lambda: extract_features(
            network, data.pixels, clean_idx, runtime, engine=engine, seconds=seconds
        ),
    )
    if augmentation is None:
        return clean, clean_idx, None
    views = []
    for v in range(cfg.views):
        view = View(augmentation, cfg.seed * 1000 + v)
        key = {
            **base,
            "view": v,
            "augment": augmentation.describe(),
            "seed": cfg.seed,
            "dtype": str(runtime.amp or "float32"),
            "rows": data.index_key(train_idx),
        }
        views.append(
            cache.get(
                key,
                lambda view=view: extract_features(
                    network, data.pixels, train_idx, runtime, view, engine=engine, seconds=seconds
                ),
            )
        )
    return clean, clean_idx, torch.stack(views)


def _feature_key(ctx: Context) -> dict:
    """Everything that changes a backbone feature, so a shared cache never serves features
    made under other settings."""
    import timm
    import torchvision

    cfg = ctx.cfg
    key = {
        "arch": cfg.arch,
        "weights": weights_digest(cfg.model_spec),
        "bn": cfg.bn,
        "normalize": cfg.normalize,
        "resolution": cfg.resolution,
        "color": ctx.data.color,
        "decoder": DECODER_VERSION,
        "libraries": [torch.__version__, torchvision.__version__, timm.__version__],
        "device": ctx.runtime.device.type,
        "engine": ctx.runtime.engine,
    }
    if ctx.runtime.engine == "onnxruntime":  # its kernels and our export shape the features
        import onnxruntime

        key["libraries"].append(f"onnxruntime {onnxruntime.__version__}")
        key["graph"] = GRAPH_VERSION
    if cfg.bn == "adapt":
        key["adapted_on"] = ctx.data.index_key(ctx.data.splits["train"])
    return key


def _temperature(cfg: RunConfig, task: Task, val_logits, val_y) -> float:
    if cfg.calibrate != "temperature":
        return 1.0
    if val_logits is None:
        raise MedxferError("--calibrate temperature: needs a validation split")
    if task.name == "multilabel":
        return fit_temperature(np.ravel(val_logits), np.ravel(val_y))
    return fit_temperature(val_logits, val_y)


def _thresholds(cfg: RunConfig, task: Task, val_y, val_prob) -> list[float] | None:
    """Operating points chosen on validation data: one (binary) or one per label."""
    if not task.uses_thresholds:
        return None
    rule = cfg.threshold_rule
    if task.name == "binary":
        return [choose_threshold(rule, val_y, val_prob)]
    return [
        choose_threshold(
            rule,
            None if val_y is None else val_y[:, j],
            None if val_prob is None else val_prob[:, j],
        )
        for j in range(task.outputs)
    ]


def _one(task: Task, thresholds: list[float] | None):
    """Thresholds as ``task_metrics`` takes them: one number (binary) or one per label."""
    if thresholds is None:
        return None
    return thresholds[0] if task.name == "binary" else np.asarray(thresholds)


def _intervals(
    ctx: Context, y: np.ndarray, prob: np.ndarray, scores: np.ndarray, thresholds
) -> tuple[dict, dict]:
    """Bootstrap intervals of the test metrics, resampling patients where they are known."""
    task, cfg = ctx.task, ctx.cfg
    patients = [ctx.data.patients[i] for i in ctx.data.splits["test"].tolist()]
    known = any(not p.startswith("file:") for p in patients)
    names = scalar_metrics(task.name)
    cut = _one(task, thresholds)

    def score(rows: np.ndarray) -> dict:
        m = task_metrics(task.name, y[rows], prob[rows], cut, task.classes, scores=scores[rows])
        return {k: m[k] for k in names}

    result = bootstrap_intervals(
        score,
        len(y),
        groups=np.asarray(patients) if known else None,
        resamples=cfg.bootstrap,
        seed=cfg.seed,
    )
    method = {k: v for k, v in result.items() if k != "intervals"}
    return result["intervals"], method


def _calibration(cfg: RunConfig, task: Task, logits: dict, truth: dict, temperature: float):
    """ECE (15 bins) before and after the temperature, on what the task decides with: the
    positive-class probability (binary), the top label (multiclass), every label entry
    (multilabel). Returns the summary and the curves of the reliability diagram."""

    def view(split: str, t: float) -> tuple[np.ndarray, np.ndarray]:
        p = task.probabilities(logits[split], t)
        y = truth[split]
        if task.name == "multiclass":
            return (p.argmax(1) == y).astype(np.float64), p.max(1)
        return np.ravel(y).astype(np.float64), np.ravel(p)

    summary = {
        "method": cfg.calibrate,
        "temperature": temperature,
        "bins": 15,
        "measured_on": {
            "binary": "positive-class probability",
            "multiclass": "top label",
            "multilabel": "every label entry",
        }[task.name],
        "test_ece_uncalibrated": expected_calibration_error(*view("test", 1.0)),
        "test_ece": expected_calibration_error(*view("test", temperature)),
    }
    if "val" in logits:
        summary["val_ece_uncalibrated"] = expected_calibration_error(*view("val", 1.0))
        summary["val_ece"] = expected_calibration_error(*view("val", temperature))
        val_loss = task_metrics(
            task.name, truth["val"], task.probabilities(logits["val"]), None, task.classes
        )["loss"]
        summary["val_nll_uncalibrated"] = val_loss
        summary["val_nll"] = task_metrics(
            task.name,
            truth["val"],
            task.probabilities(logits["val"], temperature),
            None,
            task.classes,
        )["loss"]
    curves = {"test, uncalibrated": view("test", 1.0)}
    if temperature != 1.0:
        curves[f"test, temperature {temperature:.2f}"] = view("test", temperature)
    return summary, curves


def _class_counts(data: PreparedData, task: Task) -> dict[str, dict[str, int]]:
    """Images per class in each split (a multi-label image counts once per label it has)."""
    counts = {}
    for split, idx in data.splits.items():
        targets = data.targets[idx]
        if task.name == "multilabel":
            per = targets.sum(0).round().long().tolist()
        else:
            per = torch.bincount(targets, minlength=len(task.classes)).tolist()
        counts[split] = dict(zip(task.classes, per, strict=True))
    return counts


def _prediction_rows(
    ctx: Context,
    split: str,
    idx: torch.Tensor,
    model: TrainedModel,
    *,
    prob: np.ndarray,
    scores: np.ndarray,
) -> pd.DataFrame:
    """One row per image: split, file, patient, true label, probabilities, ranking scores
    (exact where a probability rounds to 0 or 1; see ``Task.scores``), decision."""
    task, data = ctx.task, ctx.data
    rows = idx.tolist()
    truth = data.targets[idx].numpy()
    frame = pd.DataFrame(
        {
            "split": split,
            "file": [data.records[i].source for i in rows],
            "patient": [data.patients[i] for i in rows],
            "label": task.names(truth.astype(np.int64)),
        }
    )
    if task.name == "binary":
        frame["probability"], frame["score"] = prob, scores
    else:
        for j, name in enumerate(task.classes):
            frame[f"probability_{name}"] = prob[:, j]
        for j, name in enumerate(task.classes):
            frame[f"score_{name}"] = scores[:, j]
    frame["predicted"] = task.names(model.decide(prob))
    return frame


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
