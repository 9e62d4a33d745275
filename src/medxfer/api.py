"""The Python API: what the command line does, as functions a notebook calls.

    import medxfer
    run = medxfer.train(data="../shared/data/chest_xray", out="runs/quick", epochs=2)
    model = medxfer.load(run)
    model.predict(["scan.png"])

The command line calls these same functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medxfer.classification.trained import TrainedModel
    from medxfer.storage.folder import RunFolder
    from medxfer.tracking import Handler


def train(
    data: str | Path,
    out: str | Path,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    handlers: Sequence[Handler] = (),
    **options: Any,
) -> RunFolder:
    """Train (or resume, or find finished) one run; ``options`` are ``medxfer train``'s options
    with underscores (``arch``, ``mode``, ``epochs``, ``image_size``, ``track``, ...);
    ``task="segmentation"`` or ``"detection"`` takes ``medxfer segment|detect train``'s."""
    from medxfer.classification.run import train as run_pipeline
    from medxfer.config import RunConfig
    from medxfer.families import family_of

    if family_of(options) != "classification":
        if handlers:
            from medxfer.errors import MedxferError

            raise MedxferError("handlers: only classification runs report to handlers")
        return _train_task(data, out, quiet=quiet, overwrite=overwrite, **options)

    cfg = RunConfig(data=str(data), out=str(out), **options)
    return run_pipeline(
        cfg,
        progress=not quiet,
        overwrite=overwrite,
        log=(lambda _msg: None) if quiet else print,
        handlers=handlers,
    )


def _train_task(data, out, *, quiet: bool, overwrite: bool, **options: Any) -> RunFolder:
    """A segmentation or detection run (``medxfer.families``)."""
    from medxfer.families import train_run
    from medxfer.storage.folder import RunFolder

    options = {**options, "data": str(data), "out": str(out)}
    log = (lambda _msg: None) if quiet else print
    return RunFolder(train_run(options, log=log, overwrite=overwrite))


def load(run: str | Path) -> TrainedModel:
    """The trained model of a finished run folder (or a ``model.pt``), with ``predict``,
    ``cam`` and ``export``."""
    from medxfer.classification.trained import TrainedModel

    return TrainedModel.load(run)


def run_study(
    study: str | Path,
    out: str | Path,
    *,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    grid: Mapping[str, Sequence[Any]] | Sequence[str] = (),
    **execution: Any,
) -> Path:
    """Run a study (a TOML file or a preset) into ``out``; return its results table.
    ``overrides`` set base options ({"epochs": 5} or ["epochs=5"]), ``grid`` replaces axes
    ({"arch": ["resnet18"]} or ["arch=resnet18"]); ``execution``: ``executor``, ``workers``,
    ``address``, ``cpus_per_cell``, ``gpus_per_cell``."""
    from medxfer.study.execute import run_study as execute
    from medxfer.study.spec import load_study

    if isinstance(overrides, Mapping):
        overrides = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(grid, Mapping):
        grid = [f"{k}={','.join(json.dumps(v) for v in vs)}" for k, vs in grid.items()]
    loaded = load_study(str(study), list(overrides), list(grid))
    return execute(loaded, Path(out), **execution)
