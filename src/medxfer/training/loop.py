"""The epoch loop shared by every mode. What varies is the *source* of training inputs:
augmented images through the whole model, or cached backbone features through the head."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medxfer.data.augment import (
    Augmentation,
    apply_augmentation,
    draw_augmentation,
    take_rows,
    tta_view,
)
from medxfer.device import autocast, to_input
from medxfer.evaluation.metrics import task_metrics
from medxfer.models.classifier import HeadOnly
from medxfer.progress import track
from medxfer.shard import ONE, Shard
from medxfer.tasks import Task

AUX_LOSS_WEIGHT = 0.4  # Inception v3's auxiliary classifier, as in torchvision's references
GPU_ARRAY_BYTES = 8 << 30  # decoded images or features up to this size live on the GPU
CPU_ARRAY_BYTES = 512 << 20  # ... and in memory on the CPU (the main job's: 300 + 57 MB)
PRECISE_BN_IMAGES = 2048  # training images that re-estimate BatchNorm statistics each epoch


class ImageSource:
    """Training inputs are freshly augmented images; the whole model runs forward."""

    def __init__(
        self,
        model: nn.Module,
        pixels: torch.Tensor,
        device: torch.device,
        aug: Augmentation | None,
        *,
        seed: int,
        eval_batch_size: int,
        eval_views: int = 1,
    ) -> None:
        self.net = model
        self.eval_batch_size = eval_batch_size
        self.eval_views = eval_views  # --tta: fixed views every evaluation averages
        self.pixels = _on_device(pixels, device)
        self.device, self.aug = device, aug
        self.generator = torch.Generator().manual_seed(seed + 1)

    def train_inputs(self, idx: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The batch ``idx`` augmented, or only its positions ``keep`` (a data-parallel
        worker's part: the whole batch's augmentation is drawn, so its images get theirs)."""
        x = to_input(_rows(self.pixels, idx if keep is None else idx[keep]), self.device)
        if not self.aug:
            return x
        params = draw_augmentation(len(idx), self.aug, self.generator)
        return apply_augmentation(x, params if keep is None else take_rows(params, keep))

    def eval_inputs(self, idx: torch.Tensor, view: int = 0) -> torch.Tensor:
        return tta_view(to_input(_rows(self.pixels, idx), self.device), view)


def _on_device(array, device: torch.device):
    """Arrays that fit go into device memory once (no read or copy per batch): up to
    GPU_ARRAY_BYTES on a GPU, up to CPU_ARRAY_BYTES on the CPU, so memory stays bounded whatever
    the collection's size; larger ones stay on disk and are read by rows."""
    limit = GPU_ARRAY_BYTES if device.type == "cuda" else CPU_ARRAY_BYTES
    if array.nbytes > limit or (device.type != "cuda" and isinstance(array, torch.Tensor)):
        return array
    if not isinstance(array, torch.Tensor):
        array = torch.from_numpy(np.asarray(array))
    return array.to(device)


class FeatureSource:
    """Training inputs are cached backbone features: each epoch draws one of the K stored
    augmented views for every training image; evaluation uses the clean view.

    ``clean`` holds features of the records ``clean_index``; ``views`` (K arrays of (n, D)) those
    of ``train_index`` (None: train on the clean view, i.e. without augmentation); ``tta``
    (V - 1 arrays like ``clean``) those of the fixed test-time views after the identity. On a
    GPU they are copied there once; on the CPU each batch reads its rows (from disk, for a cache).
    """

    def __init__(
        self,
        head: HeadOnly,
        clean,
        clean_index: torch.Tensor,
        *,
        views: list | None,
        train_index: torch.Tensor,
        device: torch.device,
        seed: int,
        tta: list | None = None,
    ) -> None:
        self.net = head
        self.eval_batch_size = 4096
        self.device = device
        self.clean = _on_device(clean, device)
        self.tta = [_on_device(v, device) for v in tta or []]
        self.eval_views = 1 + len(self.tta)
        self.views = [_on_device(v, device) for v in views] if views is not None else None
        size = int(max(clean_index.max(), train_index.max())) + 1
        self.clean_row = _row_map(clean_index, size)
        self.view_row = _row_map(train_index, size)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def train_inputs(self, idx: torch.Tensor) -> torch.Tensor:
        if self.views is None:
            return self.eval_inputs(idx)
        view = torch.randint(len(self.views), (len(idx),), generator=self.generator)
        rows = self.view_row[idx]
        out = torch.empty(len(idx), self.views[0].shape[1], device=self.device)
        for k, features in enumerate(self.views):
            chosen = view == k
            if chosen.any():
                out[chosen.to(self.device)] = _rows(features, rows[chosen]).to(self.device)
        return out

    def eval_inputs(self, idx: torch.Tensor, view: int = 0) -> torch.Tensor:
        features = self.clean if view == 0 else self.tta[view - 1]
        return _rows(features, self.clean_row[idx]).to(self.device)


def _rows(array, index: torch.Tensor) -> torch.Tensor:
    """``array[index]`` for a tensor (on any device) or rows stored on disk."""
    if isinstance(array, torch.Tensor):
        return array[index.to(array.device)]
    return array[index]


def _row_map(index: torch.Tensor, size: int) -> torch.Tensor:
    """record index -> row in a feature array holding ``index`` (-1 where absent)."""
    rows = torch.full((size,), -1, dtype=torch.long)
    rows[index] = torch.arange(len(index))
    return rows


def build_optimizer(
    params, name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@torch.inference_mode()
def predict_logits(net: nn.Module, source, indices: torch.Tensor, view: int = 0) -> np.ndarray:
    """Logits of ``indices`` (float64) in test-time view ``view``, computed in float32 whatever
    the training precision: the numbers a run reports must be the ones ``evaluate`` and
    ``predict`` reproduce."""
    net.eval()
    out = [
        net(source.eval_inputs(chunk, view)).double().cpu()
        for chunk in indices.split(source.eval_batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


def view_logits(net: nn.Module, source, indices: torch.Tensor) -> np.ndarray:
    """Logits of every evaluation view of the source: (V, N, ...), V = 1 without ``--tta``."""
    return np.stack([predict_logits(net, source, indices, v) for v in range(source.eval_views)])


@torch.no_grad()
def reestimate_batchnorm(
    net: nn.Module,
    source,
    indices: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    shard: Shard = ONE,
) -> None:
    """Recompute the running statistics of every BatchNorm layer that trains, as a plain
    average over batches of (clean) training images: "precise BN" (Wu & Johnson 2021).

    Why: the momentum-0.1 running averages lag a network whose weights move fast. After a few
    dozen steps from scratch they still carry the initial variance 1 and the first batches, far
    above the true variance; in eval mode each layer then shrinks its output, the shrinkage
    compounds over the depth, and the logit comes out the same for every image. Layers kept
    frozen (eval mode while training) keep their statistics, which
    ``torch.optim.swa_utils.update_bn`` would reset.
    """
    net.train()
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.training and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))
    try:
        for chunk in indices[order[:PRECISE_BN_IMAGES]].split(batch_size):
            if len(chunk) > 1:  # a single image has no batch statistics
                with autocast(device, amp):  # a worker's rows; statistics of the whole batch
                    net(source.eval_inputs(chunk[shard.positions(len(chunk))]))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


@dataclass
class Schedule:
    """How to train: the optimiser and the loop's settings (one run's, from its config)."""

    optimizer: torch.optim.Optimizer
    epochs: int
    batch_size: int
    select: str
    seed: int
    amp: torch.dtype | None = None


class ClassifierEpochs:
    """One training epoch and one evaluation pass of a classifier, in the style of
    torchvision's references; ``medxfer.training.trainer.Trainer`` drives them.

    ``train_loss`` is the plain (unweighted) loss of the main output, the quantity reported for
    val/test too; ``train_objective`` is what the optimiser minimised (class-weighted, plus
    0.4 x the auxiliary loss for Inception v3). BatchNorm statistics of trainable layers are
    re-estimated after every epoch ("precise BN"), before evaluation.
    """

    def __init__(
        self,
        source,
        data,
        task: Task,
        schedule: Schedule,
        *,
        progress: bool = True,
        shard: Shard = ONE,
        train_net: nn.Module | None = None,
    ):
        """``shard`` and ``train_net`` (``parallel.data_parallel`` of the source's network):
        a data-parallel worker's part of every batch and the module it trains through."""
        self.source, self.data, self.task, self.schedule = source, data, task, schedule
        self.progress, self.shard = progress, shard
        self.train_net = train_net or source.net
        device = source.device
        self.train_idx = data.splits["train"]
        self.weights = task.class_weights(data.targets[self.train_idx]).to(device)
        self.order = torch.Generator().manual_seed(schedule.seed)
        self.scaler = torch.amp.GradScaler(device.type, enabled=schedule.amp == torch.float16)
        self.targets = data.targets.to(device)

    def random_state(self) -> dict:
        """Every random stream an epoch draws from: the batch order, the augmentation, and
        torch's global generators (dropout, stochastic depth)."""
        state = {"order": self.order.get_state(), "source": self.source.generator.get_state()}
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_random_state(self, state: dict) -> None:
        self.order.set_state(state["order"])
        self.source.generator.set_state(state["source"])
        if "torch" in state:  # checkpoints written before it was kept lack it
            torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def train_one_epoch(self, epoch: int) -> dict:
        net, device, schedule = self.source.net, self.source.device, self.schedule
        net.train()
        # Running sums stay on the device: no host synchronisation inside the epoch.
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # objective, loss, correct
        perm = self.train_idx[torch.randperm(len(self.train_idx), generator=self.order)]
        batches = track(
            _batches(perm, schedule.batch_size, net),
            f"epoch {epoch}/{schedule.epochs}",
            total=len(self.train_idx),
            size=len,
            enabled=self.progress,
            phase=False,
        )
        for chunk in batches:
            sums += self._step(chunk)
        reestimate_batchnorm(
            net,
            self.source,
            self.train_idx,
            batch_size=schedule.batch_size,
            device=device,
            amp=schedule.amp,
            shard=self.shard,
        )
        objective_sum, loss_sum, correct = self.shard.sum(sums).tolist()
        seen = len(self.train_idx)
        return {
            "train_loss": loss_sum / seen,
            "train_objective": objective_sum / seen,
            "train_accuracy": correct / seen,
        }

    def _step(self, chunk: torch.Tensor) -> torch.Tensor:
        """One optimiser step; returns (objective, loss) x batch size and the correct count."""
        task, device, optimizer = self.task, self.source.device, self.schedule.optimizer
        batch = self.targets[chunk.to(device)]
        if self.shard.distributed:
            return self._worker_step(chunk, batch)
        target = batch
        with autocast(device, self.schedule.amp):
            out = self.train_net(self.source.train_inputs(chunk))
        logits, aux = out if isinstance(out, tuple) else (out, None)
        objective = task.loss(logits, target, self.weights)
        if aux is not None:  # Inception v3 auxiliary head
            objective = objective + AUX_LOSS_WEIGHT * task.loss(aux, target, self.weights)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        per_row = task.decisions_per_row(target)  # multilabel: known label entries per row
        with torch.no_grad():
            return torch.stack(
                [
                    objective.detach().double(),
                    task.loss(logits.detach(), target).double(),
                    task.correct(logits.detach(), target).double() / per_row,
                ]
            ) * torch.tensor([len(chunk), len(chunk), 1.0], device=device, dtype=torch.float64)

    def _worker_step(self, chunk: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """A data-parallel worker's part of one step: its rows' summed loss over the whole
        batch's normaliser, times the worker count (DistributedDataParallel averages the
        gradients), so the step equals one process's on the whole batch. Returns this
        worker's share of the epoch sums."""
        task, device, optimizer = self.task, self.source.device, self.schedule.optimizer
        keep = self.shard.positions(len(chunk))
        target = batch[keep.to(device)]
        with autocast(device, self.schedule.amp), _own_random_draws(self.shard):
            out = self.train_net(self.source.train_inputs(chunk, keep))
        logits, aux = out if isinstance(out, tuple) else (out, None)
        weighted = task.loss_sum(logits, target, self.weights)
        if aux is not None:
            weighted = weighted + AUX_LOSS_WEIGHT * task.loss_sum(aux, target, self.weights)
        share = weighted / task.loss_normalizer(batch, self.weights)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(share * self.shard.world).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        with torch.no_grad():
            plain = task.loss_sum(logits.detach(), target) / task.loss_normalizer(batch)
            correct = task.correct(logits.detach(), target) / task.decisions_per_row(batch)
            return torch.stack(
                [share.detach().double() * len(chunk), plain.double() * len(chunk), correct]
            ).to(device, torch.float64)

    def evaluate(self, epoch: int) -> dict:
        """Val/test metrics at the default operating point, and the selection score."""
        row: dict = {}
        for split in ("val", "test"):
            if split in self.data.splits:
                row.update(_split_row(self.source.net, self.source, self.data, self.task, split))
        row["score"] = _selection_score({"epoch": epoch, **row}, self.schedule.select)
        return row


@contextlib.contextmanager
def _own_random_draws(shard: Shard):
    """Dropout masks of its own for every worker, reproducibly: all take the same seed from
    torch's generator (identical on every worker, and what a checkpoint keeps) plus their
    rank. A network with dropout thus trains on N workers as on one only in distribution."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + shard.rank)
        yield


def _batches(perm: torch.Tensor, batch_size: int, net: nn.Module) -> list[torch.Tensor]:
    """The epoch's batches; a last batch of one image joins the one before it when the
    network normalises with batch statistics (BatchNorm cannot train on a single value)."""
    chunks = list(perm.split(batch_size))
    single_last = len(chunks) > 1 and len(chunks[-1]) == 1
    if single_last and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules()
    ):
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def _split_row(net: nn.Module, source, data, task: Task, split: str) -> dict:
    """Scalar metrics of one split at the default operating point, as history columns."""
    idx = data.splits[split]
    logits = view_logits(net, source, idx)  # (V, N, ...): V test-time views, 1 by default
    metrics = task_metrics(
        task.name,
        data.targets[idx].numpy(),
        task.mean_probabilities(logits),
        None,
        task.classes,
        scores=task.mean_scores(logits),
    )
    return {
        f"{split}_{k}": v
        for k, v in metrics.items()
        if v is None or (isinstance(v, (int, float)) and k not in ("threshold", "n"))
    }


def _selection_score(row: dict, select: str) -> float:
    """Higher is better. Without a validation split every rule falls back to the last epoch."""
    if select == "val_loss" and "val_loss" in row:
        return -row["val_loss"]
    auc = row.get("val_roc_auc", row.get("val_macro_roc_auc"))
    if select == "val_auc" and auc is not None:
        return auc
    return float(row["epoch"])


def epoch_line(row: dict) -> str:
    parts = [
        f"epoch {row['epoch']:>3}",
        f"train loss {row['train_loss']:.4f}",
        f"acc {row['train_accuracy']:.3f}",
    ]
    for split in ("val", "test"):
        if f"{split}_loss" in row:
            auc = row.get(f"{split}_roc_auc", row.get(f"{split}_macro_roc_auc"))
            # multi-label tasks have no accuracy: their line shows the macro F1
            name = "acc" if f"{split}_accuracy" in row else "macro_f1"
            score = row.get(f"{split}_accuracy", row.get(f"{split}_macro_f1"))
            parts.append(
                f"{split} loss {row[f'{split}_loss']:.4f} {name} "
                f"{'None' if score is None else format(score, '.3f')} "
                f"auc {auc if auc is None else round(auc, 3)}"
            )
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)
