"""One run machinery for every task, with injected handlers (as MONAI's engines).

A task family (``medxfer.families``) builds a :class:`Job` from a run's options: its data,
network and optimizer, and torchvision-reference-short ``train_one_epoch`` / ``evaluate`` /
``finish``. The :class:`Trainer` owns everything else, once: the folder's lock, refusing other
settings, resume from the last finished epoch (a damaged checkpoint is a fresh start),
``config.json`` (always with the task family), device and precision (``Runtime``), progress
lines, tracking handlers, the best-epoch rule, and ``metrics.json`` written last.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

import torch
from torch import nn

from medxfer.device import Runtime
from medxfer.errors import MedxferError
from medxfer.locking import run_folder_lock
from medxfer.shard import ONE, Shard
from medxfer.storage.checkpoint import load_checkpoint_or_none
from medxfer.storage.folder import RunFolder
from medxfer.tracking import Handler, check_store, configured_handlers

Log = Callable[[str], None]


@dataclass
class EpochState:
    """What a checkpoint carries besides the weights: the epochs so far and the best one."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float | None = None  # higher is better
    best_model: dict | None = None  # the selected epoch's ``Job.trainable`` state
    seconds: float = 0.0  # all epochs, those before a resume too


class Job(Protocol):
    """One run of a family, built from its options and data; the trainer drives it."""

    network: nn.Module  # what a checkpoint saves and a resume restores
    trainable: nn.Module  # whose state the best-epoch rule keeps (the head on cached features)
    optimizer: torch.optim.Optimizer | None  # built by ``start``

    def resolved(self) -> dict[str, Any]: ...  # values resolved from options and data

    def start(self, resumed: bool) -> None: ...  # after resume: BN adapt, caches, optimizer

    def train_one_epoch(self, epoch: int) -> dict[str, Any]: ...

    def evaluate(self, epoch: int) -> dict[str, Any]: ...  # the row's val/test part + "score"

    def finish(self, folder: RunFolder, state: EpochState) -> dict[str, Any]: ...  # metrics

    def epoch_line(self, row: dict[str, Any]) -> str: ...

    def random_state(self) -> dict | None: ...  # generators a resume must continue

    def set_random_state(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Family:
    """A task family's parts, by name (``medxfer.families`` holds the three): what the trainer
    builds a run from, what reads its model file back, what pairs two of its runs."""

    name: str
    read_options: Callable[[dict[str, Any]], Any]  # config.json's ``run`` -> options
    job: Callable[[Any, Runtime, Log], Job]  # (options, runtime, log) -> a job, data read
    load: Callable[[Any, Any], Any]  # (ModelFile, path) -> the trained model
    # (two RunFolders, bootstrap resamples, seed) -> a row per metric (MedxferError: unpaired)
    paired: Callable[[tuple, int, int], list[dict]]


class SeededJob:
    """Defaults for a job whose every random draw comes from the seed and the epoch: nothing
    to start after a resume, no generator to carry in the checkpoint."""

    def start(self, resumed: bool) -> None:
        pass

    def random_state(self) -> dict | None:
        return None

    def set_random_state(self, state: dict) -> None:
        pass


# options that change where a run's files go, how fast it runs or who hears of it: a run
# may resume (or be found finished) under other values of these
# (``workers``: N workers compute what one does, to float rounding)
NOT_COMPARED = (
    "out",
    "device",
    "engine",
    "cache_dir",
    "eval_batch_size",
    "track",
    "tracking_uri",
    "workers",
    "address",
)


def differences(options: Any, before: Any) -> list[str]:
    """The fields of two options objects of one class that change what a run computes."""
    return [
        f.name
        for f in fields(options)
        if f.name not in NOT_COMPARED and getattr(options, f.name) != getattr(before, f.name)
    ]


@dataclass
class Trainer:
    """Trains (resumes, or finds finished) one run of ``family`` with ``options``."""

    family: Family
    options: Any  # the family's validated options dataclass, with ``out``
    log: Log = print
    progress: bool = False
    overwrite: bool = False
    handlers: Sequence[Handler] = ()
    # a data-parallel worker: all train, rank 0 alone evaluates and writes (the others read
    # the folder's checkpoint to resume from the same epoch)
    shard: Shard = ONE

    def __post_init__(self) -> None:
        self.folder = RunFolder(self.options.out)

    def run(self) -> RunFolder:
        if self.folder.is_complete() and not self.overwrite:
            self.check_same()
            self.log(f"{self.folder.path}: run already complete")
            return self.folder
        runtime = self._runtime()  # files, tracking store, device: before anything is written
        if not self.shard.primary:  # rank 0 holds the lock for the whole run
            self._train(runtime)
            return self.folder
        with run_folder_lock(self.folder.path):  # a second process on this folder stops here
            self._train(runtime)
        return self.folder

    def check_same(self) -> None:
        """Refuse to continue (or report as done) a run of other settings in this folder."""
        held = self.folder.family()
        if held != self.family.name:
            raise MedxferError(
                f"{self.folder.path}: holds a {held} run, not a {self.family.name} one; "
                "use another --out or --overwrite"
            )
        before = self.family.read_options(self.folder.read_options())
        diff = differences(self.options, before)
        if diff:
            raise MedxferError(
                f"{self.folder.path}: holds a run with other settings ({', '.join(diff)}); "
                "use another --out or --overwrite"
            )

    def _runtime(self) -> Runtime:
        options = self.options
        spec = getattr(options, "model_spec", None)
        if spec is not None:
            spec.check_files()
        check_store(getattr(options, "track", "none"), getattr(options, "tracking_uri", None))
        engine = getattr(options, "engine_request", "torch")
        runtime = Runtime.create(
            options.device,
            amp=getattr(options, "amp", True),
            batch_size=getattr(options, "eval_batch_size", None),
            progress=self.progress and self.shard.primary,
            engine=engine,
        )
        return replace(runtime, shard=self.shard)

    def _train(self, runtime: Runtime) -> None:
        started = time.perf_counter()
        job = self.family.job(self.options, runtime, self.log)  # bad data fails here
        state, saved = self._resume(job)
        job.start(resumed=state.epoch > 0)
        if saved is not None:  # what ``start`` built continues where the checkpoint stopped
            if saved.get("optimizer") and job.optimizer is not None:
                job.optimizer.load_state_dict(saved["optimizer"])
            if saved.get("random"):
                job.set_random_state(saved["random"])
        if not self.shard.primary:
            self._epochs(job, state, [])
            return
        self.folder.write_config(self.family.name, asdict(self.options), job.resolved())
        handlers = [*self.handlers, *configured_handlers(self.options)]
        for handler in handlers:
            handler.started(self.folder, asdict(self.options))
        try:
            own_epochs = self._epochs(job, state, handlers)
            job.trainable.load_state_dict(state.best_model)  # strict: the selected epoch
            metrics = job.finish(self.folder, state)
            outside = time.perf_counter() - started - own_epochs
            seconds = {**metrics.get("seconds", {}), "epochs": state.seconds}
            metrics["seconds"] = {"total": state.seconds + outside, **seconds}
            self.folder.write_metrics(metrics)  # last: the run is complete
            self.folder.file(RunFolder.CHECKPOINT).unlink(missing_ok=True)
            for handler in handlers:
                handler.finished(self.folder, metrics)
        except BaseException as error:  # interrupted or crashed: the observers hear of it
            for handler in handlers:
                handler.failed(self.folder, error)
            raise

    def _epochs(self, job: Job, state: EpochState, handlers: Sequence[Handler]) -> float:
        """The remaining epochs; after each, history and checkpoint. Returns their seconds."""
        own = 0.0
        for epoch in range(state.epoch + 1, self.options.epochs + 1):
            began = time.perf_counter()
            row = {"epoch": epoch, **job.train_one_epoch(epoch)}
            if not self.shard.primary:  # rank 0 evaluates, keeps the best epoch and writes
                continue
            row.update(job.evaluate(epoch))
            score = row.pop("score")
            row["seconds"] = time.perf_counter() - began
            own += row["seconds"]
            self._record(job, state, row, score)
            self.log(job.epoch_line(row))  # after the checkpoint: an interruption loses nothing
            for handler in handlers:
                handler.epoch_ended(row)
        return own

    def _record(self, job: Job, state: EpochState, row: dict, score: float) -> None:
        """The best-epoch rule (higher score is better; a tie goes to the later epoch, which
        trained longer on the same validation evidence), then history and checkpoint."""
        state.history.append(row)
        state.epoch, state.seconds = row["epoch"], state.seconds + row["seconds"]
        if state.best_score is None or score >= state.best_score:
            state.best_score, state.best_epoch = score, row["epoch"]
            state.best_model = copy.deepcopy(
                {k: v.detach().cpu() for k, v in job.trainable.state_dict().items()}
            )
        self.folder.write_history(state.history)
        saved = {
            "state": asdict(state),
            "model": job.network.state_dict(),
            "optimizer": job.optimizer.state_dict() if job.optimizer is not None else None,
            "random": job.random_state(),
        }
        self.folder.write_file(RunFolder.CHECKPOINT, lambda tmp: torch.save(saved, tmp))

    def _resume(self, job: Job) -> tuple[EpochState, dict | None]:
        """A fresh state, or that of the last finished epoch of an interrupted run of the same
        options (network weights restored in place) and its checkpoint. With ``overwrite`` the
        folder is emptied here: after the options and the data were read."""
        if self.overwrite and self.folder.path.exists():
            shutil.rmtree(self.folder.path)
        if self.shard.primary and self.folder.is_foreign():  # (rank 0 may be writing it)
            raise MedxferError(
                f"{self.folder.path}: output folder is not empty and holds no medxfer run "
                "(use --overwrite to replace it)"
            )
        if not self.folder.has_run():
            return EpochState(), None
        self.check_same()
        saved = load_checkpoint_or_none(self.folder.file(RunFolder.CHECKPOINT))
        if saved is None:  # none, or unreadable (warned): start afresh
            return EpochState(), None
        saved = _current_layout(saved)
        job.network.load_state_dict(saved["model"])
        state = EpochState(**saved["state"])
        self.log(f"{self.folder.path}: resuming after epoch {state.epoch}")
        return state, saved


def _current_layout(saved: dict) -> dict:
    """Checkpoints of the previous version: classification kept the optimizer, generators and
    a lower-is-better score inside ``state``; the other tasks had no ``random``."""
    state = dict(saved["state"])
    if "best_state" not in state:
        return saved
    history = state.get("history", [])
    return {
        "model": saved["model"],
        "optimizer": state.get("optimizer"),
        "random": state.get("generators"),
        "state": {
            "epoch": state["epoch"],
            "history": history,
            "best_epoch": state["best_epoch"],
            "best_score": -state["best_score"],
            "best_model": state["best_state"],
            "seconds": sum(r.get("seconds", 0.0) for r in history),
        },
    }
