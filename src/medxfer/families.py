"""The three kinds of run medxfer trains, and the one place that tells them apart.

Classification (``medxfer.classification.run``, options ``RunConfig``), segmentation
(``medxfer.segmentation.run``, ``SegmentationOptions``) and detection
(``medxfer.detection.run``, ``DetectionOptions``). The command line, a study's cells and its
tables pick a run's code here: by the ``task`` of its options (``segmentation``,
``detection``, else classification's own tasks) or of its run folder (``RunFolder.family``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medxfer.storage.folder import RunFolder
    from medxfer.training.trainer import Family

FAMILIES = ("classification", "segmentation", "detection")


def family_of(options: dict[str, Any]) -> str:
    task = options.get("task")
    return task if task in FAMILIES[1:] else "classification"


def options_class(family: str) -> type:
    """The options dataclass of ``family`` (light imports: no torch)."""
    if family == "segmentation":
        from medxfer.segmentation.options import SegmentationOptions

        return SegmentationOptions
    if family == "detection":
        from medxfer.detection.options import DetectionOptions

        return DetectionOptions
    from medxfer.config import RunConfig

    return RunConfig


def option_names(family: str) -> set[str]:
    """Every option a run of ``family`` takes (``task`` included: it picks the family)."""
    return {f.name for f in fields(options_class(family))} | {"task"}


def build_options(options: dict[str, Any]):
    """The validated options object of the run ``options`` describe (``out`` included)."""
    family = family_of(options)
    values = dict(options) if family == "classification" else _without_task(options)
    built = options_class(family)(**values)
    built.validate()
    return built


def family(name: str):
    """The task family ``name`` (``medxfer.training.trainer.Family``): what builds its jobs."""
    if name not in FAMILIES:
        from medxfer.errors import MedxferError

        raise MedxferError(f"task family {name!r}: not one of {', '.join(FAMILIES)}")
    if name == "segmentation":
        from medxfer.segmentation.run import FAMILY
    elif name == "detection":
        from medxfer.detection.run import FAMILY
    else:
        from medxfer.classification.run import FAMILY
    return FAMILY


COMMANDS = {"classification": "predict|export", "segmentation": "segment predict|export"}
COMMANDS["detection"] = "detect predict|export"


def load_trained(run: str | Path, expected: str | None = None):
    """The trained model of a run folder (or its ``model.pt``), of whatever family made it:
    a ``TrainedModel`` (classification), ``TrainedSegmenter`` or ``TrainedDetector``, each
    with ``predict``, ``export`` and ``evaluate``. With ``expected``, a model of another
    family is refused with the commands it takes."""
    from medxfer.errors import MedxferError
    from medxfer.storage.model_file import FILE_NAME, read_model_file

    path = Path(run)
    path = path / FILE_NAME if path.is_dir() else path
    saved = read_model_file(path)
    family(saved.family)  # an unknown family is one line
    if expected is not None and saved.family != expected:
        raise MedxferError(f"{run}: a {saved.family} run; use `medxfer {COMMANDS[saved.family]}`")
    return family(saved.family).load(saved, path)


def train_run(
    options: dict[str, Any], *, log: Callable[[str], None] = print, overwrite: bool = False
) -> Path:
    """Train (resume, or find finished) the run of ``options``; return its folder.
    ``overwrite`` replaces the folder's run once the new one's options and data are good."""

    built = build_options(options)
    return run_training(family(family_of(options)), built, log=log, overwrite=overwrite).path


def run_training(family_: Family, options: Any, **how: Any) -> RunFolder:
    """Train ``options``' run in this process (``Trainer``), or on Ray Train workers when
    they ask for ``workers``; ``how``: the Trainer's log, progress, overwrite, handlers."""
    from medxfer.errors import MedxferError
    from medxfer.training.trainer import Trainer

    if getattr(options, "workers", 0):
        from medxfer.classification.workers import train_on_workers

        if how.pop("handlers", ()):
            raise MedxferError("--workers: handlers run in the workers' processes; use --track")
        return train_on_workers(options, **how)
    return Trainer(family_, options, **how).run()


def check_same_run(options: dict[str, Any]) -> None:
    """The finished run in ``options["out"]`` is the run ``options`` describe; else one line
    naming the options that differ (a study rerun with other ``--set`` values must not
    report the old runs as its own)."""
    from medxfer.training.trainer import Trainer

    built = build_options(options)
    Trainer(family(family_of(options)), built).check_same()


def _without_task(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != "task"}
