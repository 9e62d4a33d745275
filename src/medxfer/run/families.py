"""The three kinds of run medxfer trains, and the one place that tells them apart.

Classification (``medxfer.run.pipeline``, options ``RunConfig``), segmentation
(``medxfer.segmentation.run``, ``SegmentationOptions``) and detection
(``medxfer.detection.run``, ``DetectionOptions``). The command line, a study's cells and its
tables pick a run's code here: by the ``task`` of its options (``segmentation``,
``detection``, else classification's own tasks) or of its run folder (``RunFolder.family``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

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


def train_run(options: dict[str, Any], *, log: Callable[[str], None] = print) -> Path:
    """Train (resume, or find finished) the run of ``options``; return its folder."""
    family = family_of(options)
    built = build_options(options)
    if family == "segmentation":
        from medxfer.segmentation.run import train_segmentation

        return train_segmentation(built, log=log)
    if family == "detection":
        from medxfer.detection.run import train_detection

        return train_detection(built, log=log)
    from medxfer.run.pipeline import train

    train(built, progress=False, log=log)
    return Path(built.out)


def _without_task(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != "task"}
