"""Run a study's cells: skip finished ones, resume interrupted ones, never run one twice at once.

Each cell is an ordinary run folder (``DIR/runs/CELL``), so everything that makes a single run
safe (atomic files, ``metrics.json`` written last, checkpoints) makes the study safe: after a
``kill -9`` the same command finishes the study. A lock per cell (``medxfer.locking``, released by
the kernel when its process dies) keeps two executors off the same cell.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from medxfer.errors import MedxferError
from medxfer.families import check_same_run, train_run
from medxfer.locking import LockHeld, exclusive_lock
from medxfer.storage.folder import RunFolder
from medxfer.study.compare import save_settings, write_comparisons
from medxfer.study.spec import Cell, Study, as_run
from medxfer.study.table import write_results
from medxfer.tracking import check_store, study_tracking

EXECUTORS = ("local", "ray")


def run_cell(options: dict, out: str, lock_dir: str, threads: int | None = None) -> str:
    """Train one cell unless it is finished or locked by another executor; return its state."""
    import torch

    if RunFolder(out).is_complete():
        check_same_run({**options, "out": out})
        return "done"
    try:
        with exclusive_lock(Path(lock_dir) / f"{Path(out).name}.lock"):
            if threads:
                torch.set_num_threads(threads)
            train_run({**options, "out": out}, log=lambda _: None)
    except LockHeld:  # another executor has this cell (or another process its run folder)
        return "locked"
    return "trained"


def run_study(
    study: Study,
    out: Path,
    *,
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
    cpus_per_cell: float | None = None,
    gpus_per_cell: float = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every cell of ``study`` into ``out`` and write the results table."""
    if executor not in EXECUTORS:
        raise MedxferError(f"--executor {executor!r}: choose {' or '.join(EXECUTORS)}")
    check_store(study.base.get("track", "none"), study.base.get("tracking_uri"))
    cells = study.cells()
    for name in study.skipped:
        log(f"skip {name}: ImageNet weights not available here")
    out.mkdir(parents=True, exist_ok=True)
    save_settings(out, name=study.name, compare=study.compare, baseline=study.baseline)
    jobs = [(cell, _absolute(cell), str(out / "runs" / cell.name)) for cell in cells]
    lock_dir = str(out / "locks")
    log(
        f"study {study.name}: {len(cells)} cells, "
        f"{sum(RunFolder(o).is_complete() for *_, o in jobs)} already finished"
    )
    started = time.perf_counter()
    plan = Plan(jobs, lock_dir, out, study, log)
    with study_tracking(study.name, out, study.base):  # a parent run when the cells track
        if executor == "local":
            _run_local(plan, workers)
        else:
            _run_ray(plan, address, cpus_per_cell, gpus_per_cell)
        path = write_results(out, study)
    pairs = write_comparisons(out, study.compare, study.baseline)
    log(
        f"study {study.name}: finished in {time.perf_counter() - started:.0f} s; "
        f"tables {path}, {pairs}"
    )
    return path


@dataclass
class Plan:
    """The cells to run (cell, options, run folder), where their locks live, and where the
    study's tables go."""

    jobs: list[tuple[Cell, dict, str]]
    lock_dir: str
    out: Path
    study: Study
    log: Callable[[str], None]


def _run_local(plan: Plan, workers: int) -> None:
    jobs, lock_dir, out, study, log = plan.jobs, plan.lock_dir, plan.out, plan.study, plan.log
    if workers <= 1:
        for cell, options, run_out in jobs:
            log(f"{cell.name}: {run_cell(options, run_out, lock_dir)}")
            write_results(out, study)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(run_cell, options, run_out, lock_dir, threads): cell
            for cell, options, run_out in jobs
        }
        for future in as_completed(futures):
            log(f"{futures[future].name}: {future.result()}")
            write_results(out, study)


def _run_ray(plan: Plan, address: str | None, cpus: float | None, gpus: float) -> None:
    jobs, lock_dir, out, study, log = plan.jobs, plan.lock_dir, plan.out, plan.study, plan.log
    try:
        import ray
    except ImportError:
        raise MedxferError("--executor ray needs Ray: pip install 'ray[default]'") from None
    cpus = cpus or 1
    ray.init(
        address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False
    )
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2)(run_cell)
    pending = {
        task.remote(options, run_out, lock_dir, max(1, int(cpus))): cell
        for cell, options, run_out in jobs
    }
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                log(f"{cell.name}: {ray.get(ref)}")
            write_results(out, study)
    finally:
        if address is None:
            ray.shutdown()


def _absolute(cell: Cell) -> dict:
    """Options with file paths made absolute, so that remote workers find them."""
    return {key: as_run(key, value) for key, value in cell.options.items()}
