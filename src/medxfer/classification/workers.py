"""One classification run on N workers (processes, GPUs, machines) through Ray Train.

``--workers N`` starts Ray Train's ``TorchTrainer`` (gloo on CPUs, NCCL on GPUs); every worker
runs :func:`_worker` with the same options and its rank (``medxfer.shard.Shard``):

- rank 0 decodes the images into the shared cache first, the others then read them (a cache
  hit), so no image is decoded twice;
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

import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from medxfer.classification.context import Context
from medxfer.classification.inputs import prepare_inputs
from medxfer.classification.run import FAMILY, build_network, load_data
from medxfer.config import RunConfig
from medxfer.data.cache import default_cache_dir
from medxfer.device import Runtime
from medxfer.errors import MedxferError
from medxfer.shard import Shard
from medxfer.storage.folder import RunFolder
from medxfer.training.trainer import Log, Trainer

MAX_FAILURES = 3  # worker-group restarts before a run gives up


def train_on_workers(
    cfg: RunConfig, *, log: Log = print, progress: bool = True, overwrite: bool = False
) -> RunFolder:
    """Train (resume, or find finished) ``cfg``'s run on ``cfg.workers`` Ray Train workers."""
    cfg = _shared_paths(cfg)
    single = Trainer(FAMILY, cfg, log=log, progress=progress, overwrite=overwrite)
    if single.folder.is_complete() and not overwrite:
        return single.run()  # checks the settings, says so, trains nothing
    if overwrite and single.folder.path.exists():  # once, not again when Ray restarts workers
        shutil.rmtree(single.folder.path)
    ray, train = _ray()
    from ray.train.torch import TorchConfig, TorchTrainer

    cuda = Runtime.create(cfg.device, progress=False, engine="torch").device.type == "cuda"
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.address, include_dashboard=False, configure_logging=False)
    storage = Path(tempfile.mkdtemp(prefix="medxfer-ray-"))
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"options": asdict(cfg), "progress": progress},
            scaling_config=train.ScalingConfig(num_workers=cfg.workers, use_gpu=cuda),
            torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
            run_config=train.RunConfig(
                name="medxfer",
                storage_path=str(storage),
                failure_config=train.FailureConfig(max_failures=MAX_FAILURES),
            ),
        )
        result = trainer.fit()
    except Exception as error:  # Ray's errors wrap the worker's: the first line says why
        raise MedxferError(f"{cfg.out}: the run on {cfg.workers} workers failed: {error}") from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started_here:
            ray.shutdown()
    if getattr(result, "error", None) or not single.folder.is_complete():
        raise MedxferError(f"{cfg.out}: the run on {cfg.workers} workers did not finish")
    log(f"{cfg.out}: trained on {cfg.workers} workers")
    return single.folder


def _worker(config: dict) -> None:
    """What every worker runs (again, from the folder's checkpoint, after a restart)."""
    from ray import train

    context = train.get_context()
    shard = Shard(context.get_world_rank(), context.get_world_size(), distributed=True)
    cfg = RunConfig.from_dict(config["options"])
    progress = config["progress"] and shard.primary
    ctx = _load_once(cfg, shard)
    if cfg.uses_feature_cache:  # every worker extracts its share of the missing features
        prepare_inputs(ctx, build_network(ctx), adapted=False)
        shard.sync()
        if shard.primary:  # the head: cheapest where the features are, on one worker
            Trainer(FAMILY, cfg, progress=progress).run()
        return
    log = print if shard.primary else (lambda _line: None)
    Trainer(FAMILY, cfg, log=log, progress=progress, shard=shard).run()


def _load_once(cfg: RunConfig, shard: Shard) -> Context:
    """The run's data: rank 0 decodes the images into the cache while the others wait, then
    they read them from it."""
    runtime = Runtime.create(
        cfg.device,
        amp=cfg.amp,
        batch_size=cfg.eval_batch_size,
        progress=False,
        engine=cfg.engine_request,
    )
    runtime = replace(runtime, shard=shard)
    ctx = load_data(cfg, runtime) if shard.primary else None
    shard.sync()
    return ctx or load_data(cfg, runtime)


def _shared_paths(cfg: RunConfig) -> RunConfig:
    """Absolute paths (and the cache made explicit), so that every worker finds the files."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path else path

    return replace(
        cfg,
        data=absolute(cfg.data),
        out=absolute(cfg.out),
        weights=absolute(cfg.weights),
        cache_dir=absolute(cfg.cache_dir) or str(default_cache_dir().resolve()),
    )


def _ray():
    try:
        import ray
        from ray import train
    except ImportError:
        raise MedxferError("--workers needs Ray Train: pip install 'medxfer[ray]'") from None
    return ray, train
