"""The run folder: the only code that knows its file names and JSON layout."""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from medxfer.atomic import write_json, write_text, write_with
from medxfer.config import RunConfig
from medxfer.errors import MedxferError


class RunFolder:
    """A run's files. ``metrics.json`` is written last and marks the run complete."""

    CONFIG = "config.json"
    HISTORY = "history.csv"
    METRICS = "metrics.json"
    PREDICTIONS = "predictions.csv"
    MODEL = "model.pt"
    CHECKPOINT = "checkpoint.pt"
    RELIABILITY = "reliability.png"
    MODEL_CARD = "model_card.md"
    TRACKING = "tracking.json"  # the experiment tracker's run id, so a resumed run continues it
    TEXT_COLUMNS = ("split", "file", "patient", "label", "unknown", "predicted")  # predictions.csv
    FILES = (CONFIG, HISTORY, METRICS, PREDICTIONS, MODEL, RELIABILITY, MODEL_CARD)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:  # the path, as str(Path) gives: f"{run}" in messages and argv
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def file(self, name: str) -> Path:
        return self.path / name

    # -- state --------------------------------------------------------------------------
    def is_complete(self) -> bool:
        return self.file(self.METRICS).exists()

    def has_run(self) -> bool:
        """Whether a run (finished or not) was started here."""
        return self.file(self.CONFIG).exists()

    def is_foreign(self) -> bool:
        """A non-empty folder that holds no medxfer run: never overwritten without asking."""
        return self.path.exists() and any(self.path.iterdir()) and not self.has_run()

    # -- reading ------------------------------------------------------------------------
    def read_config(self) -> RunConfig:
        return RunConfig.from_dict(self._config_json()["run"])

    def read_options(self) -> dict[str, Any]:
        """The run's options as stored (any task; ``read_config`` builds classification's)."""
        return self._config_json()["run"]

    def family(self) -> str:
        """``classification``, ``segmentation`` or ``detection``: which code owns this run."""
        return self._config_json().get("task", "classification")

    def read_resolved(self) -> dict[str, Any]:
        return self._config_json().get("resolved", {})

    def read_environment(self) -> dict[str, Any]:
        return self._config_json().get("environment", {})

    def read_metrics(self) -> dict[str, Any]:
        if not self.is_complete():
            raise MedxferError(f"{self.path}: the run is not finished (no {self.METRICS})")
        return json.loads(self.file(self.METRICS).read_text())

    def read_history(self) -> pd.DataFrame:
        return pd.read_csv(self.file(self.HISTORY))

    def read_predictions(self, split: str | None = "test") -> pd.DataFrame:
        """Stored predictions; runs of the first version hold test rows only (no ``split``).

        Names are text as written: class names such as ``0``, ``01`` or ``NA`` and an empty
        label set must not come back as numbers or NaN (pandas' default guesses)."""
        path = self.file(self.PREDICTIONS)
        columns = pd.read_csv(path, nrows=0).columns
        frame = pd.read_csv(
            path,
            dtype={c: str for c in self.TEXT_COLUMNS if c in columns},
            keep_default_na=False,
            na_values={c: ["", "NaN", "nan"] for c in columns if c not in self.TEXT_COLUMNS},
        )
        if "split" not in frame.columns:
            frame.insert(0, "split", "test")
        return frame if split is None else frame[frame.split == split].reset_index(drop=True)

    def read_tracking(self) -> dict[str, Any] | None:
        """The tracker's record of this run (None when it was never tracked)."""
        path = self.file(self.TRACKING)
        return json.loads(path.read_text()) if path.exists() else None

    def read_model_card(self) -> str:
        return self.file(self.MODEL_CARD).read_text()

    def _config_json(self) -> dict[str, Any]:
        path = self.file(self.CONFIG)
        if not path.exists():
            raise MedxferError(f"{self.path}: not a medxfer run folder (no {self.CONFIG})")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MedxferError(f"{path}: unreadable ({exc})") from None
        if not isinstance(config, dict) or not isinstance(config.get("run"), dict):
            raise MedxferError(f"{path}: not a medxfer run configuration (no 'run' options)")
        return config

    # -- writing (each file atomically) ---------------------------------------------------
    def write_config(self, family: str, options: dict[str, Any], resolved: dict) -> None:
        """``config.json``: the task family, every option, the resolved values, the machine."""
        write_json(
            self.file(self.CONFIG),
            {"task": family, "run": options, "resolved": resolved, "environment": environment()},
        )

    def write_history(self, rows: list[dict]) -> None:
        self.write_table(self.HISTORY, pd.DataFrame(rows))

    def write_predictions(self, frame: pd.DataFrame) -> None:
        self.write_table(self.PREDICTIONS, frame)

    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        write_with(self.file(name), lambda tmp: frame.to_csv(tmp, index=False))

    def write_file(self, name: str, writer: Callable[[Path], None]) -> None:
        write_with(self.file(name), writer)

    def write_tracking(self, record: dict[str, Any]) -> None:
        write_json(self.file(self.TRACKING), record)

    def write_model_card(self, text: str) -> None:
        write_text(self.file(self.MODEL_CARD), text)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Written last: marks the run complete."""
        write_json(self.file(self.METRICS), metrics)


def known_patients(predictions: pd.DataFrame):
    """The rows' patients (numpy text array) for a cluster bootstrap; None where every row is
    its own patient (``file:NAME``, what runs write when patients are unknown)."""
    if "patient" not in predictions:
        return None
    patients = predictions.patient.astype(str).to_numpy()
    return None if all(p.startswith("file:") for p in patients) else patients


def environment() -> dict[str, Any]:
    """Library versions, machine and git commit, for config.json."""
    import numpy
    import sklearn
    import timm
    import torch
    import torchvision

    import medxfer
    from medxfer.runtime import allocator_status

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
        "allocator": allocator_status(),
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
