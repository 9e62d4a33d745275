"""The layout of a run directory, and loading a finished run back."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

from medxfer.config import RunConfig
from medxfer.errors import MedxferError
from medxfer.models.classifier import XrayClassifier
from medxfer.models.factory import create_model

CONFIG = "config.json"
HISTORY = "history.csv"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
MODEL = "model.pt"
CHECKPOINT = "checkpoint.pt"
RELIABILITY = "reliability.png"


def is_complete(run: Path) -> bool:
    return (Path(run) / METRICS).exists()


def read_metrics(run: Path) -> dict:
    return json.loads((Path(run) / METRICS).read_text())


def read_config(run: Path) -> RunConfig:
    path = Path(run) / CONFIG
    if not path.exists():
        raise MedxferError(f"{run}: not a medxfer run directory (no {CONFIG})")
    return RunConfig.from_dict(json.loads(path.read_text())["run"])


def load_model(run: Path) -> tuple[XrayClassifier, dict]:
    """The trained model of a finished run, in eval mode, and the run's saved metadata."""
    path = Path(run) / MODEL
    if not path.exists():
        raise MedxferError(f"{run}: no trained model ({MODEL}); is the run finished?")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    cfg = RunConfig.from_dict(saved["config"])
    # Rebuild the architecture without downloading: the saved state holds every weight.
    model = create_model(cfg.model_spec, load_weights=False)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


def saved_resolution(saved: dict) -> int:
    """The input size a saved model was trained at."""
    return RunConfig.from_dict(saved["config"]).resolution


def environment() -> dict:
    """Library versions, machine and git commit, for the resolved config."""
    import numpy
    import sklearn
    import timm
    import torchvision

    import medxfer

    return {
        "medxfer": medxfer.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
