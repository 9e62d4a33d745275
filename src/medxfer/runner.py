"""Run one experiment end to end: data -> model -> training -> results folder."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medxfer import rundir
from medxfer.atomic import write_json, write_with
from medxfer.checkpoint import load_checkpoint_or_none
from medxfer.config import RunConfig
from medxfer.data.augment import get_augmentation
from medxfer.data.cache import default_cache_dir
from medxfer.data.prepared import PreparedData, prepare_data
from medxfer.errors import MedxferError
from medxfer.locking import run_folder_lock
from medxfer.models.classifier import XrayClassifier
from medxfer.models.factory import create_model, weights_digest
from medxfer.training.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
)
from medxfer.training.device import amp_dtype, select_device
from medxfer.training.features import (
    FeatureCache,
    adapt_batchnorm,
    extract_features,
    inference_batch_size,
)
from medxfer.training.loop import (
    FeatureSource,
    ImageSource,
    TrainState,
    build_optimizer,
    fit,
    predict_logits,
    sigmoid,
)
from medxfer.training.metrics import binary_metrics, bootstrap_ci, choose_threshold


def train(
    cfg: RunConfig,
    *,
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train (or resume, or skip if finished) the run described by ``cfg``; return its folder.

    Everything that can fail on bad input is checked before the run folder is touched. One
    process at a time trains into a folder; another one stops with an error naming its pid.
    """
    cfg.validate()
    with run_folder_lock(cfg.out):
        return _train_locked(cfg, progress=progress, overwrite=overwrite, log=log)


def _train_locked(
    cfg: RunConfig,
    *,
    progress: bool,
    overwrite: bool,
    log: Callable[[str], None],
) -> Path:
    out = Path(cfg.out)
    if rundir.is_complete(out) and not overwrite:
        _check_same(cfg, out)
        log(f"{out}: run already complete")
        return out
    device = select_device(cfg.device)
    amp = amp_dtype(device, cfg.amp)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    data = prepare_data(
        cfg.data,
        cfg.resolution,
        positive=cfg.positive,
        val_fraction=cfg.val_fraction,
        patient_regex=cfg.patient_regex,
        seed=cfg.seed,
        skip_bad=cfg.skip_bad,
        limit_per_class=cfg.limit_per_class,
        cache_dir=cache_dir,
        progress=progress,
    )
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model_spec).to(device, memory_format=torch.channels_last)

    state = TrainState()
    if overwrite and out.exists():
        shutil.rmtree(out)
    checkpoint = out / rundir.CHECKPOINT
    if (out / rundir.CONFIG).exists():  # an interrupted run of the same settings: resume it
        _check_same(cfg, out)
        saved = load_checkpoint_or_none(checkpoint)
        if saved is not None:
            state = _load_checkpoint(saved, model)
            log(f"{out}: resuming after epoch {state.epoch}")
    elif out.exists() and any(out.iterdir()):
        raise MedxferError(
            f"{out}: output folder is not empty and holds no medxfer run "
            "(use --overwrite to replace it)"
        )
    started = time.perf_counter()
    write_json(
        out / rundir.CONFIG,
        {
            "run": cfg.to_dict(),
            "resolved": _resolved(cfg, data, device, amp),
            "environment": rundir.environment(),
        },
    )

    source, feature_seconds = _make_source(
        cfg, model, data, device, amp, cache_dir, progress, adapted=state.epoch > 0
    )
    params = [p for p in source.net.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)

    def save(s: TrainState) -> None:
        _write_history(out, s.history)
        write_with(checkpoint, lambda tmp: torch.save(_checkpoint(s, model), tmp))

    state = fit(
        source,
        data.labels,
        data.splits,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        optimizer=optimizer,
        device=device,
        amp=amp,
        select=cfg.select,
        seed=cfg.seed,
        state=state,
        on_epoch_end=save,
        progress=progress,
        log=log,
    )
    model.load_state_dict(state.best_state, strict=False)
    _finish(
        cfg,
        out,
        model,
        source,
        data,
        state,
        device,
        amp,
        time.perf_counter() - started,
        feature_seconds,
    )
    checkpoint.unlink(missing_ok=True)
    return out


def evaluate(
    run: Path,
    data_location: str,
    *,
    split: str = "test",
    threshold: float | None = None,
    device_name: str = "auto",
    progress: bool = True,
) -> dict:
    """Metrics of a finished run's model on ``split`` of another (or the same) dataset."""
    model, saved = rundir.load_model(run)
    cfg = RunConfig.from_dict(saved["config"])
    device = select_device(device_name)
    data = prepare_data(
        data_location,
        cfg.resolution,
        positive=saved["positive"],
        skip_bad=cfg.skip_bad,
        cache_dir=cfg.cache_dir,
        progress=progress,
    )
    if split not in data.splits:
        raise MedxferError(f"{data_location}: no {split!r} split")
    model.to(device, memory_format=torch.channels_last)
    batch = inference_batch_size(cfg.eval_batch_size, device)
    source = ImageSource(model, data.pixels, device, None, cfg.seed, batch)
    logits = predict_logits(model, source, data.splits[split], device, None)
    prob = sigmoid(logits, saved.get("temperature", 1.0))
    cut = float(threshold) if threshold is not None else saved["threshold"]
    y = data.labels[data.splits[split]].numpy()
    return {
        "run": str(run),
        "data": data_location,
        "split": split,
        "positive": data.positive,
        **binary_metrics(y, prob, cut),
    }


def _make_source(
    cfg: RunConfig,
    model: XrayClassifier,
    data: PreparedData,
    device: torch.device,
    amp,
    cache_dir,
    progress: bool,
    adapted: bool,
):
    """The training source for this run, computing cached features if the backbone is frozen."""
    aug = get_augmentation(cfg.augment)
    batch = inference_batch_size(cfg.eval_batch_size, device)
    if cfg.bn == "adapt" and cfg.mode == "transfer" and not adapted:
        adapt_batchnorm(model, data.pixels, data.splits["train"], device, batch, progress)
    if not cfg.uses_feature_cache:
        return ImageSource(model, data.pixels, device, aug, cfg.seed, batch), 0.0

    started = time.perf_counter()
    cache = FeatureCache(cache_dir)
    base = {
        "arch": cfg.arch,
        "weights": weights_digest(cfg.model_spec),
        "bn": cfg.bn,
        "normalize": cfg.normalize,
        "resolution": cfg.resolution,
    }
    if cfg.bn == "adapt":
        base["adapted_on"] = data.index_key(data.splits["train"])

    def run(indices, view_seed=None):
        gen = torch.Generator().manual_seed(view_seed) if view_seed is not None else None
        return lambda: extract_features(
            model,
            data.pixels,
            indices,
            device,
            batch,
            aug if gen else None,
            gen,
            amp,
            progress=progress,
        )

    train_idx = data.splits["train"]
    # With augmentation, training reads only augmented views: the clean view is needed for
    # evaluation alone, which saves one backbone pass over the training images.
    clean_idx = torch.cat([data.splits[s] for s in ("val", "test") if s in data.splits])
    if aug is None:
        clean_idx = torch.cat([train_idx, clean_idx])
    clean = cache.get({**base, "view": "clean", "rows": data.index_key(clean_idx)}, run(clean_idx))
    views = None
    if aug is not None:
        views = torch.stack(
            [
                cache.get(
                    {
                        **base,
                        "view": v,
                        "augment": aug.describe(),
                        "seed": cfg.seed,
                        "rows": data.index_key(train_idx),
                    },
                    run(train_idx, view_seed=cfg.seed * 1000 + v),
                )
                for v in range(cfg.views)
            ]
        )
    source = FeatureSource(model.head, clean, clean_idx, views, train_idx, device, cfg.seed)
    return source, time.perf_counter() - started


def _finish(
    cfg: RunConfig,
    out: Path,
    model: XrayClassifier,
    source,
    data: PreparedData,
    state: TrainState,
    device,
    amp,
    seconds: float,
    feature_seconds: float,
) -> None:
    net = source.net
    val_idx, test_idx = data.splits.get("val"), data.splits["test"]
    val_logits = predict_logits(net, source, val_idx, device, amp) if val_idx is not None else None
    val_y = data.labels[val_idx].numpy() if val_idx is not None else None
    test_logits = predict_logits(net, source, test_idx, device, amp)
    test_y = data.labels[test_idx].numpy()
    temperature = 1.0
    if cfg.calibrate == "temperature":
        if val_logits is None:
            raise MedxferError("--calibrate temperature: needs a validation split")
        temperature = fit_temperature(val_logits, val_y)
    val_prob = sigmoid(val_logits, temperature) if val_logits is not None else None
    test_prob = sigmoid(test_logits, temperature)
    threshold = choose_threshold(cfg.threshold, val_y, val_prob)
    test = binary_metrics(test_y, test_prob, threshold)
    if cfg.bootstrap:
        test["ci95"] = bootstrap_ci(test_y, test_prob, threshold, cfg.bootstrap, cfg.seed)
    raw_test_prob = sigmoid(test_logits)
    calibration = {
        "method": cfg.calibrate,
        "temperature": temperature,
        "bins": 15,
        "test_ece_uncalibrated": expected_calibration_error(test_y, raw_test_prob),
        "test_ece": expected_calibration_error(test_y, test_prob),
    }
    if val_prob is not None:
        calibration["val_ece_uncalibrated"] = expected_calibration_error(val_y, sigmoid(val_logits))
        calibration["val_ece"] = expected_calibration_error(val_y, val_prob)
        calibration["val_nll_uncalibrated"] = binary_metrics(val_y, sigmoid(val_logits))["loss"]
        calibration["val_nll"] = binary_metrics(val_y, val_prob)["loss"]
    curves = {"test, uncalibrated": (test_y, raw_test_prob)}
    if temperature != 1.0:
        curves[f"test, temperature {temperature:.2f}"] = (test_y, test_prob)
    write_with(out / rundir.RELIABILITY, lambda tmp: reliability_diagram(curves, tmp))
    metrics = {
        "arch": cfg.arch,
        "mode": cfg.mode,
        "bn": cfg.bn,
        "positive": data.positive,
        "negative": data.negative,
        "threshold": threshold,
        "threshold_rule": cfg.threshold,
        "calibration": calibration,
        "selected_epoch": state.best_epoch,
        "selection": cfg.select,
        "test": test,
        "val": binary_metrics(val_y, val_prob, threshold) if val_prob is not None else None,
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "skipped_inputs": [{"file": f, "reason": r} for f, r in data.skipped],
        "seconds": {
            "total": seconds,
            "features": feature_seconds,
            "epochs": sum(r["seconds"] for r in state.history),
        },
        "device": str(device),
    }
    predictions = pd.DataFrame(
        {
            "file": [data.records[i].source for i in test_idx.tolist()],
            "label": [data.records[i].label for i in test_idx.tolist()],
            "probability": test_prob,
            "predicted": np.where(test_prob >= threshold, data.positive, data.negative),
        }
    )
    write_with(out / rundir.PREDICTIONS, lambda tmp: predictions.to_csv(tmp, index=False))
    saved = {
        "config": cfg.to_dict(),
        "state_dict": model.cpu().state_dict(),
        "threshold": threshold,
        "temperature": temperature,
        "positive": data.positive,
        "negative": data.negative,
        "classes": data.imageset.classes,
    }
    write_with(out / rundir.MODEL, lambda tmp: torch.save(saved, tmp))
    write_json(out / rundir.METRICS, metrics)  # written last: marks the run complete


def _resolved(cfg: RunConfig, data: PreparedData, device, amp) -> dict:
    aug = get_augmentation(cfg.augment)
    return {
        "image_size": cfg.resolution,
        "positive": data.positive,
        "classes": data.imageset.classes,
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "augmentation": aug.describe() if aug else None,
        "loss": "binary cross-entropy on one logit, per-image weights N/(2 N_class) "
        "from the training split",
        "feature_cache": cfg.uses_feature_cache,
        "device": str(device),
        "amp": str(amp) if amp else None,
        "threads": torch.get_num_threads(),
        "weights": weights_digest(cfg.model_spec),
        "data_key": data.data_key,
    }


def _write_history(out: Path, history: list[dict]) -> None:
    frame = pd.DataFrame(history)
    write_with(out / rundir.HISTORY, lambda tmp: frame.to_csv(tmp, index=False))


def _checkpoint(state: TrainState, model: XrayClassifier) -> dict:
    return {"state": state.__dict__, "model": model.state_dict()}


def _load_checkpoint(saved: dict, model: XrayClassifier) -> TrainState:
    model.load_state_dict(saved["model"])
    return TrainState(**saved["state"])


def _check_same(cfg: RunConfig, out: Path) -> None:
    previous = rundir.read_config(out)
    diff = cfg.differences(previous)
    if diff:
        raise MedxferError(
            f"{out}: holds a run with other settings ({', '.join(diff)}); "
            "use another --out or --overwrite"
        )
