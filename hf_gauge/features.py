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

__all__ = ["WeightFeatures", "DEFAULT_MAX_ROWS", "rows_cap", "paired_weight_features", "feature_correlation",
           "signed_cosine_", "invariant_agreement", "match_residual_from_weights"]


@dataclass
class WeightFeatures:
    """Residual-coordinate features of one model: rows are residual coordinates (float64)."""

    signed: torch.Tensor          # [d, k_s]: flips with the residual sign
    invariant: torch.Tensor       # [d, k_u]: permuted only
    signed_names: list[str] = field(default_factory=list)
    invariant_names: list[str] = field(default_factory=list)


DEFAULT_MAX_ROWS = 2048
"""The default cap on vocabulary rows per signed tensor, at every width. The Gram of the selected rows costs
``2 rows d^2`` flops per tensor, the largest step of a data-free match at 7B+ widths (with ``d`` rows, the former
default above d=2048, it made find from files 2.8x its I/O floor at d=8192). What decides a match is the largest
chance cosine among ``d^2`` coordinate pairs, about ``sqrt(2 ln(d^2) / rows)``: 0.13 at d=8192 with 2048 rows. On
real SmolLM2 (d=576) against its gauged copy with every weight perturbed by 5-50% relative noise, 256 rows (chance
cosine 0.32) recovered the gauge exactly, as 2048 did, with 19-21% smaller minimum margins at 5% and 20% noise
(``benchmarks/bench_row_cap.py --noise``); gauge-equivalent pairs are matched exactly with any rows."""


def rows_cap(max_rows: Any) -> int:
    """The vocabulary-row cap to use: ``DEFAULT_MAX_ROWS`` for None, else ``max_rows`` if it is a positive int;
    anything else (0, negative, a float or bool) is a ``GaugeError``."""
    if max_rows is None:
        return DEFAULT_MAX_ROWS
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise GaugeError(f"max_rows={max_rows!r}: give a positive number of vocabulary rows per signed tensor, or "
                         f"None for the default ({DEFAULT_MAX_ROWS})")
    return max_rows


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

    ``max_rows`` caps the vocabulary rows used per signed tensor (default ``DEFAULT_MAX_ROWS``): the rows with the
    largest ``||A_v|| + ||B_v||`` (row norms are invariant under every residual gauge), the same rows in both models.
    """
    va, vb = ModelView.of(model_a), ModelView.of(model_b)
    spec = va.spec
    d = va.config.hidden
    cap = rows_cap(max_rows)
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
            raise GaugeError(f"parameter {name!r} is on the meta device (offloaded): fit from the checkpoint files "
                             "instead, hf_gauge.find_gauge(folder_a, folder_b) (folders or Hub ids: reads them block "
                             "by block, no model loaded), or pass data= to match from activations")
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


_ROWS = 256    # rows of a d×d result finished per step (in place: no d×d temporaries)


def signed_cosine_(cross: torch.Tensor, na: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
    """``cos = cross / (na[:, None] * nb[None, :])`` in ``cross``'s memory: 0 where a norm is 0, clamped to [-1, 1].
    ``cross [d, d]``: ``s_A s_B^T``; ``na``, ``nb``: the rows' norms (float64)."""
    pos_b = nb > 0
    for r0 in range(0, cross.shape[0], _ROWS):
        blk = cross[r0:r0 + _ROWS]
        blk.div_((na[r0:r0 + _ROWS, None] * nb[None, :]).clamp_min_(1e-300))
        blk.masked_fill_(~((na[r0:r0 + _ROWS, None] > 0) & pos_b[None, :]), 0.0)
    return cross.clamp_(-1.0, 1.0)


_AGREE_BYTES = 1 << 20    # invariant_agreement's row blocks (cache-sized)


def invariant_agreement(ua: torch.Tensor, ub: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(-mean_k (z_A[i, k] - z_B[j, k])**2)`` ``[d, d]`` for invariant features ``ua``, ``ub`` ``[d, k]``, each
    feature z-scored over both models (constant features dropped). Made in cache-sized row blocks; ``into`` (a
    ``[d, d]`` float64 tensor) is multiplied by it in place and returned (no d×d temporary), else a new tensor."""
    both = torch.cat([ua, ub], 0)
    mu, sd = both.mean(0), both.std(0)
    keep = sd > 1e-12 * both.abs().amax(0).clamp_min(1e-300)   # constant features carry nothing
    za = (ua[:, keep] - mu[keep]) / sd[keep]
    zb = (ub[:, keep] - mu[keep]) / sd[keep]
    k = max(1, za.shape[1])
    na, nb = (za * za).sum(1), (zb * zb).sum(1)
    out = torch.empty(ua.shape[0], ub.shape[0], dtype=torch.float64) if into is None else into
    rows = max(1, _AGREE_BYTES // max(1, 8 * ub.shape[0]))
    for r0 in range(0, ua.shape[0], rows):
        r1 = min(ua.shape[0], r0 + rows)
        dist = na[r0:r1, None] + nb[None, :]
        dist.sub_(torch.mm(za[r0:r1], zb.T).mul_(2.0))          # |z_A|^2 + |z_B|^2 - 2 z_A z_B^T
        dist.clamp_min_(0.0).div_(k).neg_().exp_()
        if into is None:
            out[r0:r1] = dist
        else:
            out[r0:r1].mul_(dist)
    return out


def feature_correlation(fa: WeightFeatures, fb: WeightFeatures) -> torch.Tensor:
    """``C [d, d]`` (see the module docstring): signed cosine times the invariant-feature agreement."""
    d = fa.signed.shape[0]
    cos = None
    if fa.signed.shape[1]:
        cos = signed_cosine_(fa.signed @ fb.signed.T, fa.signed.norm(dim=1), fb.signed.norm(dim=1))
    if fa.invariant.shape[1]:
        return invariant_agreement(fa.invariant, fb.invariant, into=cos)
    return cos if cos is not None else torch.ones(d, d, dtype=torch.float64)


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
