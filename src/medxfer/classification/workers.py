"""One classification run on N workers (processes, GPUs, machines) through Ray Train.

``--workers N`` starts Ray Train's ``TorchTrainer`` (gloo on CPUs, NCCL on GPUs); every worker
runs :func:`_worker` with the same options and its rank (``medxfer.shard.Shard``):

- the driver reads and decodes the data into the shared cache before Ray starts (bad input is
  one line there), and the workers read it from the cache;
- a frozen backbone: the workers fill the feature cache together, each extracting every N-th
  batch of every chunk, drawing every batch's augmentation so that the features equal a
  one-process run's; rank 0 then trains the head alone on the cached features (seconds), as a
  one-process run does;
- a trained backbone: DistributedDataParallel (``training.parallel``), every global batch of
  ``--batch-size`` split between the workers, BatchNorm statistics synchronised; rank 0
  evaluates, keeps the best epoch and writes the run folder, the others read its checkpoint
  to resume.

A worker that dies is restarted with the whole group by Ray Train (``FailureConfig``); every
worker then resumes from the run folder's last checkpoint, so the finished run equals an
uninterrupted one. The run folder, model.pt and metrics.json are those of a one-process run.
The data, the cache and the run folder must be on a file system every worker sees (one
machine, or a shared mount across machines).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from medxfer.classification.inputs import prepare_inputs
from medxfer.classification.run import FAMILY, build_network, load_data
from medxfer.config import RunConfig
from medxfer.device import Runtime
from medxfer.errors import MedxferError
from medxfer.locking import run_folder_lock
from medxfer.shard import Shard
from medxfer.storage.folder import RunFolder
from medxfer.training.trainer import Log, Trainer

MAX_FAILURES = 3  # worker-group restarts before a run gives up
BARRIER_S = 4 * 3600  # a worker may wait this long for rank 0 (a first feature chunk, a decode)


def train_on_workers(
    cfg: RunConfig, *, log: Log = print, progress: bool = True, overwrite: bool = False
) -> RunFolder:
    """Train (resume, or find finished) ``cfg``'s run on ``cfg.workers`` Ray Train workers."""
    single = Trainer(FAMILY, cfg, log=log, progress=progress, overwrite=overwrite)
    if single.folder.is_complete() and not overwrite:
        return single.run()  # checks the settings, says so, trains nothing
    cache = _prepare(cfg, single, overwrite, progress)
    ray, train = _ray()
    from ray.train.torch import TorchConfig, TorchTrainer

    cuda = Runtime.create(cfg.device, progress=False, engine="torch").device.type == "cuda"
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=progress)
    storage = Path(tempfile.mkdtemp(prefix="medxfer-ray-"))
    try:
        _check_resources(ray, cfg.workers, cuda)
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "options": asdict(cfg),
                "progress": progress,
                "cwd": os.getcwd(),  # relative paths, as config.json keeps them
                "cache": str(cache),
            },
            scaling_config=train.ScalingConfig(num_workers=cfg.workers, use_gpu=cuda),
            torch_config=TorchConfig(backend="nccl" if cuda else "gloo", timeout_s=BARRIER_S),
            run_config=train.RunConfig(
                name="medxfer",
                storage_path=str(storage),
                failure_config=train.FailureConfig(max_failures=MAX_FAILURES),
            ),
        )
        result = trainer.fit()
    except MedxferError:
        raise
    except Exception as error:  # Ray's errors wrap the worker's: its last line says why
        last = str(error).strip().splitlines()[-1:] or [type(error).__name__]
        raise MedxferError(
            f"{cfg.out}: the run on {cfg.workers} workers failed: {last[0]}"
        ) from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started_here:
            ray.shutdown()
    if getattr(result, "error", None) or not single.folder.is_complete():
        raise MedxferError(f"{cfg.out}: the run on {cfg.workers} workers did not finish")
    log(f"{cfg.out}: trained on {cfg.workers} workers")
    return single.folder


def _prepare(cfg: RunConfig, single: Trainer, overwrite: bool, progress: bool) -> Path:
    """Before Ray starts, in this process: the data read and decoded into the shared cache
    (bad input is one line here, not a restarted worker; the workers then read the cache),
    the folder's run checked, and ``--overwrite`` applied once (not again when Ray restarts
    the workers). Returns the cache folder every worker uses."""
    runtime = Runtime.create(cfg.device, progress=progress, engine="torch")
    ctx = load_data(cfg, runtime)
    folder = single.folder
    if overwrite and folder.path.exists():
        with run_folder_lock(folder.path):
            shutil.rmtree(folder.path)
    elif folder.is_foreign():
        raise MedxferError(
            f"{folder.path}: output folder is not empty and holds no medxfer run "
            "(use --overwrite to replace it)"
        )
    elif folder.has_run():
        single.check_same()
    return ctx.cache_dir.resolve()


def _check_resources(ray, workers: int, cuda: bool) -> None:
    """One line instead of a wait for workers the cluster can never place."""
    have = ray.cluster_resources()
    need = {"CPU": workers, **({"GPU": workers} if cuda else {})}
    for name, count in need.items():
        if have.get(name, 0) < count:
            raise MedxferError(
                f"--workers {workers}: the Ray cluster has {have.get(name, 0):g} {name}s "
                f"for {count} workers"
            )


def _worker(config: dict) -> None:
    """What every worker runs (again, from the folder's checkpoint, after a restart)."""
    from ray import train

    os.chdir(config["cwd"])
    context = train.get_context()
    shard = Shard(context.get_world_rank(), context.get_world_size(), distributed=True)
    cfg = RunConfig.from_dict(config["options"])
    if cfg.cache_dir is None:
        os.environ["MEDXFER_CACHE"] = config["cache"]
    progress = config["progress"] and shard.primary
    if cfg.uses_feature_cache:  # every worker extracts its share of the missing features
        ctx = load_data(cfg, _runtime(cfg, shard))
        prepare_inputs(ctx, build_network(ctx), adapted=False)
        shard.sync()
        if shard.primary:  # the head: cheapest where the features are, on one worker
            Trainer(FAMILY, cfg, progress=progress).run()
        return
    log = print if progress else (lambda _line: None)
    Trainer(FAMILY, cfg, log=log, progress=progress, shard=shard).run()


def _runtime(cfg: RunConfig, shard: Shard) -> Runtime:
    runtime = Runtime.create(
        cfg.device,
        amp=cfg.amp,
        batch_size=cfg.eval_batch_size,
        progress=False,
        engine=cfg.engine_request,
    )
    return replace(runtime, shard=shard)


def _ray():
    try:
        import ray
        from ray import train
    except ImportError:
        raise MedxferError("--workers needs Ray Train: pip install 'medxfer[ray]'") from None
    return ray, train
