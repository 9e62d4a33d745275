"""A trained model: the network with everything needed to use it (task, classes, operating
points, temperature, input format). The only code that knows ``model.pt``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from medxfer.config import RunConfig
from medxfer.data.augment import tta_view
from medxfer.device import inference_batch_size, to_input
from medxfer.engine import Engine, make_engine, own_engine, resolve_engine
from medxfer.errors import MedxferError
from medxfer.models.classifier import XrayClassifier
from medxfer.storage.folder import RunFolder
from medxfer.storage.model_file import ModelFile, Reloadable
from medxfer.tasks import Task, make_task


@dataclass
class TrainedModel(Reloadable):
    FAMILY: ClassVar[str] = "classification"

    network: XrayClassifier
    config: RunConfig
    task: Task
    thresholds: list[float] | None = None  # binary: [t]; multilabel: one per label
    temperature: float = 1.0
    color: str = "gray"  # input channels: gray (1) or rgb (3)
    source: Path | None = None  # the run folder it was loaded from, if any
    engine: Engine | None = field(default=None, repr=False, compare=False)  # see ``to``

    @property
    def classes(self) -> tuple[str, ...]:
        return self.task.classes

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    # -- files --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        extra = {
            "task": self.task.name,
            "classes": list(self.task.classes),
            "thresholds": self.thresholds,
            "temperature": self.temperature,
            "color": self.color,
        }
        state = self.network.state_dict()
        ModelFile("classification", self.config.to_dict(), state, extra).save(path)

    @classmethod
    def from_file(cls, saved: ModelFile, path: Path) -> TrainedModel:
        """The classifier a model file describes (``path``: where it was read, for messages)."""
        from medxfer.models.factory import create_model

        cfg = RunConfig.from_dict(saved.options)
        facts = saved.extra
        task = make_task(facts["task"], facts["classes"])
        spec = cfg.model_spec
        network = create_model(
            type(spec)(**{**spec.__dict__, "outputs": task.outputs}), load_weights=False
        )
        try:
            network.load_state_dict(saved.state_dict)
        except RuntimeError as exc:
            raise MedxferError(
                f"{path}: weights do not fit {cfg.arch} ({str(exc).splitlines()[0]})"
            ) from None
        return cls(
            network.eval(),
            cfg,
            task,
            facts.get("thresholds"),
            float(facts.get("temperature") or 1.0),
            facts.get("color") or "gray",
            source=path.parent if (path.parent / RunFolder.CONFIG).exists() else None,
        )

    # -- use ----------------------------------------------------------------------------
    def to(
        self,
        device: torch.device,
        engine: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> TrainedModel:
        """Move the network to ``device`` and choose who runs it forward: ``engine`` auto,
        torch or onnxruntime (None: the run's own ``--engine``); an onnxruntime graph is kept
        in ``cache_dir`` (default: the run's cache, else the default cache)."""
        from medxfer.data.cache import default_cache_dir

        self.network.to(device, memory_format=torch.channels_last).eval()
        name = resolve_engine(engine or own_engine(self.config.engine_request), device)
        cache = cache_dir or self.config.cache_dir or default_cache_dir()
        self.engine = make_engine(name, self.network, cache)
        return self

    def logits(
        self, pixels: torch.Tensor, batch_size: int | None = None, view: int = 0
    ) -> np.ndarray:
        """Logits (float64) of uint8 images (B, S, S) gray or (B, 3, S, S) colour in test-time
        view ``view`` (0: the images themselves), computed in float32 on the network's device
        by the engine chosen in ``to``, in batches."""
        device = next(self.network.parameters()).device
        if self.engine is None:
            self.to(device)
        self.network.eval()
        batch = inference_batch_size(batch_size, device)
        with torch.inference_mode():
            out = [
                self.engine.logits(tta_view(to_input(c, device), view)).double()
                for c in pixels.split(batch)
            ]
        if not out:
            return np.zeros((0,) if self.task.outputs == 1 else (0, self.task.outputs))
        return torch.cat(out).numpy()

    def view_logits(self, pixels: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Logits of every test-time view the run was scored with (``--tta``): (V, B, ...)."""
        views = self.config.tta
        return np.stack([self.logits(pixels, batch_size, v) for v in range(views)])

    def probabilities(self, pixels: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Binary: P(positive) (B,); multiclass: (B, K); multilabel: (B, L); calibrated, and
        averaged over the run's test-time views."""
        return self.task.mean_probabilities(self.view_logits(pixels, batch_size), self.temperature)

    def decide(self, prob: np.ndarray, thresholds: list[float] | None = None) -> np.ndarray:
        """Class indices (binary, multiclass) or a 0/1 matrix (multilabel), at the stored
        operating points unless ``thresholds`` overrides them."""
        return self.task.decide(prob, thresholds if thresholds is not None else self.thresholds)

    def operating_points(self, threshold: float | None = None) -> list[float] | None:
        """The stored thresholds, or ``threshold`` for every output. A multi-class model
        decides by its most probable class, so a threshold is refused rather than ignored."""
        if threshold is None:
            return self.thresholds
        if not self.task.uses_thresholds:
            raise MedxferError(
                f"--threshold {threshold}: this is a multi-class model ({len(self.classes)} "
                "classes), decided by the most probable class"
            )
        return [float(threshold)] * self.task.outputs

    # -- the Python API's verbs (thin: the work lives in medxfer.inference) ---------------
    def predict(
        self, inputs: Sequence[str | Path | np.ndarray], *, threshold: float | None = None
    ) -> pd.DataFrame:
        """Rows like ``medxfer predict``'s: ``file``, probabilities, ``predicted``, ``error``.
        ``inputs`` are image files or arrays (H, W) / (H, W, 3) of uint8 or uint16."""
        from medxfer.inference.predict import predict_files

        items = [x if isinstance(x, np.ndarray) else Path(x) for x in inputs]
        return predict_files(self, items, threshold=threshold)

    def cam(
        self, paths: Sequence[str | Path], out_dir: str | Path, cam_class: str | None = None
    ) -> list[Path]:
        """A Grad-CAM overlay ``NAME_cam.png`` per image in ``out_dir``; the written paths."""
        from medxfer.inference.cam import write_cams

        return write_cams(self, [Path(p) for p in paths], Path(out_dir), cam_class)

    def export(self, path: str | Path, format: str = "onnx", *, dynamic_batch: bool = True) -> Path:
        """``format`` onnx or torchscript at ``path`` (+ ``.json`` metadata with the model card
        summary); also logged to the run's MLflow run when the run was tracked."""
        from medxfer.classification.card import model_summary
        from medxfer.inference.export import export_model
        from medxfer.tracking import log_files

        out = export_model(self, Path(path), format, model_summary(self), dynamic_batch)
        if self.source is not None:
            log_files(RunFolder(self.source), [out, Path(f"{out}.json")])
        return out

    def describe(self) -> dict[str, Any]:
        """What a client needs to know beside the network (export metadata, the serve page)."""
        return {
            "task": self.task.name,
            "classes": list(self.classes),
            "thresholds": self.thresholds,
            "temperature": self.temperature,
            "color": self.color,
            "image_size": self.resolution,
            "arch": self.config.arch,
            "mode": self.config.mode,
        }
