"""One segmentation run end to end: data -> model -> epochs -> run folder.

The run folder is classification's (``medxfer.run.folder``), kept by the skeleton that
detection shares (``medxfer.run.recorder``): ``config.json``, ``history.csv``,
``predictions.csv`` (per validation and test image: ``split``, ``file``, ``patient`` and each
metric), ``model.pt``, and ``metrics.json`` written last to mark the run complete;
``checkpoint.pt`` holds the last finished epoch while training, and rerunning the same
options resumes from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from medxfer.data.augment import get_augmentation
from medxfer.device import amp_dtype, inference_batch_size, select_device, to_input
from medxfer.run.folder import RunFolder, read_model_file
from medxfer.run.recorder import EpochState, Recorder, train_in_folder
from medxfer.segmentation.data import SegmentationData, load_segmentation
from medxfer.segmentation.engine import Loader, encode_all, evaluate, train_one_epoch
from medxfer.segmentation.losses import SegmentationLoss
from medxfer.segmentation.metrics import per_image, summarize
from medxfer.segmentation.model import SegmentationModel
from medxfer.segmentation.options import SegmentationOptions, options_from_dict

TASK = "segmentation"
BN_ADAPT_IMAGES = 2048  # training images whose statistics ``--bn adapt`` uses (as precise BN)


def train_segmentation(
    options: SegmentationOptions, *, log: Callable[[str], None] = print, overwrite: bool = False
) -> Path:
    """Train (or resume, or find finished) the run; return its folder."""
    return train_in_folder(options, TASK, _train, log=log, overwrite=overwrite)


def _train(options: SegmentationOptions, recorder: Recorder, log: Callable[[str], None]) -> None:
    started = time.perf_counter()
    device = select_device(options.device)
    amp = amp_dtype(device, options.amp)
    data = load_segmentation(options.data, options.image_size, labels=options.label_values)
    torch.manual_seed(options.seed)
    model = SegmentationModel(options.model_spec, data.num_classes, options.decoder_width)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=options.lr, weight_decay=options.weight_decay)
    state = recorder.resume(model, optimizer, log)
    if options.bn == "adapt" and state.epoch == 0:  # a resumed model has them in its weights
        _adapt_batchnorm(model, data, device)
    recorder.start(_resolved(options, data, model, device))
    criterion = SegmentationLoss(
        options.criterion, ce_weight=options.ce_weight, dice_weight=options.dice_weight
    )
    batch = inference_batch_size(options.eval_batch_size, device)
    loaders = {
        s: Loader(data.images, data.masks, idx, batch if s != "train" else options.batch_size)
        for s, idx in data.splits.items()
    }
    cache: dict = {"seconds": 0.0, "bytes": 0, "encoded": {}, "criterion": criterion}
    if options.caches_features:
        t0 = time.perf_counter()
        # in float32, as every evaluation (classification's rule): metrics do not depend on amp
        cache["encoded"] = {s: encode_all(model, loaders[s], device) for s in loaders}
        cache["encoded"].pop("train")  # training images are augmented afresh every epoch
        cache["seconds"] = time.perf_counter() - t0
        cache["bytes"] = sum(f.nbytes for feats in cache["encoded"].values() for f in feats)
    aug = get_augmentation(options.augment)
    for epoch in range(state.epoch + 1, options.epochs + 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(options.seed * 1000 + epoch)
        row: dict = {"epoch": epoch}
        row["train_loss"] = train_one_epoch(
            model,
            criterion,
            optimizer,
            loaders["train"],
            device=device,
            generator=gen,
            aug=aug,
            amp=amp,
        )
        for split in ("val", "test"):
            if split in loaders:
                loss, pred = evaluate(
                    model,
                    criterion,
                    loaders[split],
                    device=device,
                    encoded=cache["encoded"].get(split),
                )
                rows = per_image(pred, data.masks[data.splits[split]], data.num_classes, hd95=False)
                row[f"{split}_loss"] = loss
                for name in ("dice", "iou", "pixel_accuracy"):
                    row[f"{split}_{name}"] = float(rows[name].mean())
        row["seconds"] = time.perf_counter() - t0
        row["score"] = _selection_score(row, options.select)
        recorder.end_epoch(state, row, model=model, optimizer=optimizer)
        log(_epoch_line(row))  # after the checkpoint: an interruption here loses nothing
    model.load_state_dict(state.best_model)
    _finish(options, recorder, model, data, state=state, loaders=loaders, cache=cache)
    log(f"{options.out}: done in {time.perf_counter() - started:.1f} s")


def load_segmentation_run(run: str | Path) -> tuple[SegmentationModel, dict]:
    """The trained model of a finished run (eval mode, CPU) and its saved metadata."""
    saved = read_model_file(run, ("labels", "options", "state_dict"), "a segmentation model")
    options = options_from_dict(saved["options"])
    model = SegmentationModel(
        options.model_spec, len(saved["labels"]), options.decoder_width, load_weights=False
    )
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


def _adapt_batchnorm(model: SegmentationModel, data: SegmentationData, device) -> None:
    """``--bn adapt``: the frozen encoder's BatchNorm statistics re-estimated on the clean
    training images (classification's ``adapt_batchnorm``; weights untouched)."""
    from medxfer.training.features import adapt_batchnorm, frozen_norms

    rows = data.splits["train"][:BN_ADAPT_IMAGES]
    batches = (to_input(data.images[rows[i : i + 64]], device) for i in range(0, len(rows), 64))
    model.eval()
    with torch.inference_mode():
        adapt_batchnorm(frozen_norms(model), model.encode, batches)


def _selection_score(row: dict, select: str) -> float:
    """Higher is better: validation Dice, minus validation loss, or the epoch itself."""
    if select == "val_dice" and "val_dice" in row:
        return row["val_dice"]
    if select == "val_loss" and "val_loss" in row:
        return -row["val_loss"]
    return float(row["epoch"])  # "last", or no validation split


def _finish(
    options: SegmentationOptions,
    recorder: Recorder,
    model: SegmentationModel,
    data: SegmentationData,
    *,
    state: EpochState,
    loaders: dict[str, Loader],
    cache: dict,
) -> None:
    """Evaluate the selected weights on val and test and write the run's result files."""
    criterion = SegmentationLoss(
        options.criterion, ce_weight=options.ce_weight, dice_weight=options.dice_weight
    )
    device = next(model.parameters()).device
    results, tables = {}, []
    for split in ("val", "test"):
        if split not in loaders:
            continue
        loss, pred = evaluate(
            model, criterion, loaders[split], device=device, encoded=cache["encoded"].get(split)
        )
        rows = per_image(pred, data.masks[data.splits[split]], data.num_classes)
        results[split] = (loss, rows)
        idx = data.splits[split].tolist()
        files = [data.files[i] for i in idx]
        patients = _patients(data, idx)
        tables.append(pd.DataFrame({"split": split, "file": files, "patient": patients, **rows}))
    folder = recorder.folder
    folder.write_predictions(pd.concat(tables, ignore_index=True))
    saved = {
        "options": asdict(options),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "labels": list(data.labels),
        "taps": [asdict(t) for t in model.taps],
    }
    folder.write_file(RunFolder.MODEL, lambda tmp: torch.save(saved, tmp))
    test_loss, test_rows = results["test"]
    metrics = {
        "arch": options.arch,
        "mode": options.mode,
        "selected_epoch": state.best_epoch,
        "selection": options.select,
        "test": {
            "loss": test_loss,
            **summarize(
                test_rows,
                groups=_patients(data, data.splits["test"].tolist(), known_only=True),
                resamples=options.bootstrap,
                seed=options.seed,
            ),
        },
        "val": (
            {"loss": results["val"][0], **summarize(results["val"][1], resamples=0)}
            if "val" in results
            else None
        ),
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "feature_cache": {
            "used": bool(cache["encoded"]),
            "bytes": cache["bytes"],
            "seconds": cache["seconds"],
        },
        "device": str(device),
    }
    recorder.finish(state, metrics)


def _patients(data: SegmentationData, rows: list[int], *, known_only: bool = False):
    """The patient of each of ``rows``: the manifest's, else the image itself (one image per
    patient, as in lung_seg; written ``file:NAME`` as classification does). With
    ``known_only``, None when the manifest names no patients (images are the units)."""
    if data.patients is None:
        return None if known_only else [f"file:{data.files[i]}" for i in rows]
    return [data.patients[i] for i in rows]


def _resolved(options, data: SegmentationData, model: SegmentationModel, device) -> dict:
    aug = get_augmentation(options.augment)
    return {
        "labels": {str(v): i for i, v in enumerate(data.labels)},
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "taps": [asdict(t) for t in model.taps],
        "augmentation": aug.describe() if aug else None,
        "feature_cache": options.caches_features,
        "image_size": options.image_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def _epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.4f}"]
    parts += [f"{s} dice {row[f'{s}_dice']:.4f}" for s in ("val", "test") if f"{s}_dice" in row]
    return "  ".join(parts) + f"  ({row['seconds']:.1f} s)"
