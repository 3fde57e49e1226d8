"""Coordinate-indexed interpretability objects: index sets and attribution lists over one gauge space.

Under a gauge ``g`` (``x_B[j] = sign[j] * x_A[perm[j]]``), source coordinate ``i`` lands at target coordinate
``j = g.inverse().perm[i]`` (``SignedPermutation.map_indices``) and a quantity read off that coordinate is
multiplied by ``sign[j]``. So ``IndexSet`` indices are mapped, and ``Attribution`` scores also take the sign.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .errors import GaugeError
from .gauge import check_space_name

__all__ = ["IndexSet", "Attribution"]


def _indices(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if t.dim() != 1:
        raise GaugeError(f"indices must be one-dimensional, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise GaugeError(f"indices must be integers, got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.int64).clone()
    if t.numel() and int(t.min()) < 0:
        raise GaugeError(f"indices must be non-negative, got {int(t.min())}")
    uniq, counts = torch.unique(t, return_counts=True)
    if bool((counts > 1).any()):
        raise GaugeError(f"duplicate indices {uniq[counts > 1][:5].tolist()}: an index set names each coordinate once")
    return t


def _space(space: str) -> str:
    return check_space_name(space)


@dataclass(frozen=True)
class IndexSet:
    """A set of coordinates of one gauge space (``"residual"``, ``"mlp.<i>"``, ``"attn.<i>"``), order kept.

    Transport: ``i -> g[space].inverse().perm[i]``.
    """

    indices: torch.Tensor
    space: str = "residual"

    def __init__(self, indices: Sequence[int] | torch.Tensor | np.ndarray, space: str = "residual") -> None:
        object.__setattr__(self, "indices", _indices(indices))
        object.__setattr__(self, "space", _space(space))

    def __len__(self) -> int:
        return self.indices.numel()

    def tolist(self) -> list[int]:
        return self.indices.tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IndexSet):
            return NotImplemented
        return self.space == other.space and torch.equal(self.indices, other.indices)

    __hash__ = None

    def transport(self, gauge) -> "IndexSet":
        return gauge.transport(self)


@dataclass(frozen=True)
class Attribution:
    """Scored coordinates of one gauge space: ``(indices[k], scores[k, ...])``.

    ``scores`` has the indices on its first axis (extra axes allowed, e.g. per token). Transport maps the indices
    like ``IndexSet``. With ``signed=True`` (default) each score is multiplied by the sign of its target coordinate:
    the rule for quantities that are coordinates of a vector (signed activations, decoder weights, gradients along
    a coordinate). Gauge-invariant scores (``|activation|``, activation x gradient, ablation effects) keep their
    values: pass ``signed=False``.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    space: str = "residual"
    signed: bool = True

    def __init__(self, indices: Sequence[int] | torch.Tensor | np.ndarray,
                 scores: Sequence[float] | torch.Tensor | np.ndarray, space: str = "residual",
                 signed: bool = True) -> None:
        idx = _indices(indices)
        sc = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores).detach().clone()
        if sc.dim() == 0 or sc.shape[0] != idx.numel():
            raise GaugeError(f"scores have shape {tuple(sc.shape)} but there are {idx.numel()} indices; "
                             "scores need one entry per index on their first axis")
        if not (sc.is_floating_point() or sc.is_complex() or sc.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
            raise GaugeError(f"scores must be numeric (signs are applied to them), got dtype {sc.dtype}")
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "scores", sc)
        object.__setattr__(self, "space", _space(space))
        object.__setattr__(self, "signed", bool(signed))

    def __len__(self) -> int:
        return self.indices.numel()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Attribution):
            return NotImplemented
        return (self.space == other.space and self.signed == other.signed
                and torch.equal(self.indices, other.indices)
                and self.scores.dtype == other.scores.dtype and torch.equal(self.scores, other.scores))

    __hash__ = None

    def top(self, k: int) -> "Attribution":
        """The ``k`` entries with the largest ``|score|`` (first axis; extra axes reduced by max)."""
        mag = self.scores.abs().reshape(len(self), -1).amax(dim=1) if len(self) else self.scores
        order = torch.argsort(mag, descending=True, stable=True)[:k]
        return Attribution(self.indices[order], self.scores[order], self.space, self.signed)

    def transport(self, gauge) -> "Attribution":
        return gauge.transport(self)
