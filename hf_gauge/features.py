"""Data-free matching features: read the residual axis of every weight from the architecture spec.

For every parameter the spec gives a residual ``Axis`` (``hf_gauge.engine.axes_for``), the slices along that axis are
features of the residual coordinates. How a slice moves under the full gauge decides its kind:

- *signed* features: the residual axis is the tensor's only moving axis and it is signed (token embedding and lm_head
  columns, indexed by the vocabulary; writer biases). Under ``x_B = g(x_A)`` the slice of B's coordinate ``j`` equals
  ``sign[j]`` times A's slice of ``perm[j]``, *whatever the inner (MLP / head) gauges are*: these give perm and sign.
- *invariant* features: norm gains (permuted, never signed), and, for tensors whose other axis is itself a gauge
  space (reader columns ``[out, d]``, writer rows ``[d, in]``), the L2 norm of the slice, which inner signed
  permutations and the residual sign leave unchanged. These give the permutation only.

The similarity of A's coordinate ``i`` and B's coordinate ``j`` is
``C[i, j] = cos(s_A[i], s_B[j]) * exp(-mean_k (u_A[i, k] - u_B[j, k])**2)``
(``s``: signed features, ``u``: invariant features z-scored per feature). For gauge-equivalent checkpoints the matched
entries are exactly ``±1`` and every other entry is smaller, so sign-marginalized matching is exact.

``match_residual_from_weights`` is the one data-free residual matcher: ``find_gauge(data=None)`` and
``match_inner`` without a residual both call it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .assign import Match, match_correlation
from .engine import axes_for, resolve_name
from .errors import GaugeError
from .view import ModelView

__all__ = ["WeightFeatures", "paired_weight_features", "feature_correlation", "match_residual_from_weights"]


@dataclass
class WeightFeatures:
    """Residual-coordinate features of one model: rows are residual coordinates (float64)."""

    signed: torch.Tensor          # [d, k_s]: flips with the residual sign
    invariant: torch.Tensor       # [d, k_u]: permuted only
    signed_names: list[str] = field(default_factory=list)
    invariant_names: list[str] = field(default_factory=list)


def _residual_axis(axes) -> tuple[Any, tuple]:
    res = [a for a in axes if a.space == "residual"]
    if not res:
        return None, ()
    return res[0], tuple(a for a in axes if a is not res[0])


def _norm(x: torch.Tensor, dim) -> torch.Tensor:
    """L2 norms over ``dim`` accumulated in at least float32 (bf16/fp16 weights too), returned as CPU float64."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=dim, dtype=acc).to("cpu", torch.float64)


def paired_weight_features(model_a: Any, model_b: Any, max_rows: int | None = None) -> tuple[WeightFeatures, WeightFeatures]:
    """Features of both models, built from the same spec and the same free-axis rows.

    ``max_rows`` caps the vocabulary rows used per signed tensor (default ``max(2048, 8 d)``): the rows with the
    largest ``||A_v|| + ||B_v||`` (row norms are invariant under every residual gauge), the same rows in both models.
    """
    va, vb = ModelView.of(model_a), ModelView.of(model_b)
    spec = va.spec
    d = va.config.hidden
    cap = max_rows or max(2048, 8 * d)
    params_b = {resolve_name(n)[0]: p for n, p in vb.named_parameters()}   # PEFT-wrapped names -> plain names
    sa, sb, ua, ub, sn, un = [], [], [], [], [], []
    for name, pa in va.named_parameters():
        name, role = resolve_name(name)
        if role != "weight":
            continue                      # LoRA factors and DoRA magnitudes are not features of the chart
        axes = axes_for(spec, name)
        if not axes:
            continue
        res, others = _residual_axis(axes)
        if res is None:
            continue
        pb = params_b.get(name)
        if pb is None or pb.shape != pa.shape:
            raise GaugeError(f"parameter {name!r} has shape {tuple(pa.shape)} in model A but "
                             f"{'is missing' if pb is None else tuple(pb.shape)} in model B; the two checkpoints do "
                             "not share an architecture")
        if pa.device.type == "meta" or pb.device.type == "meta":
            raise GaugeError(f"parameter {name!r} is on the meta device (offloaded): load the weights, or pass data= "
                             "to match from activations")
        if not others and res.signed:
            xa = pa.detach().movedim(res.axis, -1).reshape(-1, d)       # [free, d]: rows are vocab entries etc.
            xb = pb.detach().movedim(res.axis, -1).reshape(-1, d)
            if xa.shape[0] > cap:                                       # pick rows before any float64 copy
                score = _norm(xa, 1) + _norm(xb, 1)
                rows = torch.topk(score, cap).indices.sort().values
                xa, xb = xa[rows.to(xa.device)], xb[rows.to(xb.device)]
            xa, xb = xa.T.to("cpu", torch.float64), xb.T.to("cpu", torch.float64)
            scale = 0.5 * (xa.norm() + xb.norm())
            if scale > 0:
                sa.append(xa / scale), sb.append(xb / scale), sn.append(name)
        elif not others:
            xa = pa.detach().movedim(res.axis, 0).reshape(d, -1).to("cpu", torch.float64)
            xb = pb.detach().movedim(res.axis, 0).reshape(d, -1).to("cpu", torch.float64)
            ua.append(xa), ub.append(xb), un.extend([name] * xa.shape[1])
        else:                                                           # slice norms: blind to inner gauges and signs
            dims = tuple(k for k in range(pa.dim()) if k != res.axis)
            ua.append(_norm(pa.detach(), dims)[:, None])
            ub.append(_norm(pb.detach(), dims)[:, None])
            un.append(name)

    def cat(xs):
        return torch.cat(xs, dim=1) if xs else torch.zeros(d, 0, dtype=torch.float64)

    return (WeightFeatures(cat(sa), cat(ua), sn, un), WeightFeatures(cat(sb), cat(ub), sn, un))


def feature_correlation(fa: WeightFeatures, fb: WeightFeatures) -> torch.Tensor:
    """``C [d, d]`` (see the module docstring): signed cosine times the invariant-feature agreement."""
    d = fa.signed.shape[0]
    if fa.signed.shape[1]:
        na, nb = fa.signed.norm(dim=1), fb.signed.norm(dim=1)
        cos = (fa.signed @ fb.signed.T) / (na[:, None] * nb[None, :]).clamp_min(1e-300)
        cos = torch.where((na[:, None] > 0) & (nb[None, :] > 0), cos, torch.zeros_like(cos)).clamp_(-1.0, 1.0)
    else:
        cos = torch.ones(d, d, dtype=torch.float64)
    if fa.invariant.shape[1]:
        both = torch.cat([fa.invariant, fb.invariant], 0)
        mu, sd = both.mean(0), both.std(0)
        keep = sd > 1e-12 * both.abs().amax(0).clamp_min(1e-300)   # constant features carry nothing
        za = (fa.invariant[:, keep] - mu[keep]) / sd[keep]
        zb = (fb.invariant[:, keep] - mu[keep]) / sd[keep]
        k = max(1, za.shape[1])
        dist = ((za * za).sum(1)[:, None] + (zb * zb).sum(1)[None, :] - 2.0 * za @ zb.T).clamp_min(0.0) / k
        agree = torch.exp(-dist)
    else:
        agree = torch.ones(d, d, dtype=torch.float64)
    return cos * agree


def match_residual_from_weights(model_a: Any, model_b: Any, method: str = "signed",
                                max_rows: int | None = None) -> tuple[Match, dict[str, int]]:
    """The data-free residual match A -> B: ``match_correlation(feature_correlation(*paired_weight_features(...)))``.

    Returns the ``Match`` (``x_B[j] = sign[j] * x_A[perm[j]]``) and the feature counts (``n_tokens=0``,
    ``n_signed_features``, ``n_invariant_features``). ``method="signed"`` needs a sign-carrying tensor (token
    embedding / lm_head) in the spec, else ``GaugeError``. Group admissibility (LayerNorm: S_d x {±1}) is the
    caller's check.
    """
    fa, fb = paired_weight_features(model_a, model_b, max_rows=max_rows)
    if fa.signed.shape[1] == 0 and method == "signed":
        raise GaugeError("data-free matching found no sign-carrying tensor (token embedding / lm_head) in the "
                         "architecture spec, so signs cannot be determined; pass data= to match from activations")
    info = {"n_tokens": 0, "n_signed_features": int(fa.signed.shape[1]),
            "n_invariant_features": int(fa.invariant.shape[1])}
    return match_correlation(feature_correlation(fa, fb), method, overwrite=True), info
