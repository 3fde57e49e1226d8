"""Matching: from a correlation matrix between two charts to a signed permutation.

``C[i, j] = corr(A_i, B_j)`` for coordinate i of chart A and j of chart B. A gauge maps A -> B with
``x_B[j] = sign[j] * x_A[perm[j]]``, so B's coordinate j is matched to A's ``perm[j]``.

- ``method="signed"`` (B_d, sign-marginalized): Hungarian on ``-|C|``, then ``sign[j] = sign(C[perm[j], j])``.
- ``method="permutation"`` (the S_d baseline): Hungarian on ``-C``, all signs +1. With decorrelated coordinates its
  accuracy is capped at the fraction of positive signs in the true gauge.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import GaugeError
from .group import SignedPermutation

__all__ = ["Match", "match_correlation", "METHODS"]

METHODS = ("signed", "permutation")


@dataclass
class Match:
    """A matched signed permutation with per-coordinate confidence (indexed by B's coordinate j)."""

    element: SignedPermutation
    score: np.ndarray        # matched |C| (signed) or C (permutation) per B coordinate
    margin: np.ndarray       # matched score minus the best competitor in its row and column

    def summary(self, low: float = 0.05) -> dict[str, float]:
        return {
            "mean_matched": float(self.score.mean()),
            "min_matched": float(self.score.min()),
            "min_margin": float(self.margin.min()),
            "mean_margin": float(self.margin.mean()),
            "n_low_confidence": int((self.margin < low).sum()),
            "positive_fraction": self.element.positive_fraction,
        }


def _runner_up(S: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Best competitor of each matched entry (rows[k], cols[k]) in its row and its column."""
    d = S.shape[0]
    masked = S.copy()
    masked[rows, cols] = -np.inf
    row_best = masked.max(axis=1)   # per A coordinate
    col_best = masked.max(axis=0)   # per B coordinate
    return np.maximum(row_best[rows], col_best[cols]) if d > 1 else np.full(len(rows), -np.inf)


def match_correlation(C: np.ndarray | torch.Tensor, method: str = "signed") -> Match:
    """Solve the assignment for ``C [d_A, d_B]`` (square) with scipy's ``linear_sum_assignment``."""
    if method not in METHODS:
        raise GaugeError(f"unknown matching method {method!r}; use one of {METHODS} (or 'procrustes' for orthogonal maps)")
    C = C.detach().cpu().double().numpy() if isinstance(C, torch.Tensor) else np.asarray(C, dtype=np.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.shape[0] == 0:
        raise GaugeError(f"the correlation matrix must be square and non-empty, got shape {C.shape}")
    if not np.all(np.isfinite(C)):
        raise GaugeError("the correlation matrix has NaN or inf entries (constant coordinates or empty data?)")
    S = np.abs(C) if method == "signed" else C
    rows, cols = linear_sum_assignment(S, maximize=True)   # rows = A coordinates, cols = B coordinates
    d = C.shape[0]
    perm = np.empty(d, dtype=np.int64)
    perm[cols] = rows
    if method == "signed":
        sign = np.where(C[perm, np.arange(d)] < 0, -1, 1)
    else:
        sign = np.ones(d, dtype=np.int64)
    score = np.empty(d)
    margin = np.empty(d)
    score[cols] = S[rows, cols]
    margin[cols] = S[rows, cols] - _runner_up(S, rows, cols)
    return Match(SignedPermutation(torch.from_numpy(perm), torch.from_numpy(sign)), score, margin)
