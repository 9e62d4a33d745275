"""Distances between two sets of feature vectors: the paper's Eq. 9 (mean pairwise distance),
the Fréchet distance (FID) and linear CKA. Exact, and blockwise so no n x m matrix is held."""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 2048


def mean_pairwise_euclidean(
    x: torch.Tensor, y: torch.Tensor | None = None, block: int = BLOCK
) -> float:
    """Eq. 9 with Euclidean distance: mean of ||x_i - y_j|| over all pairs (i, j).

    With ``y`` None, the within-set mean over pairs i != j. Computed in float64 blocks of
    ``block`` rows of ``x`` against all of ``y``, on whatever device ``x`` lives on.
    """
    within = y is None
    x = x.double()
    y = x if within else y.to(x.device).double()
    y_sq = (y * y).sum(1)
    total = 0.0
    for start in range(0, len(x), block):
        xb = x[start : start + block]
        sq = (xb * xb).sum(1, keepdim=True) + y_sq - 2.0 * xb @ y.T
        dist = sq.clamp_(min=0).sqrt_()
        if within:  # the diagonal is 0 up to rounding; make it exactly 0
            rows = torch.arange(len(xb), device=x.device)
            dist[rows, rows + start] = 0.0
        total += float(dist.sum())
    pairs = len(x) * (len(x) - 1) if within else len(x) * len(y)
    return total / pairs


def mean_pairwise_cosine(x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """Eq. 9 with cosine distance 1 - cos(x_i, y_j), exactly and in O(n + m): the mean of the
    dot products of unit vectors is the dot product of their sums over the number of pairs."""
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    sx = xn.sum(0)
    if y is None:
        n = len(xn)
        return 1.0 - float((sx @ sx - (xn * xn).sum()) / (n * (n - 1)))
    yn = torch.nn.functional.normalize(y.double().to(xn.device), dim=1)
    return 1.0 - float(sx @ yn.sum(0)) / (len(xn) * len(yn))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) of Gaussians fitted to each set.

    Tr((S_x S_y)^(1/2)) is the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S_x^(1/2) S_y S_x^(1/2), which stays exact when the covariances are singular (fewer
    samples than dimensions) where a general matrix square root turns complex.
    """
    x, y = x.double().cpu().numpy(), y.double().cpu().numpy()
    mu = x.mean(0) - y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    sx_half = _psd_sqrt(sx)
    eig = np.linalg.eigvalsh(sx_half @ sy @ sx_half)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(max(mu @ mu + np.trace(sx) + np.trace(sy) - 2.0 * trace_sqrt, 0.0))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n inputs."""
    if len(x) != len(y):
        raise ValueError(f"linear CKA needs paired samples, got {len(x)} and {len(y)}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eig, vec = np.linalg.eigh(matrix)
    return (vec * np.sqrt(np.clip(eig, 0, None))) @ vec.T
