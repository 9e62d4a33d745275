"""``--head logreg``: the linear probe of the DINO / CLIP / MedMNIST+ benchmarks, an
L2-regularised logistic (softmax, for multi-class) regression on standardised cached features.

Each epoch fits the probe at one strength ``C`` of a log-spaced grid (``strengths``), so the
trainer's machinery does the choosing: history, the best epoch by ``--select`` on validation
(val_loss by default), checkpoint and resume. scikit-learn's ``LogisticRegression`` (L-BFGS, the
exact optimum of the penalised, class-balanced likelihood) is used rather than a hand-written
full-batch L-BFGS: it is the reference the benchmarks use, and its solution is folded into the
network's own linear head (``W / sigma``, ``b - W mu / sigma``), so that evaluation, predict,
export and ONNX see an ordinary model.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from medxfer.errors import MedxferError
from medxfer.tasks import Task
from medxfer.training.loop import ClassifierEpochs, _rows

C_RANGE = (1e-4, 1e2)
MAX_ITER = 1000


def strengths(epochs: int) -> np.ndarray:
    """The inverse regularisation strengths tried, one per epoch, weakest penalty last."""
    if epochs == 1:
        return np.array([1.0])
    return np.logspace(np.log10(C_RANGE[0]), np.log10(C_RANGE[1]), epochs)


def fit_logistic(x: np.ndarray, y: np.ndarray, task: Task, c: float) -> tuple[np.ndarray, ...]:
    """``(W, b)`` of the probe at strength ``c`` in the features' own units: logits
    ``x @ W.T + b``. Classes are balanced (weights N / (K N_c), as the paper head's loss);
    multi-label fits one regression per label on its known entries (NaN: unknown)."""
    x = np.asarray(x, dtype=np.float64)  # float32 features would end L-BFGS ~1e-4 early
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    if task.name == "multilabel":
        parts = [_fit(z[known], y[known, j], c, task.classes[j]) for j, known in _known(y)]
        coef, intercept = np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    else:
        coef, intercept = _fit(z, y, c, None)
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    return weight, bias


def _known(y: np.ndarray):
    return ((j, ~np.isnan(y[:, j])) for j in range(y.shape[1]))


def _fit(z: np.ndarray, y: np.ndarray, c: float, label: str | None):
    if len(np.unique(y)) < 2:
        where = f"label {label}: " if label else ""
        raise MedxferError(f"--head logreg: {where}the training rows hold one class only")
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=MAX_ITER)
    with warnings.catch_warnings():  # a weak penalty converges slowly; the optimum barely moves
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(z, y.astype(np.int64))
    return model.coef_, model.intercept_


class LogisticProbe(ClassifierEpochs):
    """The epochs of ``--head logreg``: epoch e fits the probe at ``strengths(E)[e - 1]`` on
    every stored view of the training images (the clean view without augmentation)."""

    def train_one_epoch(self, epoch: int) -> dict:
        c = float(strengths(self.schedule.epochs)[epoch - 1])
        x, y = self.train_rows
        weight, bias = fit_logistic(x.numpy(), y.numpy(), self.task, c)
        linear = self.source.net.linear
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight).to(linear.weight))
            linear.bias.copy_(torch.from_numpy(bias).to(linear.bias))
        with torch.inference_mode():
            logits = self.source.net(x.to(linear.weight.device))
            target = y.to(logits.device)
            correct = self.task.correct(logits, target) / self.task.decisions_per_row(target)
            return {
                "train_loss": float(self.task.loss(logits, target)),
                "train_objective": float(self.task.loss(logits, target, self.weights)),
                "train_accuracy": float(correct) / len(target),
                "C": c,
            }

    @functools.cached_property
    def train_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (every view stacked) and their targets, read once."""
        source, targets = self.source, self.data.targets[self.train_idx]
        if source.views is None:
            return _rows(source.clean, source.clean_row[self.train_idx]).cpu().float(), targets
        rows = source.view_row[self.train_idx]
        x = torch.cat([_rows(v, rows).cpu().float() for v in source.views])
        tiles = (len(source.views),) + (1,) * (targets.ndim - 1)
        return x, targets.repeat(*tiles)
