"""What a classification task is: how many outputs the head has, its training loss, how logits
become probabilities and probabilities become decisions. The one place that knows "sigmoid,
temperature, threshold, class name"; training, assessment and inference all ask it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit, log_softmax, logsumexp, softmax

from medxfer.errors import MedxferError

TASKS = ("binary", "multiclass", "multilabel")


@dataclass(frozen=True)
class Task:
    """Behaviour of one task; ``classes`` are the class (or label) names in output order."""

    name: str
    classes: tuple[str, ...]

    @property
    def outputs(self) -> int:
        """Width of the head: one logit for binary, one per class or label otherwise."""
        return 1 if self.name == "binary" else len(self.classes)

    @property
    def uses_thresholds(self) -> bool:
        return self.name != "multiclass"

    def class_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """Balanced weights: binary/multiclass N / (K N_c) per class; multilabel N / (2 N_c)
        per label and value (each value of each label carries half of that label's loss),
        counting only the known entries of each label."""
        if self.name == "multilabel":
            known = ~targets.isnan()
            n = known.double().sum(0)
            positives = targets.double().nan_to_num().sum(0)
            negatives = n - positives
            return torch.stack(
                [n / (2 * negatives.clamp(min=1)), n / (2 * positives.clamp(min=1))]
            ).float()  # (2, L)
        k = 2 if self.name == "binary" else len(self.classes)
        counts = torch.bincount(targets, minlength=k).double().clamp(min=1)
        return (len(targets) / (k * counts)).float()

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean loss of a batch; with ``weights`` (from :meth:`class_weights`) the optimised,
        class-weighted form, without it the plain loss that is reported. Multilabel: the mean
        over the known entries (NaN targets are masked out)."""
        if self.name == "multiclass":  # weighted mean, as torch
            return F.cross_entropy(logits.float(), targets, weight=weights)
        per, known = self._per_entry(logits, targets, weights)
        if known is None or known.all():
            return per.mean()
        return (per * known).sum() / known.sum().clamp(min=1)

    def loss_sum(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`loss` times :meth:`loss_normalizer`: what the workers of a data-parallel
        run add up, each over its rows, before dividing by the whole batch's normaliser."""
        if self.name == "multiclass":
            return F.cross_entropy(logits.float(), targets, weight=weights, reduction="sum")
        per, known = self._per_entry(logits, targets, weights)
        return per.sum() if known is None else (per * known).sum()

    def _per_entry(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Binary and multilabel: the (class-weighted) loss of every entry, and which entries
        are known (multilabel; None for binary)."""
        logits = logits.float()
        if self.name == "binary":
            per = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
            return (per if weights is None else per * weights[targets]), None
        known = ~targets.isnan()
        target = targets.nan_to_num()
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if weights is not None:
            per = per * torch.where(target > 0.5, weights[1], weights[0])
        return per, known

    def loss_normalizer(
        self, targets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What :meth:`loss` divides the batch's summed loss by: the row count, the summed
        class weights (multi-class, as torch's weighted mean) or the known entries."""
        if self.name == "multiclass" and weights is not None:
            return weights[targets].sum()
        if self.name == "multilabel":
            return (~targets.isnan()).sum().clamp(min=1).float()
        return torch.tensor(float(len(targets)), device=targets.device)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Number of correct decisions at the default operating point (for training accuracy);
        multilabel counts the known label entries."""
        if self.name == "binary":
            return ((logits >= 0).long() == targets).sum()
        if self.name == "multiclass":
            return (logits.argmax(1) == targets).sum()
        return ((logits >= 0).float() == targets).sum()  # NaN equals nothing

    def decisions_per_row(self, targets: torch.Tensor) -> torch.Tensor:
        """Decisions per row that :meth:`correct` counts: 1, or the known entries' mean."""
        if self.name != "multilabel":
            return torch.ones((), device=targets.device)
        return (~targets.isnan()).double().sum().clamp(min=1) / len(targets)

    def probabilities(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Binary: P(positive) (N,); multiclass: softmax (N, K); multilabel: sigmoids (N, L)."""
        z = np.asarray(logits, dtype=np.float64) / temperature
        return softmax(z, axis=1) if self.name == "multiclass" else expit(z)

    def scores(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Ranking scores in the order of :meth:`probabilities` that never round to a tie:
        logits over the temperature (binary, multilabel) or log-softmax (multiclass). A
        probability rounds to exactly 1.0 beyond a logit of about 37."""
        z = np.asarray(logits, dtype=np.float64) / temperature
        return log_softmax(z, axis=1) if self.name == "multiclass" else z

    def mean_probabilities(self, views: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """``--tta``: the mean over views of :meth:`probabilities`; ``views`` (V, N, ...)."""
        if len(views) == 1:
            return self.probabilities(views[0], temperature)
        return np.mean([self.probabilities(z, temperature) for z in views], axis=0)

    def mean_scores(self, views: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Ranking scores of :meth:`mean_probabilities` that never round to a tie: the
        log-odds of the mean probability (binary, multilabel), the log of the mean softmax
        (multiclass), both through log-sum-exp; one view: :meth:`scores` itself."""
        if len(views) == 1:
            return self.scores(views[0], temperature)
        z = np.asarray(views, dtype=np.float64) / temperature
        log_n = np.log(len(z))
        if self.name == "multiclass":
            return logsumexp(log_softmax(z, axis=2), axis=0) - log_n
        log_p = logsumexp(-np.logaddexp(0.0, -z), axis=0) - log_n  # log mean sigmoid(z)
        log_q = logsumexp(-np.logaddexp(0.0, z), axis=0) - log_n  # log mean sigmoid(-z)
        return log_p - log_q

    def decide(self, prob: np.ndarray, thresholds: list[float] | None) -> np.ndarray:
        """Class index per image (binary, multiclass) or a 0/1 matrix (multilabel)."""
        prob = np.asarray(prob)
        if self.name == "multiclass":
            return prob.argmax(axis=1)
        cut = np.asarray(thresholds if thresholds is not None else [0.5] * self.outputs)
        if self.name == "binary":
            return (prob >= cut[0]).astype(np.int64)
        return (prob >= cut[None, :]).astype(np.int64)

    def names(self, decisions: np.ndarray) -> list[str]:
        """Decisions as class names; multilabel: the chosen labels joined by ``|``."""
        if self.name == "multilabel":
            return [
                "|".join(c for c, on in zip(self.classes, row, strict=True) if on)
                for row in decisions
            ]
        return [self.classes[int(i)] for i in decisions]


def make_task(name: str, classes: list[str] | tuple[str, ...]) -> Task:
    if name not in TASKS:
        raise MedxferError(f"--task {name!r}: choose from {', '.join(TASKS)}")
    return Task(name, tuple(classes))
