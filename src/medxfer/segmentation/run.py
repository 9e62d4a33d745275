"""One segmentation run end to end: data -> model -> epochs -> run folder.

The run folder mirrors classification's (see ``medxfer.run.folder``): ``config.json``,
``history.csv``, ``predictions.csv`` (per test image), ``model.pt``, and ``metrics.json``
written last to mark the run complete; ``checkpoint.pt`` holds the last finished epoch while
training, and rerunning the same options resumes from it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from medxfer.atomic import write_json, write_with
from medxfer.data.augment import get_augmentation
from medxfer.device import amp_dtype, inference_batch_size, select_device
from medxfer.errors import MedxferError
from medxfer.run.folder import RunFolder, environment
from medxfer.segmentation.data import SegmentationData, load_segmentation
from medxfer.segmentation.engine import Loader, encode_all, evaluate, train_one_epoch
from medxfer.segmentation.losses import SegmentationLoss
from medxfer.segmentation.metrics import per_image, summarize
from medxfer.segmentation.model import SegmentationModel
from medxfer.segmentation.options import SegmentationOptions, options_from_dict


def train_segmentation(options: SegmentationOptions, *, log: Callable[[str], None] = print) -> Path:
    """Train (or resume, or find finished) the run; return its folder."""
    options.validate()
    out = Path(options.out)
    if RunFolder(out).is_complete():
        _check_same(options, out)
        log(f"{out}: run already complete")
        return out
    device = select_device(options.device)
    amp = amp_dtype(device, options.amp)
    data = load_segmentation(options.data, options.image_size, labels=options.label_values)
    torch.manual_seed(options.seed)
    model = SegmentationModel(options.model_spec, data.num_classes, options.decoder_width)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=options.lr, weight_decay=options.weight_decay)
    state = _start_or_resume(options, out, model, optimizer, log)
    started = time.perf_counter()
    write_json(
        out / RunFolder.CONFIG,
        {
            "run": asdict(options),
            "resolved": _resolved(options, data, model, device),
            "environment": environment(),
        },
    )
    criterion = SegmentationLoss(
        options.loss, ce_weight=options.ce_weight, dice_weight=options.dice_weight
    )
    batch = inference_batch_size(options.eval_batch_size, device)
    loaders = {
        s: Loader(data.images, data.masks, idx, batch if s != "train" else options.batch_size)
        for s, idx in data.splits.items()
    }
    cached = {}
    if options.caches_features:
        t0 = time.perf_counter()
        cached = {s: encode_all(model, loaders[s], device, amp) for s in loaders if s != "train"}
        state["cache_seconds"] = time.perf_counter() - t0
        state["cache_bytes"] = sum(f.nbytes for feats in cached.values() for f in feats)
    aug = get_augmentation(options.augment)

    for epoch in range(state["epoch"] + 1, options.epochs + 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(options.seed * 1000 + epoch)
        row = {"epoch": epoch}
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
                    encoded=cached.get(split),
                    amp=amp,
                )
                rows = per_image(pred, data.masks[data.splits[split]], data.num_classes, hd95=False)
                row[f"{split}_loss"] = loss
                for name in ("dice", "iou", "pixel_accuracy"):
                    row[f"{split}_{name}"] = float(rows[name].mean())
        row["seconds"] = time.perf_counter() - t0
        _advance(state, row, model, options.select)
        state["epoch"] = epoch
        _write_history(out, state["history"])
        write_with(
            out / RunFolder.CHECKPOINT,
            lambda tmp: torch.save(
                {"state": state, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                tmp,
            ),
        )
        log(_epoch_line(row))

    model.load_state_dict(state["best_state"])
    _finish(
        options,
        out,
        model,
        data,
        state=state,
        loaders=loaders,
        criterion=criterion,
        cached=cached,
        device=device,
    )
    (out / RunFolder.CHECKPOINT).unlink(missing_ok=True)
    log(f"{out}: done in {time.perf_counter() - started:.1f} s")
    return out


def load_segmentation_run(run: str | Path) -> tuple[SegmentationModel, dict]:
    """The trained model of a finished run (eval mode, CPU) and its saved metadata."""
    path = Path(run) / RunFolder.MODEL
    if not path.exists():
        raise MedxferError(f"{run}: no trained model ({RunFolder.MODEL}); is the run finished?")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    options = options_from_dict(saved["options"])
    model = SegmentationModel(
        options.model_spec, len(saved["labels"]), options.decoder_width, load_weights=False
    )
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


def _start_or_resume(options, out: Path, model, optimizer, log) -> dict:
    """A fresh training state, or the checkpointed one of an interrupted identical run."""
    state = {"epoch": 0, "history": [], "best_epoch": 0, "best_score": None, "best_state": None}
    if (out / RunFolder.CONFIG).exists():
        _check_same(options, out)
        checkpoint = out / RunFolder.CHECKPOINT
        if checkpoint.exists():
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state = saved["state"]
            log(f"{out}: resuming after epoch {state['epoch']}")
    elif out.exists() and any(out.iterdir()):
        raise MedxferError(f"{out}: output folder is not empty and holds no medxfer run")
    return state


def _advance(state: dict, row: dict, model: SegmentationModel, select: str) -> None:
    """Append the epoch and keep the weights of the best epoch by the selection rule."""
    state["history"].append(row)
    if select == "val_dice" and "val_dice" in row:
        score = -row["val_dice"]
    elif select == "val_loss" and "val_loss" in row:
        score = row["val_loss"]
    else:  # "last", or no validation split
        score = -row["epoch"]
    if state["best_score"] is None or score < state["best_score"]:
        state["best_score"], state["best_epoch"] = score, row["epoch"]
        state["best_state"] = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})


def _finish(
    options: SegmentationOptions,
    out: Path,
    model: SegmentationModel,
    data: SegmentationData,
    *,
    state: dict,
    loaders: dict[str, Loader],
    criterion: torch.nn.Module,
    cached: dict[str, list[torch.Tensor]],
    device: torch.device,
) -> None:
    """Evaluate the selected weights on val and test and write the run's result files."""
    results = {}
    for split in ("val", "test"):
        if split not in loaders:
            continue
        loss, pred = evaluate(
            model, criterion, loaders[split], device=device, encoded=cached.get(split)
        )
        rows = per_image(pred, data.masks[data.splits[split]], data.num_classes)
        results[split] = (loss, rows)
    test_loss, test_rows = results["test"]
    test_idx = data.splits["test"].tolist()
    table = pd.DataFrame({"file": [data.files[i] for i in test_idx], **test_rows})
    write_with(out / RunFolder.PREDICTIONS, lambda tmp: table.to_csv(tmp, index=False))
    saved = {
        "options": asdict(options),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "labels": list(data.labels),
        "taps": [asdict(t) for t in model.taps],
    }
    write_with(out / RunFolder.MODEL, lambda tmp: torch.save(saved, tmp))
    metrics = {
        "task": "segmentation",
        "arch": options.arch,
        "mode": options.mode,
        "selected_epoch": state["best_epoch"],
        "selection": options.select,
        "test": {
            "loss": test_loss,
            **summarize(test_rows, n_resamples=options.bootstrap, seed=options.seed),
        },
        "val": (
            {"loss": results["val"][0], **summarize(results["val"][1], n_resamples=0)}
            if "val" in results
            else None
        ),
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "feature_cache": {
            "used": bool(cached),
            "bytes": state.get("cache_bytes", 0),
            "seconds": state.get("cache_seconds", 0.0),
        },
        "seconds": {"epochs": sum(r["seconds"] for r in state["history"])},
        "device": str(device),
    }
    write_json(out / RunFolder.METRICS, metrics)  # written last: marks the run complete


def _resolved(options, data: SegmentationData, model: SegmentationModel, device) -> dict:
    aug = get_augmentation(options.augment)
    return {
        "labels": {str(v): i for i, v in enumerate(data.labels)},
        "split_sizes": {k: len(v) for k, v in data.splits.items()},
        "taps": [asdict(t) for t in model.taps],
        "augmentation": aug.describe() if aug else None,
        "feature_cache": options.caches_features,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def _write_history(out: Path, history: list[dict]) -> None:
    frame = pd.DataFrame(history)
    write_with(out / RunFolder.HISTORY, lambda tmp: frame.to_csv(tmp, index=False))


def _epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.4f}"]
    parts += [f"{s} dice {row[f'{s}_dice']:.4f}" for s in ("val", "test") if f"{s}_dice" in row]
    return "  ".join(parts) + f"  ({row['seconds']:.1f} s)"


def _check_same(options: SegmentationOptions, out: Path) -> None:
    import json

    path = out / RunFolder.CONFIG
    if not path.exists():
        raise MedxferError(f"{out}: not a medxfer run directory (no {RunFolder.CONFIG})")
    diff = options.differences(json.loads(path.read_text())["run"])
    if diff:
        raise MedxferError(
            f"{out}: holds a run with other settings ({', '.join(diff)}); use another --out"
        )
