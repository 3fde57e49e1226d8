"""Matching the gauges inside a block: SwiGLU hidden units (``"mlp.<i>"``) and attention heads (``"attn.<i>"``).

Convention (as everywhere in hf_gauge): a gauge maps model A's chart to model B's, ``x_B[j] = sign[j] * x_A[perm[j]]``.
For an MLP space, B's unit ``j`` is A's unit ``perm[j]`` (its up row / down column multiplied by ``sign[j]``; the gate
row is permuted only). For an attention space, B's query head ``j`` is A's head ``perm[j]``; heads sharing a KV head
move together, so ``perm`` maps KV groups to KV groups as wholes.

Two sources of evidence, both generic over the architecture spec (``engine.axes_for`` says which tensors carry an
``mlp.<i>`` / ``attn.<i>`` axis):

- activations (``data`` given): the input of ``spec.sites.mlp_in`` (MLP hidden activations) and of
  ``spec.sites.attn_out_in`` (concatenated head outputs), streamed into float64 running sums (never an n×d store);
  padding is excluded through ``attention_mask``. These spaces are invariant under the residual gauge, so no
  residual gauge is needed.
- weights (data-free): a unit is described by every tensor slice on its axis (gate row, up row, down column, biases;
  a head by its q/o blocks, a KV group by its k/v blocks), after bringing A's residual axes into B's chart with the
  residual gauge. Unit similarity is the mean over tensors of the cosine of the slices, with the unit's sign chosen
  optimally for the slices that the sign acts on (``|sum of signed cosines| + sum of unsigned cosines``).

Heads are matched hierarchically: KV groups first (Hungarian on a group score that includes the best within-group
head assignment), then heads within matched groups (a small Hungarian per group).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .engine import axes_for, resolve_name, space_sizes
from .errors import GaugeError
from .gauge import Gauge
from .group import SignedPermutation
from .match import match_correlation
from .models import describe, unwrap
from .specs import ArchSpec, get_spec

__all__ = ["InnerMatch", "match_inner", "find_full_gauge", "residual_from_embeddings", "unit_slices", "slices_from",
           "match_slices", "n_kv_heads"]


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


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared with canonical.py
# ----------------------------------------------------------------------------------------------------------------
def n_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _sign_rule(spec: ArchSpec, space: str) -> str:
    return spec.spaces[spec.space_template(space)[0]].signs


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The chart's named parameters (tied tensors once) under plain names: a PEFT-wrapped base layer is keyed like
    the unwrapped one, and LoRA factors / DoRA magnitudes (not part of the chart) are left out."""
    out = {}
    for n, p in m.named_parameters():
        name, role = resolve_name(n)
        if role == "weight":
            out[name] = p.detach()
    return out


@dataclass
class UnitSlice:
    """The slices of one tensor along a unit axis: ``data[u]`` is unit u's flattened slice."""

    name: str
    data: torch.Tensor           # [n_units, features], in the (given) residual chart
    signed: bool                 # the unit's sign multiplies this slice
    kv: bool = False             # the axis indexes KV heads (attention only)


def unit_slices(model: Any, space: str, residual: SignedPermutation | None = None, *,
                params: Mapping[str, torch.Tensor] | None = None) -> list[UnitSlice]:
    """Every tensor slice along the unit axis of ``space`` (``"mlp.3"``, ``"attn.0"``), residual axes moved by ``residual``.

    A tensor ``W`` with an axis in ``space`` gives ``[n_units, rest]`` (block axes such as a head's ``head_dim`` rows
    are folded into the unit). Its residual axes are re-indexed by ``residual.perm`` (and signed where the spec
    says the axis is signed), exactly as ``apply_gauge`` would move them. Tensors with an axis in another inner space
    are refused (the spec would make their slices chart-dependent).
    """
    m = unwrap(model)
    return slices_from(get_spec(m), m.config, space, params if params is not None else _params(m), residual)


def slices_from(spec: ArchSpec, config, space: str, params: Mapping[str, torch.Tensor],
                residual: SignedPermutation | None = None) -> list[UnitSlice]:
    """``unit_slices`` from a spec, a config and ``{name: tensor}`` (no model needed: tensors read from files)."""
    dims = spec.dims(config)
    rule = _sign_rule(spec, space)
    out: list[UnitSlice] = []
    for name, t in params.items():
        axes = axes_for(spec, name)
        if not axes:
            continue
        unit = [a for a in axes if a.space == space]
        if not unit:
            continue
        a = unit[0]
        x = t
        for b in axes:
            if b.space == "residual" and residual is not None:
                if residual.size != x.shape[b.axis]:
                    raise GaugeError(f"{name}: the residual gauge acts on {residual.size} coordinates but the tensor "
                                     f"has {x.shape[b.axis]} on axis {b.axis}")
                x = x.index_select(b.axis, residual.perm.to(x.device))
                if b.signed and not residual.is_permutation:
                    shape = [1] * x.dim()
                    shape[b.axis] = -1
                    x = x * residual.sign.to(device=x.device, dtype=x.dtype).view(shape)
            elif b.space != "residual" and b.space != space:
                raise GaugeError(f"{name} carries axes in two inner spaces ({b.space!r} and {space!r}); "
                                 "unit slices would depend on the other space's chart")
        x = x.movedim(a.axis, 0)
        n = x.shape[0] // (dims[a.block] if a.block else 1)
        out.append(UnitSlice(name, x.reshape(n, -1).contiguous(), signed=a.signed and rule == "any", kv=a.kv))
    if not out:
        raise GaugeError(f"no tensor of this {config.model_type} model carries an axis in space {space!r}")
    return out


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _slice_similarity(sa: list[UnitSlice], sb: list[UnitSlice]
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(score, signed_part, plain)``, each ``[n_A, n_B]``.

    ``score`` = mean over tensors of slice cosines with the optimal unit sign (``|Σ signed| + Σ unsigned``) / n;
    ``signed_part`` = Σ of the signed tensors' cosines (its sign is the unit sign), None without signed tensors;
    ``plain`` = mean cosine with sign +1 (the permutation-only baseline).
    """
    if [a.name for a in sa] != [b.name for b in sb]:
        raise GaugeError("the two models' tensors on this space differ; they cannot be gauge-equivalent")
    signed = [(a, b) for a, b in zip(sa, sb) if a.signed]
    unsigned = [(a, b) for a, b in zip(sa, sb) if not a.signed]
    n_t = len(signed) + len(unsigned)
    cs = None
    cu = 0.0
    if signed:
        fa = torch.cat([_normalize_rows(a.data) for a, _ in signed], dim=1)
        fb = torch.cat([_normalize_rows(b.data) for _, b in signed], dim=1)
        cs = (fa @ fb.T).double().numpy()
    if unsigned:
        fa = torch.cat([_normalize_rows(a.data) for a, _ in unsigned], dim=1)
        fb = torch.cat([_normalize_rows(b.data) for _, b in unsigned], dim=1)
        cu = (fa @ fb.T).double().numpy()
    score = (np.abs(cs) if cs is not None else 0.0) + cu
    plain = (cs if cs is not None else 0.0) + cu
    return np.asarray(score) / n_t, cs, np.asarray(plain) / n_t


def _check_pair(ma: torch.nn.Module, mb: torch.nn.Module) -> ArchSpec:
    spec = get_spec(ma)
    if get_spec(mb) is not spec:
        raise GaugeError(f"cannot match a {ma.config.model_type} model with a {mb.config.model_type} model")
    sa, sb = space_sizes(spec, ma.config), space_sizes(spec, mb.config)
    if sa != sb:
        diff = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))[:4]
        raise GaugeError(f"the two models have different gauge spaces or widths (e.g. {diff}); they cannot be gauge-equivalent")
    return spec


def _wanted(spec: ArchSpec, config, spaces: Iterable[str], layers: Iterable[int] | None) -> list[str]:
    sizes = space_sizes(spec, config)
    spaces = tuple(spaces)
    for s in spaces:
        if s not in ("mlp", "attn") and not (s in sizes and s != "residual"):
            raise GaugeError(f"match_inner matches 'mlp', 'attn' or single spaces like 'mlp.3'; got {s!r}")
    keep = set(int(i) for i in layers) if layers is not None else None
    out = [s for s in sizes if s != "residual" and (s in spaces or s.split(".")[0] in spaces)]
    if keep is not None:
        bad = sorted(keep - set(range(config.num_hidden_layers)))
        if bad:
            raise GaugeError(f"layers {bad} do not exist (the model has {config.num_hidden_layers})")
        out = [s for s in out if int(s.split(".")[1]) in keep]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Assignment pieces
# ----------------------------------------------------------------------------------------------------------------
def _match_units(score: np.ndarray, signed_part: np.ndarray | None, signed: bool) -> tuple[SignedPermutation, dict]:
    """Hungarian on ``score`` (higher is better); signs from ``signed_part`` when the space admits them."""
    if signed and signed_part is not None:
        # match_correlation maximizes |C| and reads the sign from C: feed a positive monotone image of the score
        # carrying the sign of the signed part (same assignment, since the map is affine).
        sgn = np.where(signed_part < 0, -1.0, 1.0)
        C = sgn * (score + 1.0) / 2.0
        res = match_correlation(C, method="signed")
        matched = score[res.element.perm.numpy(), np.arange(score.shape[1])]
        margin = 2.0 * res.margin          # back to score units
        conf = {"mean_score": float(matched.mean()), "min_score": float(matched.min()),
                "min_margin": float(margin.min()), "mean_margin": float(margin.mean()),
                "n_low_confidence": int((margin < 0.05).sum()), "positive_fraction": res.element.positive_fraction}
        return res.element, conf
    res = match_correlation(score, method="permutation")
    conf = res.summary()
    conf["mean_score"] = conf["mean_matched"]
    return res.element, conf


def _head_assignment(H: np.ndarray, n_kv: int, kv_score: np.ndarray | None = None,
                     kv_weight: float = 0.0) -> tuple[SignedPermutation, dict]:
    """Query-head permutation from a head score ``H [n_heads_A, n_heads_B]`` respecting KV groups.

    Group score ``G[a, b] = (1 - w) * best within-group head assignment (mean) + w * kv_score[a, b]``; Hungarian on G,
    then Hungarian on heads within each matched pair of groups.
    """
    n = H.shape[0]
    g = n // n_kv
    G = np.zeros((n_kv, n_kv))
    inner: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for a in range(n_kv):
        for b in range(n_kv):
            sub = H[a * g:(a + 1) * g, b * g:(b + 1) * g]
            r, c = linear_sum_assignment(sub, maximize=True)
            inner[a, b] = (r, c)
            G[a, b] = sub[r, c].mean()
    if kv_score is not None:
        G = (1.0 - kv_weight) * G + kv_weight * kv_score
    ga, gb = linear_sum_assignment(G, maximize=True)
    perm = np.empty(n, dtype=np.int64)
    for a, b in zip(ga, gb):
        r, c = inner[a, b]
        perm[b * g + c] = a * g + r
    el = SignedPermutation(torch.from_numpy(perm))
    matched = H[perm, np.arange(n)]
    Hm = H.copy()
    Hm[perm, np.arange(n)] = -np.inf
    runner = np.maximum(Hm.max(axis=0), Hm.max(axis=1)[perm]) if n > 1 else np.full(n, -np.inf)
    Gm = G.copy()
    Gm[ga, gb] = -np.inf
    conf = {"mean_score": float(matched.mean()), "min_score": float(matched.min()),
            "min_margin": float((matched - runner).min()),
            "group_min_margin": float((G[ga, gb] - np.maximum(Gm.max(axis=0)[gb], Gm.max(axis=1)[ga])).min())
            if n_kv > 1 else float("inf")}
    return el, conf


# ----------------------------------------------------------------------------------------------------------------
# Data-free
# ----------------------------------------------------------------------------------------------------------------
def _inner_from_weights(ma, mb, spec: ArchSpec, wanted: list[str], residual: SignedPermutation | None,
                        method: str) -> InnerMatch:
    pa, pb = _params(ma), _params(mb)
    out = InnerMatch(source="weights")
    for space in wanted:
        sa = unit_slices(ma, space, residual, params=pa)
        sb = unit_slices(mb, space, None, params=pb)
        out[space], out.confidence[space] = match_slices(spec, ma.config, space, sa, sb, method)
    return out


def match_slices(spec: ArchSpec, config, space: str, sa: list[UnitSlice], sb: list[UnitSlice],
                 method: str = "signed") -> tuple[SignedPermutation, dict]:
    """Data-free match of one inner space from both models' unit slices (A's already in B's residual chart)."""
    if space.startswith("mlp."):
        score, cs, plain = _slice_similarity(sa, sb)
        if method == "signed":
            return _match_units(score, cs, _sign_rule(spec, space) == "any")
        return _match_units(plain, None, False)
    qa, qb = [s for s in sa if not s.kv], [s for s in sb if not s.kv]
    ka, kb = [s for s in sa if s.kv], [s for s in sb if s.kv]
    H = _slice_similarity(qa, qb)[0]
    K = _slice_similarity(ka, kb)[0] if ka else None
    w = len(ka) / (len(ka) + len(qa)) if ka else 0.0
    return _head_assignment(H, n_kv_heads(config), K, w)


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------
def _batches(data: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(input_ids, attention_mask)`` from a LongTensor ``[B, T]``, a dict / BatchEncoding, or an iterable of those."""
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int64, torch.int32) or data.dim() not in (1, 2):
            raise GaugeError(f"data must be token ids [batch, seq] (int64), got {data.dtype} {tuple(data.shape)}")
        yield (data if data.dim() == 2 else data[None]).long(), None
        return
    if isinstance(data, Mapping):
        if "input_ids" not in data:
            raise GaugeError("a data dict needs 'input_ids' (and optionally 'attention_mask')")
        ids = torch.as_tensor(data["input_ids"])
        mask = data.get("attention_mask")
        yield (ids if ids.dim() == 2 else ids[None]).long(), (None if mask is None else torch.as_tensor(mask).reshape(ids.shape[0] if ids.dim() == 2 else 1, -1))
        return
    if isinstance(data, (list, tuple)) or inspect.isgenerator(data) or hasattr(data, "__iter__"):
        n = 0
        for item in data:
            for b in _batches(item):
                n += 1
                yield b
        if n == 0:
            raise GaugeError("data is empty")
        return
    raise GaugeError(f"unsupported data of type {type(data).__name__}: pass token ids [batch, seq] or a tokenizer output")


class _Stop(Exception):
    pass


def _run_capture(m: torch.nn.Module, sites: dict[str, str], ids: torch.Tensor, mask: torch.Tensor | None,
                 stop_at: str | None = None) -> dict[str, torch.Tensor]:
    """Inputs of the named modules (``{key: module path}``) for the non-padding tokens, as ``[n_tokens, width]``."""
    got: dict[str, torch.Tensor] = {}
    keep = None if mask is None else mask.reshape(-1).bool()
    handles = []

    def hook_for(key: str):
        def hook(_mod, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1])
            got[key] = (x if keep is None else x[keep.to(x.device)]).to("cpu")
            if key == stop_at:
                raise _Stop
        return hook

    try:
        for key, path in sites.items():
            handles.append(m.get_submodule(path).register_forward_pre_hook(hook_for(key)))
        base = getattr(m, m.base_model_prefix, m)     # skip the lm_head: only inner activations are needed
        dev = next(m.parameters()).device
        kw = {"input_ids": ids.to(dev), "use_cache": False}
        if mask is not None:
            kw["attention_mask"] = mask.to(dev)
        with torch.no_grad():
            try:
                base(**kw)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return got


class _CrossStats:
    """Streaming float64 sums for ``corr(A_i, B_j)`` (or per-dimension head correlations with ``blocks``)."""

    def __init__(self, width: int, blocks: int | None = None) -> None:
        self.n = 0
        self.blocks = blocks
        self.sa = torch.zeros(width, dtype=torch.float64)
        self.sb = torch.zeros(width, dtype=torch.float64)
        self.saa = torch.zeros(width, dtype=torch.float64)
        self.sbb = torch.zeros(width, dtype=torch.float64)
        if blocks is None:
            self.sab = torch.zeros(width, width, dtype=torch.float64)
        else:
            self.sab = torch.zeros(blocks, blocks, width // blocks, dtype=torch.float64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape:
            raise GaugeError(f"activation shapes differ between the models: {tuple(a.shape)} vs {tuple(b.shape)}")
        a, b = a.double(), b.double()
        self.n += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        if self.blocks is None:
            self.sab += a.T @ b
        else:
            h = self.blocks
            self.sab += torch.einsum("nak,nbk->abk", a.view(a.shape[0], h, -1), b.view(b.shape[0], h, -1))

    def reduce(self) -> "_CrossStats":
        """Sum over ``accelerate`` processes (each streamed its own shard of the data); returns self."""
        from .stats import reduce_sums
        names = ("sa", "sb", "saa", "sbb", "sab")
        summed = reduce_sums({"n": torch.tensor([float(self.n)], dtype=torch.float64),
                              **{k: getattr(self, k) for k in names}})
        self.n = int(summed["n"].item())
        for k in names:
            setattr(self, k, summed[k].cpu())
        return self

    def corr(self) -> np.ndarray:
        """``C[i, j]``; a constant coordinate correlates 0 with everything. Heads: mean over head dims."""
        if self.n < 2:
            raise GaugeError("need at least 2 non-padding tokens to correlate activations")
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        va = (self.saa / n - ma * ma).clamp_min(0)
        vb = (self.sbb / n - mb * mb).clamp_min(0)
        sda = torch.where(va > 1e-24, va.sqrt(), torch.full_like(va, float("inf")))
        sdb = torch.where(vb > 1e-24, vb.sqrt(), torch.full_like(vb, float("inf")))
        if self.blocks is None:
            cov = self.sab / n - ma[:, None] * mb[None, :]
            C = cov / sda[:, None] / sdb[None, :]
        else:
            h = self.blocks
            ma, mb, sda, sdb = (t.view(h, -1) for t in (ma, mb, sda, sdb))
            cov = self.sab / n - ma[:, None, :] * mb[None, :, :]
            C = (cov / sda[:, None, :] / sdb[None, :, :]).mean(-1)
        return C.clamp(-1, 1).numpy()


def _inner_from_activations(ma, mb, spec: ArchSpec, wanted: list[str], data: Any,
                            max_stat_bytes: int, method: str) -> InnerMatch:
    n_heads = ma.config.num_attention_heads
    n_kv = n_kv_heads(ma.config)
    sizes = space_sizes(spec, ma.config)

    def width(space: str) -> int:
        m = ma.get_submodule(_site(spec, space))
        return m.in_features if hasattr(m, "in_features") else m.weight.shape[1]

    def cost(space: str) -> int:
        w = width(space)
        return 8 * (w * w if space.startswith("mlp.") else w * n_heads)

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
    batches = list(_batches(data))
    out = InnerMatch(source="activations")
    for group in passes:
        stats = {s: _CrossStats(width(s), None if s.startswith("mlp.") else n_heads) for s in group}
        sites = {s: _site(spec, s) for s in group}
        last = max(group, key=lambda s: (int(s.split(".")[1]), s.startswith("mlp.")))
        for ids, mask in batches:
            acts_a = _run_capture(ma, sites, ids, mask, stop_at=last)
            acts_b = _run_capture(mb, sites, ids, mask, stop_at=last)
            for s in group:
                stats[s].update(acts_a.pop(s), acts_b.pop(s))
        for s in group:
            C = stats[s].reduce().corr()
            if s.startswith("mlp."):
                signed = _sign_rule(spec, s) == "any" and method == "signed"
                res = match_correlation(C, method="signed" if signed else "permutation")
                el, conf = res.element, res.summary()
                conf["mean_score"] = conf["mean_matched"]
            else:
                if sizes[s] != n_heads:
                    raise GaugeError(f"space {s} has {sizes[s]} heads but the config says {n_heads}")
                el, conf = _head_assignment(C, n_kv)
            conf["n_tokens"] = stats[s].n
            out[s] = el
            out.confidence[s] = conf
    return out


def _site(spec: ArchSpec, space: str) -> str:
    head, i = space.split(".")
    return (spec.sites.mlp_in if head == "mlp" else spec.sites.attn_out_in).format(i=int(i))


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
                spaces: Iterable[str] = ("mlp", "attn"), method: str = "signed", *,
                layers: Iterable[int] | None = None, max_stat_bytes: int = 256 << 20) -> InnerMatch:
    """Match MLP-unit and attention-head gauges from A's chart to B's: ``{"mlp.<i>": el, "attn.<i>": el, ...}``.

    With ``data`` (token ids or a tokenizer output), from activation correlations (residual not needed). Without,
    data-free from weights; the residual gauge A -> B (a SignedPermutation, Gauge or Match) aligns the residual axes
    of the unit slices; when it is None, it is found data-free from the input embeddings
    (``residual_from_embeddings``). ``method="permutation"`` is the S_d baseline: MLP units matched on the signed
    similarity itself (Hungarian on ``-C``), all signs +1; a flipped unit's true partner then looks anti-correlated.
    ``layers`` restricts to some layers; ``max_stat_bytes`` bounds the float64 statistics held at once (several
    passes over ``data`` when needed). The result carries ``.confidence[space]``.
    """
    if method not in ("signed", "permutation"):
        raise GaugeError(f"method must be 'signed' or 'permutation', got {method!r}")
    ma, mb = unwrap(model_a), unwrap(model_b)
    spec = _check_pair(ma, mb)
    wanted = _wanted(spec, ma.config, spaces, layers)
    if not wanted:
        raise GaugeError(f"no inner space selected by spaces={tuple(spaces)} and layers={layers}")
    if data is not None:
        out = _inner_from_activations(ma, mb, spec, wanted, data, max_stat_bytes, method)
    else:
        res = _as_residual(residual)
        if res is None:
            res = residual_from_embeddings(ma, mb).element
        out = _inner_from_weights(ma, mb, spec, wanted, res, method)
    return out


def residual_from_embeddings(model_a: Any, model_b: Any, chunk: int = 4096):
    """Data-free residual match: correlation of the input-embedding columns (``C [d, d]``, float64 sums) -> Match.

    On LayerNorm models (group S_d x {±1}) the signs are forced to one global sign (the majority).
    """
    ma, mb = unwrap(model_a), unwrap(model_b)
    spec = _check_pair(ma, mb)
    ea = ma.get_submodule(spec.sites.embed).weight.detach()
    eb = mb.get_submodule(spec.sites.embed).weight.detach()
    if ea.shape != eb.shape:
        raise GaugeError(f"embedding shapes differ: {tuple(ea.shape)} vs {tuple(eb.shape)}")
    v, d = ea.shape
    s = _CrossStats(d)
    for r0 in range(0, v, chunk):
        a, b = ea[r0:r0 + chunk].float().cpu(), eb[r0:r0 + chunk].float().cpu()
        s.n += a.shape[0]
        s.sa += a.sum(0, dtype=torch.float64)
        s.sb += b.sum(0, dtype=torch.float64)
        s.saa += (a.double() ** 2).sum(0)
        s.sbb += (b.double() ** 2).sum(0)
        s.sab += (a.T @ b).double()
    res = match_correlation(s.corr(), method="signed")
    if _sign_rule(spec, "residual") == "global":
        g = 1 if res.element.positive_fraction >= 0.5 else -1
        res.element = SignedPermutation(res.element.perm, torch.full((d,), g, dtype=torch.int64))
    elif _sign_rule(spec, "residual") == "none":
        res.element = SignedPermutation(res.element.perm)
    return res


def find_full_gauge(model_a: Any, model_b: Any, data: Any = None, *, method: str = "signed",
                    layers: Iterable[int] | None = None) -> Gauge:
    """The full gauge A -> B: residual (``match.find_gauge``) plus every MLP-unit and attention-head space
    (``match_inner``; from activations when ``data`` is given). Same as ``find_gauge(..., spaces="all")`` but with
    ``layers`` to restrict the inner spaces."""
    from .match import find_gauge
    ma, mb = unwrap(model_a), unwrap(model_b)
    residual = find_gauge(ma, mb, data=data, method=method).residual
    inner = match_inner(ma, mb, residual=residual, data=data, method=method, layers=layers)
    g = inner.to_gauge(residual, method=f"full(find_gauge+{inner.source})")
    g.source, g.target = describe(ma), describe(mb)
    return g
