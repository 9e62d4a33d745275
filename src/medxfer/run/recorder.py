"""The epochs of a segmentation or detection run in its run folder: resume, record, finish.

Classification has its staged pipeline (``medxfer.run.pipeline``); segmentation and detection
share this smaller skeleton, with the same rules: one process per folder (``run_folder_lock``),
a non-empty folder that holds no run is never written into, other settings in the same folder
are refused, a damaged checkpoint means a fresh start (``load_checkpoint_or_none``), every file
is written atomically and ``metrics.json`` last.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medxfer.checkpoint import load_checkpoint_or_none
from medxfer.errors import MedxferError
from medxfer.locking import run_folder_lock
from medxfer.run.folder import RunFolder

# options that change where a run's files go or how fast it runs, not what it computes
NOT_COMPARED = ("out", "device", "eval_batch_size")


@dataclass
class EpochState:
    """What a checkpoint carries besides the weights: the epochs so far and the best one."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float | None = None  # higher is better
    best_model: dict | None = None
    seconds: float = 0.0


def train_in_folder(options, task: str, body: Callable, *, log, overwrite: bool = False) -> Path:
    """Validate ``options`` (a dataclass with ``out``), then, unless the run is already
    complete there, hold the folder's lock and call ``body(options, recorder, log)``.
    ``overwrite`` replaces what the folder holds, but only once the lock is held and the body
    has read its data (``Recorder.resume``): a bad option or bad data never costs a run."""
    options.validate()
    recorder = Recorder(options.out, task, asdict(options), overwrite=overwrite)
    if recorder.finished():
        log(f"{options.out}: run already complete")
    else:
        with run_folder_lock(recorder.folder.path):
            body(options, recorder, log)
    return Path(options.out)


class Recorder:
    """The run folder ``out`` of one ``task`` ("segmentation", "detection") with ``options``
    (what ``config.json`` stores under ``run``)."""

    def __init__(
        self, out: str | Path, task: str, options: dict[str, Any], *, overwrite: bool = False
    ) -> None:
        self.folder = RunFolder(out)
        self.task = task
        self.options = options
        self.overwrite = overwrite
        self.started = time.perf_counter()
        self.epoch_seconds = 0.0  # epochs trained by this process

    def finished(self) -> bool:
        """Whether this run is already complete here (refused if the folder holds another)."""
        if self.overwrite or not self.folder.is_complete():
            return False
        self.folder.check_options(self.options, NOT_COMPARED)
        return True

    def resume(self, model, optimizer, log: Callable[[str], None]) -> EpochState:
        """A fresh state, or that of the last finished epoch of an interrupted run of the same
        options (weights and optimizer restored in place). Called with the lock held and the
        data read: with ``overwrite``, the folder is emptied here."""
        if self.overwrite and self.folder.path.exists():
            shutil.rmtree(self.folder.path)
        if self.folder.is_foreign():
            raise MedxferError(
                f"{self.folder}: output folder is not empty and holds no medxfer run"
            )
        if not self.folder.has_run():
            return EpochState()
        self.folder.check_options(self.options, NOT_COMPARED)
        saved = load_checkpoint_or_none(self.folder.file(RunFolder.CHECKPOINT))
        if saved is None or "optimizer" not in saved:
            return EpochState()
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = EpochState(**saved["state"])
        log(f"{self.folder}: resuming after epoch {state.epoch}")
        return state

    def start(self, resolved: dict[str, Any]) -> None:
        self.folder.write_task_config(self.task, self.options, resolved)

    def end_epoch(self, state: EpochState, row: dict, *, model, optimizer) -> None:
        """Record ``row`` (its ``score``, higher better, picks the best epoch; it is not kept
        in the history), then write the history and a checkpoint."""
        import torch

        score = row.pop("score")
        state.history.append(row)
        state.epoch, state.seconds = row["epoch"], state.seconds + row["seconds"]
        self.epoch_seconds += row["seconds"]
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_epoch = score, row["epoch"]
            state.best_model = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
        self.folder.write_history(state.history)
        saved = {"state": asdict(state), "model": model.state_dict()}
        saved["optimizer"] = optimizer.state_dict()
        self.folder.write_file(RunFolder.CHECKPOINT, lambda tmp: torch.save(saved, tmp))

    def finish(self, state: EpochState, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json`` (the run is complete) and drop the checkpoint. ``seconds``:
        ``epochs`` (all of them, also those before a resume) and ``total``, which adds what
        this process spent outside epochs (data, caches, final evaluation, intervals)."""
        outside = time.perf_counter() - self.started - self.epoch_seconds
        seconds = {"epochs": state.seconds, "total": state.seconds + outside}
        self.folder.write_metrics({"task": self.task, **metrics, "seconds": seconds})
        self.folder.file(RunFolder.CHECKPOINT).unlink(missing_ok=True)
