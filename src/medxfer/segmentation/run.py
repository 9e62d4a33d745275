"""The segmentation family: one run on the trainer (``medxfer.training.trainer``).

data -> U-Net decoder on the backbone's taps -> epochs -> run folder: ``config.json``,
``history.csv``, ``predictions.csv`` (per validation and test image: ``split``, ``file``,
``patient`` and each metric), ``model.pt``, and ``metrics.json`` written last; the trainer
resumes an interrupted run from ``checkpoint.pt``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from medxfer.data.augment import get_augmentation
from medxfer.device import Runtime, to_input
from medxfer.errors import MedxferError
from medxfer.segmentation.data import SegmentationData, load_segmentation
from medxfer.segmentation.engine import Loader, encode_all, evaluate, train_one_epoch
from medxfer.segmentation.losses import SegmentationLoss
from medxfer.segmentation.metrics import paired_segmentation, per_image, summarize
from medxfer.segmentation.model import SegmentationModel
from medxfer.segmentation.options import SegmentationOptions, options_from_dict
from medxfer.segmentation.trained import TrainedSegmenter
from medxfer.storage.folder import RunFolder, known_patients
from medxfer.storage.model_file import ModelFile, read_model_file
from medxfer.training.loop import build_optimizer
from medxfer.training.trainer import EpochState, Family, Log, SeededJob, Trainer

TASK = "segmentation"
BN_ADAPT_IMAGES = 2048  # training images whose statistics ``--bn adapt`` uses (as precise BN)


def train_segmentation(
    options: SegmentationOptions, *, log: Callable[[str], None] = print, overwrite: bool = False
) -> Path:
    """Train (or resume, or find finished) the run; return its folder."""
    options.validate()
    return Trainer(FAMILY, options, log=log, overwrite=overwrite).run().path


class SegmentationJob(SeededJob):
    """One segmentation run for the trainer: U-Net decoder on the backbone's taps."""

    def __init__(self, options: SegmentationOptions, runtime: Runtime, log: Log) -> None:
        self.options, self.runtime, self.started = options, runtime, time.perf_counter()
        self.data = load_segmentation(options.data, options.image_size, labels=options.label_values)
        torch.manual_seed(options.seed)
        model = SegmentationModel(options.model_spec, self.data.num_classes, options.decoder_width)
        self.network = self.trainable = model.to(runtime.device)
        self.optimizer = build_optimizer(
            [p for p in model.parameters() if p.requires_grad],
            getattr(options, "optimizer", "adam"),
            options.lr,
            options.weight_decay,
            getattr(options, "momentum", 0.9),
        )
        self.criterion = SegmentationLoss(
            options.criterion, ce_weight=options.ce_weight, dice_weight=options.dice_weight
        )
        batch = runtime.batch_size
        self.loaders = {
            s: Loader(
                self.data.images,
                self.data.masks,
                idx,
                batch if s != "train" else options.batch_size,
            )
            for s, idx in self.data.splits.items()
        }
        self.cache: dict = {"seconds": 0.0, "bytes": 0, "encoded": {}}
        self.augmentation = get_augmentation(options.augment)

    def resolved(self) -> dict:
        return _resolved(self.options, self.data, self.network, self.runtime.device)

    def start(self, resumed: bool) -> None:
        """``--bn adapt`` (a resumed model has the statistics in its weights), then the cached
        encoder outputs of the clean val/test images."""
        if self.options.bn == "adapt" and not resumed:
            _adapt_batchnorm(self.network, self.data, self.runtime.device)
        if self.options.caches_features:
            t0 = time.perf_counter()
            # in float32, as every evaluation: metrics do not depend on amp
            encoded = {
                s: encode_all(self.network, self.loaders[s], self.runtime.device)
                for s in self.loaders
                if s != "train"
            }
            self.cache["encoded"] = encoded
            self.cache["seconds"] = time.perf_counter() - t0
            self.cache["bytes"] = sum(f.nbytes for feats in encoded.values() for f in feats)

    def train_one_epoch(self, epoch: int) -> dict:
        gen = torch.Generator().manual_seed(self.options.seed * 1000 + epoch)
        loss = train_one_epoch(
            self.network,
            self.criterion,
            self.optimizer,
            self.loaders["train"],
            device=self.runtime.device,
            generator=gen,
            aug=self.augmentation,
            amp=self.runtime.amp,
        )
        return {"train_loss": loss}

    def evaluate(self, epoch: int) -> dict:
        row: dict = {}
        for split in ("val", "test"):
            if split in self.loaders:
                loss, rows = self._score(split, hd95=False)
                row[f"{split}_loss"] = loss
                for name in ("dice", "iou", "pixel_accuracy"):
                    row[f"{split}_{name}"] = float(rows[name].mean())
        row["score"] = _selection_score({"epoch": epoch, **row}, self.options.select)
        return row

    def _score(self, split: str, *, hd95: bool = True):
        loss, pred = evaluate(
            self.network,
            self.criterion,
            self.loaders[split],
            device=self.runtime.device,
            encoded=self.cache["encoded"].get(split),
        )
        masks = self.data.masks[self.data.splits[split]]
        return loss, per_image(pred, masks, self.data.num_classes, hd95=hd95)

    def finish(self, folder: RunFolder, state: EpochState) -> dict:
        return _finish(self, folder, state)

    def epoch_line(self, row: dict) -> str:
        return _epoch_line(row)


def _paired(folders: tuple[RunFolder, RunFolder], resamples: int, seed: int) -> list:
    """Per-image differences of the two runs' test rows (``paired_segmentation``)."""
    pa, pb = (f.read_predictions("test") for f in folders)
    if not (pa.file.is_unique and pb.file.is_unique) or set(pa.file) != set(pb.file):
        raise MedxferError(f"not the same test images ({len(pa)} and {len(pb)})")
    pb = pb.set_index("file").loc[pa.file].reset_index()
    groups = known_patients(pa)
    return paired_segmentation(pa, pb, groups=groups, resamples=resamples, seed=seed)


FAMILY = Family(TASK, options_from_dict, SegmentationJob, TrainedSegmenter.from_file, _paired)


def load_segmentation_run(run: str | Path) -> tuple[SegmentationModel, ModelFile]:
    """The trained model of a finished run (eval mode, CPU) and its model file."""
    saved = read_model_file(run, TASK)
    return TrainedSegmenter.from_file(saved, Path(run)).model, saved


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


def _finish(job: SegmentationJob, folder: RunFolder, state: EpochState) -> dict:
    """Evaluate the selected weights on val and test; write predictions and model.pt."""
    options, data = job.options, job.data
    results, tables = {}, []
    for split in ("val", "test"):
        if split not in job.loaders:
            continue
        loss, rows = job._score(split)
        results[split] = (loss, rows)
        idx = data.splits[split].tolist()
        files = [data.files[i] for i in idx]
        patients = _patients(data, idx)
        tables.append(pd.DataFrame({"split": split, "file": files, "patient": patients, **rows}))
    folder.write_predictions(pd.concat(tables, ignore_index=True))
    model = job.network
    extra = {"labels": list(data.labels), "taps": [asdict(t) for t in model.taps]}
    ModelFile(TASK, asdict(options), model.state_dict(), extra).save(folder.file(RunFolder.MODEL))
    test_loss, test_rows = results["test"]
    return {
        "task": TASK,
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
            "used": bool(job.cache["encoded"]),
            "bytes": job.cache["bytes"],
            "seconds": job.cache["seconds"],
        },
        "device": str(job.runtime.device),
    }


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
