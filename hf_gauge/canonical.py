"""A canonical chart defined by the weights alone.

``canonical_gauge(model)`` returns the gauge ``g`` (model's chart -> canonical chart, ``x_can[j] = sign[j] * x[perm[j]]``)
such that any two gauge-equivalent checkpoints (residual + MLP units + heads) become bit-identical after
``apply_gauge(model, canonical_gauge(model))``. Every key below is either an exact weight value or a reduction of one
coordinate's own contiguous slice (float64), so it is the same bit pattern in every chart; orderings compare keys
exactly and break remaining ties by comparing the full sign-normalized slices lexicographically.

Residual coordinates (space ``"residual"``):
  order, descending, by the squared norm of the coordinate's input-embedding column (the most drift-stable key
  measured on SmolLM2; its quantized final-norm gain takes only 90 distinct values over 576 coordinates), then by
  the exact gain vector (final-norm gain first, then every residual norm gain in parameter order), then by ``|sum|``
  and ``sum of squares`` of each residual-only signed tensor slice (embedding, untied lm_head, writer/norm biases);
  ties: lexicographic comparison of the sign-normalized slices, then of the sorted ``|values|`` of every layer
  tensor's slice (invariant under the inner gauges). Sign (B_d): ``+1`` so that the coordinate's input-embedding column sum is positive
  (fallbacks: sum of cubes, then its first non-zero entry). LayerNorm models (``S_d x {±1}``): one global sign, chosen
  so that canonical coordinate 0 has a positive embedding column sum.
MLP units of layer i (space ``"mlp.<i>"``), computed in the canonical residual chart:
  sign so that the up row (first signed slice) sums positive (fallbacks as above); order, descending, by the unit's
  total squared norm, then each slice's sum of squares (gate row, up row, down column, ...), then the sums of
  unsigned slices and ``|sum|`` of signed ones;
  ties: full sign-normalized slices.
Attention heads of layer i (``"attn.<i>"``), in the canonical residual chart:
  heads within a KV group ordered, descending, by the sum of squares and sum of each head slice (q block, o block,
  ...); KV groups ordered by the k/v slices' keys, then by their heads' keys (in canonical head order).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .assign import UnitSlice
from .engine import axes_for
from .errors import GaugeError
from .gauge import Gauge, target_space
from .group import SignedPermutation
from .inner import unit_slices
from .kinds import get_kind
from .models import apply_gauge, describe
from .view import ModelView

__all__ = ["canonical_gauge", "canonicalize", "canonical_stability", "StabilityReport"]


# ----------------------------------------------------------------------------------------------------------------
# Exact ordering helpers
# ----------------------------------------------------------------------------------------------------------------
def _row_stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row (sum, sum of squares, sum of cubes) in float64; each row reduced on its own contiguous copy."""
    x = x.detach().to("cpu", torch.float64).contiguous()
    return x.sum(1).numpy(), (x * x).sum(1).numpy(), (x * x * x).sum(1).numpy()


def _first_nonzero_sign(rows: list[torch.Tensor]) -> np.ndarray:
    """Per row: the sign of the first non-zero entry across the given ``[n, *]`` tensors (0 if all are zero)."""
    n = rows[0].shape[0]
    out = np.zeros(n)
    for t in rows:
        t = t.detach().to("cpu", torch.float64)
        todo = out == 0
        if not todo.any():
            break
        nz = t != 0
        has = nz.any(1).numpy()
        first = nz.to(torch.int8).argmax(1)
        val = t.gather(1, first[:, None])[:, 0].numpy()
        pick = todo & has
        out[pick] = np.sign(val[pick])
    return out


def _signs(sums: np.ndarray, cubes: np.ndarray, rows: list[torch.Tensor]) -> np.ndarray:
    s = np.sign(sums)
    s = np.where(s == 0, np.sign(cubes), s)
    if (s == 0).any():
        s = np.where(s == 0, _first_nonzero_sign(rows), s)
    return s


def _order(keys: list[np.ndarray], full: Callable[[int], tuple], what: str) -> np.ndarray:
    """Indices sorted descending by ``keys`` (primary first, compared exactly); exact ties by ``full(i)`` (descending)."""
    n = len(keys[0]) if keys else 0
    if not keys:
        idx = np.arange(n)
    else:
        K = np.stack([np.asarray(k, dtype=np.float64) for k in keys])
        idx = np.lexsort(-K[::-1])                   # lexsort: last key is primary
        Ks = K[:, idx]
        same = np.all(Ks[:, 1:] == Ks[:, :-1], axis=0)
        if same.any():
            idx = idx.copy()
            start = 0
            for j in range(1, n + 1):
                if j == n or not same[j - 1]:
                    if j - start > 1:
                        grp = idx[start:j]
                        fulls = [full(int(i)) for i in grp]
                        srt = sorted(range(len(grp)), key=lambda k: fulls[k], reverse=True)
                        if any(fulls[srt[k]] == fulls[srt[k + 1]] for k in range(len(srt) - 1)):
                            warnings.warn(f"{what}: some coordinates are indistinguishable by the canonical keys and "
                                          "their full slices; their canonical order falls back to index order",
                                          stacklevel=3)
                        idx[start:j] = grp[srt]
                    start = j
    return idx


def _full_vectors(slices: list[torch.Tensor], signs: np.ndarray | None) -> Callable[[int], tuple]:
    def full(i: int) -> tuple:
        s = 1.0 if signs is None else float(signs[i])
        return tuple(v for t in slices for v in (t[i].double() * s).tolist())
    return full


# ----------------------------------------------------------------------------------------------------------------
# Residual
# ----------------------------------------------------------------------------------------------------------------
def _canonical_residual(v: ModelView, params: dict[str, torch.Tensor]) -> SignedPermutation:
    spec = v.spec
    d = v.config.hidden
    final = spec.sites.final_norm + ".weight"
    gains: list[tuple[str, torch.Tensor]] = []
    signed: list[tuple[str, torch.Tensor]] = []
    for name, t in params.items():
        axes = axes_for(spec, name)
        if not axes or any(a.space != "residual" for a in axes) or len(axes) != 1:
            continue
        a = axes[0]
        if not a.signed and t.dim() == 1:
            gains.append((name, t))
        elif a.signed:
            signed.append((name, t.movedim(a.axis, 0).reshape(d, -1)))
    gains.sort(key=lambda nt: nt[0] != final)                     # final norm first, then parameter order
    embed = spec.sites.embed + ".weight"
    signed.sort(key=lambda nt: nt[0] != embed)                    # input embedding first
    if not signed:
        raise GaugeError(f"the {spec.name} spec declares no residual-only signed tensor (embedding); "
                         "cannot fix canonical signs")
    stats = []
    for name, rows in signed:
        # reduce each coordinate's slice on its own contiguous row, in chunks (no [d, vocab] float64 copy at once)
        parts = [_row_stats(rows[c0:c0 + 64]) for c0 in range(0, d, 64)]
        stats.append(tuple(np.concatenate([p[k] for p in parts]) for k in range(3)))
    # primary: the embedding column's squared norm (it averages over the vocabulary, so it is the key that moves
    # least under fine-tuning drift; quantized gains tie often), then the exact gains, then the remaining stats
    keys: list[np.ndarray] = [stats[0][1]] + [g.detach().cpu().double().numpy() for _, g in gains]
    for s, q, _ in stats:
        keys += [np.abs(s), q]
    sums, _, cubes = stats[0]
    rows = [r for _, r in signed]
    sgn = _signs(sums, cubes, rows)
    if (sgn == 0).any():
        j = int(np.nonzero(sgn == 0)[0][0])
        raise GaugeError(f"residual coordinate {j} has an all-zero embedding column and biases: its canonical sign is "
                         "undefined")
    # exact ties in every key: compare the sign-normalized slices, then (invariant under the inner gauges, which
    # permute and sign the other axis of layer tensors) the sorted |values| of every other tensor's slice
    others = []
    for name, t in params.items():
        axes = axes_for(spec, name) or ()
        res_axes = [a for a in axes if a.space == "residual"]
        if res_axes and len(axes) > 1:
            others.append(t.movedim(res_axes[0].axis, 0).reshape(d, -1))
    pure = _full_vectors(rows, sgn)

    def full(i: int) -> tuple:
        return pure(i) + tuple(v for t in others for v in t[i].abs().double().sort().values.tolist())
    perm = _order(keys, full, "residual")
    rule = spec.space("residual").signs
    if rule == "any":
        sign = sgn[perm]
    elif rule == "global":
        sign = np.full(d, sgn[perm[0]])
    else:
        sign = np.ones(d)
    return SignedPermutation(torch.from_numpy(perm.copy()), torch.from_numpy(sign.astype(np.int64)))


# ----------------------------------------------------------------------------------------------------------------
# Inner spaces
# ----------------------------------------------------------------------------------------------------------------
def _unit_keys(slices: list[UnitSlice]) -> list[np.ndarray]:
    """Sign-invariant unit keys: total squared norm (slices summed in a fixed order, elementwise, so exact in every
    chart), each slice's squared norm, then each slice's sum (``|sum|`` for signed slices)."""
    stats = [_row_stats(sl.data) for sl in slices]
    total = np.zeros_like(stats[0][1])
    for _, q, _ in stats:
        total = total + q
    keys = [total] + [q for _, q, _ in stats]
    keys += [np.abs(s) if sl.signed else s for sl, (s, _, _) in zip(slices, stats)]
    return keys


def _canonical_units(v: ModelView, space: str, residual: SignedPermutation, params) -> SignedPermutation:
    slices = unit_slices(v, space, residual, params=params)
    signed = [s for s in slices if s.signed]
    n = slices[0].data.shape[0]
    if signed:
        sums, _, cubes = _row_stats(signed[0].data)
        sgn = _signs(sums, cubes, [s.data for s in signed])
        sgn = np.where(sgn == 0, 1.0, sgn)        # an all-zero signed slice: the sign does not change the weights
    else:
        sgn = np.ones(n)
    keys = _unit_keys(slices)
    full = _full_vectors([s.data * (torch.from_numpy(sgn).to(s.data.dtype)[:, None] if s.signed else 1)
                          for s in slices], None)
    perm = _order(keys, full, space)
    return SignedPermutation(torch.from_numpy(perm.copy()), torch.from_numpy(sgn[perm].astype(np.int64)))


def _canonical_groups(v: ModelView, space: str, residual: SignedPermutation, params) -> SignedPermutation:
    """Grouped kinds (heads in KV groups): heads within each group, then groups as wholes."""
    slices = unit_slices(v, space, residual, params=params)
    q = [s for s in slices if not s.kv]
    kv = [s for s in slices if s.kv]
    n_heads = q[0].data.shape[0]
    g = get_kind(v.spec.space(space).kind).group_size(n_heads, v.config)
    n_kv = n_heads // g
    hkeys = np.stack(_unit_keys(q))                         # [n_keys, n_heads]
    hfull = _full_vectors([s.data for s in q], None)
    within: list[np.ndarray] = []
    for grp in range(n_kv):
        local = _order([k[grp * g:(grp + 1) * g] for k in hkeys],
                       lambda i, grp=grp: hfull(grp * g + i), space)
        within.append(local)
    gkeys: list[np.ndarray] = list(_unit_keys(kv)) if kv else []
    for k in range(hkeys.shape[0]):                               # heads' keys in canonical head order
        for slot in range(g):
            gkeys.append(np.array([hkeys[k, grp * g + within[grp][slot]] for grp in range(n_kv)]))
    kvfull = _full_vectors([s.data for s in kv], None) if kv else (lambda i: ())

    def gfull(grp: int) -> tuple:
        return kvfull(grp) + tuple(v for slot in range(g) for v in hfull(grp * g + int(within[grp][slot])))
    order = _order(gkeys, gfull, space)
    perm = np.concatenate([order[G] * g + within[order[G]] for G in range(n_kv)])
    return SignedPermutation(torch.from_numpy(perm.astype(np.int64)))


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def canonical_gauge(model: Any, spaces: Iterable[str] | None = None) -> Gauge:
    """The gauge from ``model``'s chart to the canonical chart (see the module docstring for the convention).

    ``spaces`` names space families (``"residual"``, ``"mlp"``, ``"attn"``, any template's first part; default
    every family of the spec); dropping one keeps its chart (then only gauge-equivalence in the kept spaces is removed). The inner spaces are always ordered
    in the canonical residual chart, so ``"residual"`` is always computed.
    """
    v = ModelView.of(model)
    spec = v.spec
    fams = tuple(dict.fromkeys(t.split(".")[0] for t in spec.spaces))
    spaces = fams if spaces is None else ((spaces,) if isinstance(spaces, str) else tuple(spaces))
    bad = [s for s in spaces if s not in fams]
    if bad:
        raise GaugeError(f"canonical_gauge spaces must be among {', '.join(repr(f) for f in fams)}; got {bad}")
    params = v.params()
    res = _canonical_residual(v, params)
    out: dict[str, SignedPermutation] = {"residual": res} if "residual" in spaces else {}
    for name in v.space_sizes():
        if name.split(".")[0] not in spaces or name == "residual":
            continue
        kind = get_kind(spec.space(name).kind)
        out[name] = (_canonical_groups if kind.grouped else _canonical_units)(v, name, res, params)
    if not out:
        raise GaugeError("canonical_gauge needs at least one space")
    g = Gauge(spaces=out, method="canonical")
    g.source = describe(v)
    return g


def canonicalize(model: Any, spaces: Iterable[str] | None = None) -> Gauge:
    """Move ``model`` into the canonical chart in place (exact); returns the gauge that was applied."""
    g = canonical_gauge(model, spaces)
    apply_gauge(model, g)
    return g


@dataclass
class StabilityReport:
    """Per space: how many coordinates of A keep their canonical index (and sign) in B."""

    spaces: dict[str, dict[str, float]]

    def fraction(self, space: str = "residual") -> float:
        """Fraction kept in ``space`` (``"mlp"``/``"attn"`` pool every layer)."""
        rows = [v for k, v in self.spaces.items() if k == space or k.split(".")[0] == space]
        if not rows:
            raise GaugeError(f"no space {space!r} in this report ({list(self.spaces)[:4]}...)")
        return sum(r["kept"] for r in rows) / sum(r["total"] for r in rows)

    def summary(self) -> dict[str, float]:
        heads = dict.fromkeys(k.split(".")[0] for k in self.spaces)     # the gauge's order: residual first
        return {h: self.fraction(h) for h in heads}

    def table(self) -> str:
        lines = [f"{'space':<10} {'kept':>8} {'total':>8} {'fraction':>9} {'sign kept':>10}"]
        for h in self.summary():
            rows = [v for k, v in self.spaces.items() if k == h or k.split(".")[0] == h]
            kept, tot = sum(r["kept"] for r in rows), sum(r["total"] for r in rows)
            sk = sum(r["sign_kept"] for r in rows)
            lines.append(f"{h:<10} {kept:>8d} {tot:>8d} {kept / tot:>9.3f} {sk / tot:>10.3f}")
        return "\n".join(lines)


def canonical_stability(model_a: Any, model_b: Any, gauge: Gauge | None = None,
                        spaces: Iterable[str] | None = None) -> StabilityReport:
    """How many coordinates keep their canonical index from A to B (e.g. B a fine-tune of A).

    Coordinate ``i`` of A corresponds to ``i`` of B (same chart), or to ``gauge.map_indices(i)`` when a gauge A -> B
    is given. It keeps its canonical index when both canonical charts send it to the same position; ``sign_kept``
    also requires the same canonical sign. A carried space (an expert's units) is compared with its counterpart in B
    (``gauge.target_space``: the slot A's expert moved to); the experts' own positions are reported under ``moe.<i>``.
    """
    ga, gb = canonical_gauge(model_a, spaces), canonical_gauge(model_b, spaces)
    out: dict[str, dict[str, float]] = {}
    for name, ea in ga.spaces.items():
        eb = gb.spaces[name if gauge is None else target_space(name, gauge.spaces)]
        d = ea.size
        idx = torch.arange(d)
        ib = idx if gauge is None or name not in gauge.spaces else gauge[name].map_indices(idx)
        sb = torch.ones(d, dtype=torch.int8) if gauge is None or name not in gauge.spaces else \
            gauge[name].inverse().sign            # sign of A's coordinate i as seen in B
        pos_a, pos_b = ea.map_indices(idx), eb.map_indices(ib)
        sign_a = ea.inverse().sign[idx]
        sign_b = eb.inverse().sign[ib] * sb
        kept = pos_a == pos_b
        out[name] = {"kept": int(kept.sum()), "total": d, "fraction": float(kept.double().mean()),
                     "sign_kept": int((kept & (sign_a == sign_b)).sum())}
    return StabilityReport(out)
