"""``model.pt``: one typed, versioned file for every task family, and its only reader/writer.

Format 3 holds the ``family`` that rebuilds the model (``medxfer.families``), the run's
options, the weights, and the family's own facts (``extra``: a classifier's task, classes,
operating points, temperature and colour; a segmenter's mask labels and taps; a detector's
``DetectorSpec``). Files of earlier versions still load: classification's formats 1 (binary
only) and 2, and the first segmentation and detection layouts, which had no format number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medxfer.atomic import write_with
from medxfer.errors import MedxferError

MODEL_FORMAT = 3
FILE_NAME = "model.pt"


@dataclass
class ModelFile:
    family: str  # classification | segmentation | detection
    options: dict[str, Any]  # the run's options (config.json's ``run``)
    state_dict: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # the family's own facts
    format: int = MODEL_FORMAT

    def save(self, path: str | Path) -> None:
        """Atomically, with the weights on the CPU."""
        import torch

        payload = asdict(self)
        payload["state_dict"] = {k: v.detach().cpu() for k, v in self.state_dict.items()}
        write_with(Path(path), lambda tmp: torch.save(payload, tmp))


class Reloadable:
    """``load(run)`` for a trained model of family ``FAMILY`` with ``from_file(saved, path)``:
    a run folder or its ``model.pt``, read once, with one line for a file of another family."""

    FAMILY: ClassVar[str]

    @classmethod
    def load(cls, run: str | Path) -> Any:
        path = Path(run)
        path = path / FILE_NAME if path.is_dir() else path
        return cls.from_file(read_model_file(path, cls.FAMILY), path)  # type: ignore[attr-defined]


def read_model_file(source: str | Path, family: str | None = None) -> ModelFile:
    """The model file of a run folder (or the file itself), of any version; one line if it is
    missing, unreadable, of an unknown layout, or (``family`` given) of another family."""
    import torch

    path = Path(source)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.exists():
        raise MedxferError(f"{path.parent}: no trained model ({path.name}); is the run finished?")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch, zipfile and pickle raise many types for a damaged file
        raise MedxferError(f"{path}: unreadable model file ({type(exc).__name__})") from None
    found = _current(saved, path)
    if family is not None and found.family != family:
        raise MedxferError(f"{path}: a {found.family} model, not a {family} model")
    return found


def _current(saved: Any, path: Path) -> ModelFile:
    """Any stored layout as a format-3 ``ModelFile``."""
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise MedxferError(f"{path}: not a medxfer model file")
    if saved.get("format") == MODEL_FORMAT:
        return ModelFile(**saved)
    if saved.get("format") == 2:
        facts = ("task", "classes", "thresholds", "temperature", "color")
        extra = {k: saved.get(k) for k in facts}
        return ModelFile("classification", saved["config"], saved["state_dict"], extra)
    if "spec" in saved:
        return ModelFile("detection", {}, saved["state_dict"], {"spec": saved["spec"]})
    if "labels" in saved and "options" in saved:
        extra = {"labels": saved["labels"], "taps": saved.get("taps")}
        return ModelFile("segmentation", saved["options"], saved["state_dict"], extra)
    if "config" in saved:
        return _first_format(saved, path)
    raise MedxferError(f"{path}: not a medxfer model file")


def _first_format(saved: dict, path: Path) -> ModelFile:
    """model.pt of medxfer 0.1 (binary only): its keys mapped onto the current layout."""
    try:
        state = {
            ("head.linear." + k[5:] if k.startswith("head.") else k): v
            for k, v in saved["state_dict"].items()
        }
        extra = {
            "task": "binary",
            "classes": [saved["negative"], saved["positive"]],
            "thresholds": [float(saved["threshold"])],
            "temperature": saved.get("temperature", 1.0),
            "color": "gray",
        }
    except KeyError as exc:
        raise MedxferError(f"{path}: model file of an unknown layout (no {exc})") from None
    return ModelFile("classification", saved["config"], state, extra)
