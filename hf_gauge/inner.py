"""Matching the gauges inside a block: SwiGLU hidden units (``"mlp.<i>"``) and attention heads (``"attn.<i>"``).

Convention (as everywhere in hf_gauge): a gauge maps model A's chart to model B's, ``x_B[j] = sign[j] * x_A[perm[j]]``.
For an MLP space, B's unit ``j`` is A's unit ``perm[j]`` (its up row / down column multiplied by ``sign[j]``; the gate
row is permuted only). For an attention space, B's query head ``j`` is A's head ``perm[j]``; heads sharing a KV head
move together, so ``perm`` maps KV groups to KV groups as wholes.

Generic over the spec: ``engine.axes_for`` says which tensors carry an axis in a space, the space's kind
(``hf_gauge.kinds``) how to assign it. Two sources of evidence:

- activations (``data`` given): the input of the space's site (``spec.sites.inputs``: MLP hidden activations,
  concatenated head outputs), streamed into float64 running sums (never an n×d store);
  padding is excluded through ``attention_mask``. These spaces are invariant under the residual gauge, so no
  residual gauge is needed.
  Units the data cannot tell apart (no margin over a competitor: a ReLU-family unit never active, or two units
  active on the same few tokens) are assigned from the weights among themselves (``_fill_ties``).
- weights (data-free): a unit is described by every tensor slice on its axis (gate row, up row, down column, biases;
  a head by its q/o blocks, a KV group by its k/v blocks), after bringing A's residual axes into B's chart with the
  residual gauge. Unit similarity is the mean over tensors of the cosine of the slices, with the unit's sign chosen
  optimally for the slices that the sign acts on (``|sum of signed cosines| + sum of unsigned cosines``).

Heads are matched hierarchically: KV groups first (Hungarian on a group score that includes the best within-group
head assignment), then heads within matched groups (a small Hungarian per group).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from .activations import PairStats, capture_inputs, token_batches
from .assign import UnitSlice
from .engine import axes_for, segment_positions
from .errors import GaugeError
from .features import match_residual_from_weights
from .gauge import Gauge, target_space
from .group import SignedPermutation
from .kinds import get_kind
from .specs import ArchSpec, carried, carried_last
from .specs.base import Axis, fill
from .view import ConfigView, ModelView

__all__ = ["InnerMatch", "match_inner", "unit_slices", "slices_from", "match_slices",
           "tensor_axes", "has_site", "site_of"]


# ----------------------------------------------------------------------------------------------------------------
# Result type
# ----------------------------------------------------------------------------------------------------------------
class InnerMatch(dict):
    """``{space: SignedPermutation}`` (A's chart -> B's) with ``.confidence[space]`` (mean score, min margin, ...)."""

    def __init__(self, *args: Any, confidence: Mapping[str, dict] | None = None, source: str = "", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.confidence: dict[str, dict] = dict(confidence or {})
        self.source = source

    def to_gauge(self, residual: SignedPermutation | None = None, **kw: Any) -> Gauge:
        sp = dict(self)
        if residual is not None:
            sp["residual"] = residual
        return Gauge(spaces=sp, confidence=self.confidence, **kw)


def tensor_axes(spec: ArchSpec, name: str, t: torch.Tensor, files: bool = False
                ) -> Iterator[tuple[torch.Tensor, tuple[Axis, ...]]]:
    """``(tensor, axes)`` of a spec-named tensor (``files``: a checkpoint file's name); a tensor with a stacked axis
    yields each slice with its axes."""
    axes = axes_for(spec, name, files)
    if not axes:
        return
    st = next((a for a in axes if a.stack), None)
    if st is None:
        yield t, axes
        return
    others = [b for b in axes if b is not st]
    for k in range(t.shape[st.axis]):
        yield t.select(st.axis, k), tuple(b.filled({st.stack: k}).on(b.axis - (b.axis > st.axis)) for b in others)


def unit_slices(model: Any, space: str, residual: SignedPermutation | None = None, *,
                params: Mapping[str, torch.Tensor] | None = None) -> list[UnitSlice]:
    """Every tensor slice along the unit axis of ``space`` (``"mlp.3"``, ``"attn.0"``), residual axes moved by ``residual``.

    A tensor ``W`` with an axis in ``space`` gives ``[n_units, rest]`` (block axes such as a head's ``head_dim`` rows
    are folded into the unit; each part of a fused axis in ``space`` gives its own slice). Its residual axes are
    re-indexed by ``residual.perm`` (and signed where the spec says the axis is signed), exactly as ``apply_gauge``
    would move them. Tensors with an axis in another inner space are left out (their slices would depend on that
    space's chart: DeepSeek's ``q_b_proj`` lies in the q latent and the heads); a space whose every tensor is such is
    refused.
    """
    v = ModelView.of(model)
    return slices_from(v.spec, v.config, space, params if params is not None else v.params(), residual)


def slices_from(spec: ArchSpec, config: Any, space: str, params: Mapping[str, torch.Tensor],
                residual: SignedPermutation | None = None, files: bool = False) -> list[UnitSlice]:
    """``unit_slices`` from a spec, a config and ``{name: tensor}`` (no model needed: tensors read from files, named
    as checkpoint files name them when ``files``)."""
    config = ConfigView.of(config)
    dims = spec.dims(config)
    rule = spec.space(space).signs
    out: list[UnitSlice] = []
    mixed: list[tuple[str, str]] = []
    for name, full in params.items():
        for t, axes in tensor_axes(spec, name, full, files):
            unit = [(a, part) for a in axes for part in a.parts() if part.space == space]
            if not unit:
                continue
            other = next((sp for b in axes for sp in b.spaces if sp not in ("residual", space)), None)
            if other is not None:
                mixed.append((name, other))
                continue
            x = t
            for b in axes:
                if b.space == "residual" and residual is not None:
                    if residual.size != x.shape[b.axis]:
                        raise GaugeError(f"{name}: the residual gauge acts on {residual.size} coordinates but the "
                                         f"tensor has {x.shape[b.axis]} on axis {b.axis}")
                    x = x.index_select(b.axis, residual.perm.to(x.device))
                    if b.signed and not residual.is_permutation:
                        shape = [1] * x.dim()
                        shape[b.axis] = -1
                        x = x * residual.sign.to(device=x.device, dtype=x.dtype).view(shape)
            for a, part in unit:
                y = x
                if a.segments:
                    y = y.index_select(a.axis, segment_positions(spec, config, a, part).to(y.device))
                y = y.movedim(a.axis, 0)
                n = y.shape[0] // (dims[part.block] if part.block else 1)
                out.append(UnitSlice(name, y.reshape(n, -1).contiguous(), signed=part.signed and rule == "any",
                                     kv=part.kv))
    if not out and mixed:
        name, other = mixed[0]
        raise GaugeError(f"{name} carries axes in two inner spaces ({other!r} and {space!r}) and no other tensor "
                         f"describes {space!r}; unit slices would depend on the other space's chart")
    if not out:
        raise GaugeError(f"no tensor of this {config.model_type} model carries an axis in space {space!r}")
    return out


def _check_pair(va: ModelView, vb: ModelView) -> ArchSpec:
    spec = va.spec
    if vb.spec is not spec:
        raise GaugeError(f"cannot match a {va.config.model_type} model with a {vb.config.model_type} model")
    sa, sb = va.space_sizes(), vb.space_sizes()
    if sa != sb:
        diff = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))[:4]
        raise GaugeError(f"the two models have different gauge spaces or widths (e.g. {diff}); they cannot be gauge-equivalent")
    return spec


def _wanted(v: ModelView, spaces: Iterable[str], layers: Iterable[int] | None) -> list[str]:
    spec = v.spec
    sizes = v.space_sizes()
    spaces = tuple(spaces)
    inner = [s for s in sizes if spec.space(s).kind != "residual"]
    # a family of the spec that this config puts on no layer (Qwen-MoE's dense mlp when every layer routes) selects
    # nothing rather than being refused: the families are the spec's, the instances the config's
    fams = [f for f in spec.families if f != "residual"]
    for s in spaces:
        if s not in fams and s not in inner:
            raise GaugeError(f"match_inner matches {', '.join(repr(f) for f in fams)} or single spaces like "
                             f"{inner[0]!r}; got {s!r}")
    out = [s for s in inner if s in spaces or s.split(".")[0] in spaces]
    carriers = {c[0] for c in map(carried, out) if c is not None}
    out = carried_last([s for s in inner if s in carriers and s not in out] + out)   # with, and after, its carrier
    if layers is not None:
        keep = set(int(i) for i in layers)
        bad = sorted(keep - set(range(v.config.n_layers)))
        if bad:
            raise GaugeError(f"layers {bad} do not exist (the model has {v.config.n_layers})")
        out = [s for s in out if spec.parse_space(s)[1].get("i") in keep]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Data-free
# ----------------------------------------------------------------------------------------------------------------
def _inner_from_weights(va: ModelView, vb: ModelView, wanted: list[str], residual: SignedPermutation | None,
                        method: str, known: Mapping[str, SignedPermutation] | None = None) -> InnerMatch:
    """Carriers (``moe.<i>``) are matched before the spaces they carry: A's expert ``a`` is compared with the slot
    of B that the matched carrier gives it (``Space.carried_by``: carried spaces are indexed in A's chart)."""
    pa, pb = va.params(), vb.params()
    out = InnerMatch(source="weights")
    for space in wanted:
        other = target_space(space, {**(known or {}), **out})
        sa = unit_slices(va, space, residual, params=pa)
        sb = unit_slices(vb, other, None, params=pb)
        out[space], out.confidence[space] = match_slices(va.spec, va.config, space, sa, sb, method)
    return out


def match_slices(spec: ArchSpec, config: Any, space: str, sa: list[UnitSlice], sb: list[UnitSlice],
                 method: str = "signed") -> tuple[SignedPermutation, dict]:
    """Data-free match of one inner space from both models' unit slices (A's already in B's residual chart), by the
    space's kind."""
    sp = spec.space(space)
    return get_kind(sp.kind).match_weights(sa, sb, sp.signs == "any", method, ConfigView.of(config))


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------
def _inner_from_activations(va: ModelView, vb: ModelView, wanted: list[str], data: Any,
                            max_stat_bytes: int, method: str) -> tuple[InnerMatch, dict[str, np.ndarray]]:
    """The activation match of each space, and for each space whose match has ties the B units without margin."""
    spec, cfg = va.spec, va.config
    sizes = va.space_sizes()
    sites = {s: site_of(va, s) for s in wanted}

    def width(space: str) -> int:
        m = va.submodule(sites[space])
        if hasattr(m, "in_features"):
            return m.in_features
        hit = spec.rule_for(sites[space] + ".weight")           # a Conv1D weight is stored [in, out]
        return m.weight.shape[0 if hit is not None and hit[0].transposed else 1]

    def blocks(space: str) -> int | None:
        return get_kind(spec.space(space).kind).blocks(sizes[space], cfg)

    def cost(space: str) -> int:
        w, b = width(space), blocks(space)
        return 8 * (w * w if b is None else w * b)

    # group spaces into passes whose float64 cross sums fit the memory budget
    passes: list[list[str]] = [[]]
    used = 0
    for s in wanted:
        c = cost(s)
        if passes[-1] and used + c > max_stat_bytes:
            passes.append([])
            used = 0
        passes[-1].append(s)
        used += c
    batches = list(token_batches(data))
    out = InnerMatch(source="activations")
    ties: dict[str, np.ndarray] = {}
    for group in passes:
        stats = {s: PairStats(sites=[sites[s]], d=width(s), blocks=blocks(s)) for s in group}
        live = {s: sites[s] for s in group}
        for ids, mask in batches:
            acts_a = capture_inputs(va.module, live, ids, mask, stop_early=True)
            acts_b = capture_inputs(vb.module, live, ids, mask, stop_early=True)
            for s in group:
                if s not in acts_a or s not in acts_b:
                    raise GaugeError(f"the forward pass never called {live[s]!r}, where space {s!r} is observed (this "
                                     f"{cfg.model_type} config computes it without that module); match {s!r} from "
                                     "the weights: leave out data=")
                stats[s].update(0, acts_a.pop(s), acts_b.pop(s))
        for s in group:
            C = _correlation(stats[s].reduce())
            sp = spec.space(s)
            el, conf = get_kind(sp.kind).match_activations(C, sp.signs == "any", method, cfg)
            margin = conf.pop("_margin", None)
            conf["n_tokens"] = stats[s].n_tokens
            out[s] = el
            out.confidence[s] = conf
            if margin is not None and (margin <= TIE).any():
                ties[s] = np.flatnonzero(margin <= TIE)
    return out, ties


TIE = 1e-9      # a correlation margin at rounding level: the data does not single out the unit's partner


def _fill_ties(act: SignedPermutation, wts: SignedPermutation, tied: np.ndarray) -> tuple[SignedPermutation, str]:
    """Combine an activation match with a weight match of the same space: B's ``tied`` units (no activation margin)
    take the weight match, provided it maps them onto the same A units as the activation match (a reshuffle within
    the tie); otherwise the weight match is taken whole. Returns the element and its source."""
    j = torch.as_tensor(tied, dtype=torch.long)
    if set(act.perm[j].tolist()) != set(wts.perm[j].tolist()):
        return wts, "weights"
    perm, sign = act.perm.clone(), act.sign.clone()
    perm[j], sign[j] = wts.perm[j], wts.sign[j]
    return SignedPermutation(perm, sign), "activations+weights"


def _correlation(stats: PairStats) -> np.ndarray:
    if stats.n_tokens < 2:
        raise GaugeError("need at least 2 non-padding tokens to correlate activations")
    return stats.site_correlation(0).cpu().numpy()


def has_site(v: ModelView, space: str) -> bool:
    """Whether the spec names a module whose input is ``space``'s activation."""
    return v.spec.parse_space(space)[0] in v.spec.sites.inputs


def site_of(v: ModelView, space: str) -> str:
    """The spec path of the module whose input is ``space``'s activation (``Sites.inputs``)."""
    tmpl, values = v.spec.parse_space(space)
    path = v.spec.sites.inputs.get(tmpl)
    if path is None:
        raise GaugeError(f"the {v.spec.name!r} spec declares no observation site for {tmpl!r}; match {space!r} "
                         "data-free (data=None)")
    return fill(path, values)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def _as_residual(residual: Any) -> SignedPermutation | None:
    if residual is None or isinstance(residual, SignedPermutation):
        return residual
    if isinstance(residual, Gauge):
        return residual.residual
    el = getattr(residual, "element", None)
    if isinstance(el, SignedPermutation):
        return el
    raise GaugeError(f"residual must be a SignedPermutation, a Gauge or a Match, got {type(residual).__name__}")


def match_inner(model_a: Any, model_b: Any, residual: Any = None, data: Any = None,
                spaces: Iterable[str] | None = None, method: str = "signed", *,
                layers: Iterable[int] | None = None, max_stat_bytes: int = 256 << 20) -> InnerMatch:
    """Match the inner gauges (MLP units, attention heads, any non-residual space) from A's chart to B's:
    ``{"mlp.<i>": el, "attn.<i>": el, ...}``; ``spaces`` selects families or single spaces (default: every
    non-residual space of the spec).

    With ``data`` (token ids or a tokenizer output), from activation correlations (residual not needed). Without,
    data-free from weights; the residual gauge A -> B (a SignedPermutation, Gauge or Match) aligns the residual axes
    of the unit slices; when it is None, it is found by the data-free residual matcher ``find_gauge`` uses
    (``features.match_residual_from_weights``, signed). ``method="permutation"`` is the S_d baseline: MLP units matched on the signed
    similarity itself (Hungarian on ``-C``), all signs +1; a flipped unit's true partner then looks anti-correlated.
    ``layers`` restricts to some layers; ``max_stat_bytes`` bounds the float64 statistics held at once (several
    passes over ``data`` when needed). The result carries ``.confidence[space]``.
    """
    if method not in ("signed", "permutation"):
        raise GaugeError(f"method must be 'signed' or 'permutation', got {method!r}")
    va, vb = ModelView.of(model_a), ModelView.of(model_b)
    _check_pair(va, vb)
    if spaces is None:
        spaces = tuple(dict.fromkeys(s.split(".")[0] for s in va.space_sizes()               # this config's spaces
                                     if va.spec.space(s).kind != "residual"))
    wanted = _wanted(va, spaces, layers)
    if not wanted:
        raise GaugeError(f"no inner space selected by spaces={tuple(spaces)} and layers={layers}")
    observed = [s for s in wanted if data is not None and has_site(va, s)]
    unobserved = [s for s in wanted if s not in observed]
    out = InnerMatch(source="activations" if observed else "weights")
    ties: dict[str, np.ndarray] = {}
    if observed:
        got, ties = _inner_from_activations(va, vb, observed, data, max_stat_bytes, method)
        out.update(got)
        out.confidence.update(got.confidence)
    res = _as_residual(residual)
    if (unobserved or ties) and res is None:
        res = match_residual_from_weights(va, vb)[0].element
    if ties:                # units the data cannot tell apart: assigned from the weights
        got = _inner_from_weights(va, vb, list(ties), res, method, known=out)
        for s, tied in ties.items():
            out[s], source = _fill_ties(out[s], got[s], tied)
            out.confidence[s] = {**out.confidence[s], "source": source, "tied_units": int(len(tied))}
    if unobserved:          # data-free, or spaces no module's input shows (MoE experts): from the weights
        got = _inner_from_weights(va, vb, unobserved, res, method, known=out)
        for s in unobserved:
            out[s] = got[s]
            out.confidence[s] = {**got.confidence[s], "source": "weights"}
    out = InnerMatch({s: out[s] for s in wanted}, confidence=out.confidence, source=out.source)
    return out

