"""Steering / control vectors: tensors whose last axis is the residual width, and ``{layer: tensor}`` dicts.

Rule: ``v_B = g(v_A)``, i.e. ``v_B[j] = sign[j] * v_A[perm[j]]`` along the last axis, with ``g`` the gauge's residual
element, or with ``space=`` its element on that space (``"mlp.10"``: a vector over layer 10's MLP units).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import GaugeError
from . import register


def residual_of(gauge):
    if gauge.residual is None:
        raise GaugeError("this gauge has no residual space; residual-stream objects need gauge.residual")
    return gauge.residual


def move_vector(gauge, v: torch.Tensor, what: str = "vector", space: str | None = None) -> torch.Tensor:
    """``v`` moved along its last axis by the gauge's element on ``space`` (default ``"residual"``; a space the gauge
    does not hold is the identity there, so ``v`` comes back as a copy)."""
    if space is not None and space != "residual":
        from ..gauge import check_space_name
        check_space_name(space)
        q = gauge.spaces.get(space)
        if q is None:
            return v.detach().clone()
    else:
        q = residual_of(gauge)
    if not v.is_floating_point():
        raise GaugeError(f"{what} has dtype {v.dtype}: a residual-stream vector must be floating point (a sign flip "
                         "wraps int8 -128 and is lost in unsigned or bool dtypes); cast it to float first, e.g. "
                         "v.float() or arr.astype(np.float32)")
    if v.dim() == 0 or v.shape[-1] != q.size:
        where = space or "residual"
        raise GaugeError(f"width mismatch: {what} has shape {tuple(v.shape)} but the gauge's {where} space has size "
                         f"{q.size}; the last axis must be that space's size (space='mlp.3' for MLP units, "
                         "default the residual width)")
    return q.apply(v.detach(), dim=-1)


@register(lambda o: isinstance(o, torch.Tensor), "torch.Tensor [..., d]")
def _tensor(gauge, v: torch.Tensor, space: str | None = None, **_: Any) -> torch.Tensor:
    return move_vector(gauge, v, space=space)


@register(lambda o: isinstance(o, np.ndarray), "numpy.ndarray [..., d]")
def _ndarray(gauge, v: np.ndarray, space: str | None = None, **_: Any) -> np.ndarray:
    return move_vector(gauge, as_tensor(v), space=space).numpy().copy()


def as_tensor(v: np.ndarray, what: str = "array") -> torch.Tensor:
    """A float numpy array as a tensor (object, string and other non-numeric arrays are a ``GaugeError``)."""
    if v.dtype.kind not in "biufc":
        raise GaugeError(f"{what} has numpy dtype {v.dtype}; a residual-stream vector must be a float array: convert "
                         "it with arr.astype(np.float32)")
    return torch.from_numpy(np.ascontiguousarray(v))


@register(lambda o: isinstance(o, dict) and o and all(isinstance(k, int) for k in o)
          and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in o.values()), "{layer: vector}")
def _layer_dict(gauge, d: dict, **kw: Any) -> dict:
    out = {}
    for k, v in d.items():
        try:
            sp = kw.get("space")
            out[k] = _ndarray(gauge, v, space=sp) if isinstance(v, np.ndarray) else move_vector(gauge, v, space=sp)
        except GaugeError as e:
            raise GaugeError(f"layer {k}: {e}") from None
    return out
