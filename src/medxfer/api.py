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
    ``task="segmentation"`` or ``"detection"`` takes ``medxfer segment|detect train``'s.
    ``handlers`` (``medxfer.tracking.Handler``) hear of the start, each epoch and the end."""
    from medxfer.families import build_options, family, family_of
    from medxfer.training.trainer import Trainer

    values = {**options, "data": str(data), "out": str(out)}
    trainer = Trainer(
        family(family_of(values)),
        build_options(values),
        log=(lambda _msg: None) if quiet else print,
        progress=not quiet,
        overwrite=overwrite,
        handlers=handlers,
    )
    return trainer.run()


def load(run: str | Path) -> Any:
    """The trained model of a finished run folder (or a ``model.pt``) of any task: a
    ``TrainedModel`` (classification: ``predict``, ``cam``, ``export``), a
    ``TrainedSegmenter`` or a ``TrainedDetector`` (``predict``, ``export``, ``evaluate``)."""
    from medxfer.families import load_trained

    return load_trained(run)


def evaluate(
    run: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    threshold: float | None = None,
    device: str = "auto",
    engine: str | None = None,
    progress: bool = True,
) -> dict:
    """Metrics of a finished run's model on ``split`` of a dataset, for any task;
    ``threshold`` and ``engine`` (default: the run's own) apply to classification runs."""
    from medxfer.classification.run import evaluate as evaluate_classifier
    from medxfer.errors import MedxferError

    made_by = _family_of_run(run)
    if made_by == "classification":
        return evaluate_classifier(
            run,
            str(data),
            split=split,
            threshold=threshold,
            device_name=device,
            engine=engine,
            progress=progress,
        )
    if threshold is not None or engine is not None:
        raise MedxferError(f"{run}: --threshold and --engine apply to classification runs")
    return {"run": str(run), **load(run).evaluate(data, split, device=device)}


def load_classifier(run: str | Path) -> Any:
    """The ``TrainedModel`` of a classification run; a run of another family is refused with
    the command it takes (``medxfer segment predict|export``, ``medxfer detect ...``)."""
    from medxfer.families import refuse_other_family

    refuse_other_family(run)
    return load(run)


def _family_of_run(run: str | Path) -> str:
    from medxfer.storage.folder import RunFolder
    from medxfer.storage.model_file import read_model_file

    path = Path(run)
    folder = RunFolder(path if path.is_dir() else path.parent)
    return folder.family() if folder.has_run() else read_model_file(path).family


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
