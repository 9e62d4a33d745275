"""What the stages of a run hand each other: the run's context after its data stage, the
training inputs, and the assessment of the selected model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from medxfer.classification.trained import TrainedModel
from medxfer.config import RunConfig
from medxfer.data.prepared import PreparedData
from medxfer.device import Runtime
from medxfer.tasks import Task
from medxfer.training.loop import (
    FeatureSource,
    ImageSource,
)

Log = Callable[[str], None]


@dataclass
class Context:
    """What every stage after ``data`` reads: the run's options, where it computes, its data."""

    cfg: RunConfig
    runtime: Runtime
    data: PreparedData
    task: Task
    cache_dir: Path


@dataclass
class Inputs:
    """What the loop trains on: images through the whole network, or cached features through
    the head; ``trainable`` is the module whose state the loop saves and restores."""

    source: ImageSource | FeatureSource
    seconds: dict[str, float] = field(default_factory=dict)  # features: augment, forward

    @property
    def trainable(self) -> nn.Module:
        return self.source.net


@dataclass
class Assessment:
    """The selected model and everything written about it."""

    model: TrainedModel
    metrics: dict
    predictions: pd.DataFrame
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
