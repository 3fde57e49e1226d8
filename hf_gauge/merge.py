"""Model merging in a common chart: bring B into A's chart, then interpolate coordinate by coordinate.

A gauge ``g`` maps A's chart to B's (``x_B = g(x_A)``), so ``g.inverse()`` applied to (a copy of) B expresses B in
A's chart; the merge is ``theta = (1 - weight) * theta_A + weight * g^{-1}(theta_B)`` for every parameter.
Merging A with a gauged copy of itself returns A. Without alignment (or with a permutation-only gauge on a model
whose true gauge flips signs) coordinates that carry the same feature with opposite signs cancel.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .errors import GaugeError
from .gauge import Gauge
from .models import apply_gauge, unwrap

__all__ = ["merge"]


def merge(model_a: Any, model_b: Any, weight: float = 0.5, gauge: Gauge | None = None, method: str = "signed",
          **find_kwargs: Any) -> Any:
    """A new model: ``(1 - weight) * A + weight * B`` with B first moved into A's chart. Inputs are not modified.

    Args:
        gauge: the gauge from A's chart to B's; ``None`` fits one with ``hf_gauge.match.find_gauge(model_a, model_b,
            method=method, **find_kwargs)``. Unlike ``find_gauge`` itself (residual only by default), the merge fits
            every gauge space by default (``spaces="all"``: residual, MLP units and attention heads), because a
            merge interpolates every weight and an unaligned inner space cancels features just like an unaligned
            residual. Pass ``spaces=("residual",)`` in ``find_kwargs`` to fit the residual stream only.
        method: ``"signed"`` (B_d, sign-marginalized) or ``"permutation"`` (the S_d baseline) when fitting.
            ``"none"`` merges without alignment (for comparison).
    """
    if not 0.0 <= float(weight) <= 1.0:
        raise GaugeError(f"weight must lie in [0, 1] (the weight of model_b), got {weight}")
    a, b = unwrap(model_a), unwrap(model_b)
    if a.config.model_type != b.config.model_type:
        raise GaugeError(f"cannot merge a {a.config.model_type!r} model with a {b.config.model_type!r} model")
    if gauge is None and method != "none":
        from .match import find_gauge     # lazy: match.py is optional at import time
        if method in ("signed", "permutation"):
            find_kwargs.setdefault("spaces", "all")   # every weight is interpolated: align every gauge space
        gauge = find_gauge(model_a, model_b, method=method, **find_kwargs)
    b_in_a = copy.deepcopy(b)
    if gauge is not None:
        if not isinstance(gauge, Gauge):
            raise GaugeError(f"gauge must be a hf_gauge.Gauge, got {type(gauge).__name__}")
        apply_gauge(b_in_a, gauge.inverse())
    out = copy.deepcopy(a)
    pb = dict(b_in_a.named_parameters())
    w = float(weight)
    with torch.no_grad():
        for n, p in out.named_parameters():
            if n not in pb:
                raise GaugeError(f"parameter {n!r} of model_a has no counterpart in model_b")
            q = pb[n]
            if q.shape != p.shape:
                raise GaugeError(f"parameter {n!r}: shape {tuple(p.shape)} in model_a but {tuple(q.shape)} in model_b")
            if p.is_floating_point():
                p.copy_(torch.lerp(p, q.to(p.dtype), w))
    return out
