"""Gauge-sweep audits: is an index-level claim about a model a property of the function or of its chart?

``audit(model, claim)`` draws random gauges (``random_gauge``), applies each to a copy of the model (checking the
function is unchanged), re-evaluates ``claim`` there, and compares the result with the original two ways:

- raw: the indices as returned in the gauged chart (what a naive comparison across checkpoints would do);
- transported: the indices mapped back to the original chart through the gauge. With ``x_B[j] = sign[j] x_A[perm[j]]``,
  coordinate ``j`` of the gauged chart is coordinate ``perm[j]`` of the original, so ``back = perm[indices]``.

A chart-level artefact disagrees raw and agrees transported (agreement exactly 1.0 for a function-level claim).

A claim is ``claim(model) -> result``: an object with ``.indices`` (and optionally ``.scores``, ``.space``), such as
``hf_gauge.objects.IndexSet`` / ``Attribution``; a 1-D integer tensor of indices (space ``"residual"``); or a float
tensor ``[width]`` of per-coordinate values (a vector in the space: transported back with signs, compared by cosine).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .atomic import atomic_path, atomic_write_bytes
from .errors import GaugeError
from .activations import Stop, forward, logits, token_batches
from .models import apply_gauge, gauge_spaces, random_gauge
from .view import ModelView

__all__ = ["ClaimResult", "AuditRow", "AuditReport", "audit", "topk_residual_claim", "add_subparser"]


@dataclass
class ClaimResult:
    """A minimal index-level result: ``indices`` (ordered, best first), optional ``scores``, the ``space`` they index."""

    indices: torch.Tensor
    scores: torch.Tensor | None = None
    space: str = "residual"


@dataclass
class AuditRow:
    """One random gauge: function check and agreement with the original claim (raw and transported)."""

    seed: int
    logits_max_diff: float      # max |logits(gauged) - logits(original)| on the probe tokens
    logits_rel_diff: float      # the same divided by max |logits(original)|
    raw: float                  # Jaccard of index sets (cosine for vectors), gauged chart vs original
    transported: float          # the same after mapping the gauged result back to the original chart
    raw_rank: float             # fraction of positions with the same index (ordered lists); NaN for vectors
    transported_rank: float
    n_flipped: int              # claimed coordinates whose gauge sign is -1
    score_max_diff: float       # max | |score| - |score back| | over transported indices (NaN without scores)
    indices: list[int] = field(default_factory=list)        # raw indices in the gauged chart
    back: list[int] = field(default_factory=list)           # transported back to the original chart


@dataclass
class AuditReport:
    claim: str
    space: str
    kind: str                   # "indices" or "vector"
    original: list[int]
    rows: list[AuditRow]
    width: int
    dtype: str = "torch.float32"

    @property
    def raw_agreement(self) -> float:
        """Mean raw agreement over gauges."""
        return sum(r.raw for r in self.rows) / len(self.rows)

    @property
    def transported_agreement(self) -> float:
        """Worst transported agreement over gauges (1.0 for a claim about the function)."""
        return min(r.transported for r in self.rows)

    @property
    def max_logits_diff(self) -> float:
        return max(r.logits_max_diff for r in self.rows)

    @property
    def max_logits_rel_diff(self) -> float:
        return max(r.logits_rel_diff for r in self.rows)

    @property
    def chance(self) -> float:
        """Expected Jaccard of two independent random k-subsets of the space (the raw baseline)."""
        k, d = len(self.original), self.width
        if self.kind != "indices" or k == 0:
            return float("nan")
        e = k * k / d                                           # expected overlap
        return e / (2 * k - e)

    def passed(self, tol: float | None = None) -> bool:
        """Transported agreement exactly 1 (indices) / within ``tol`` (vectors), and every gauged copy computes the
        same logits up to float reordering: relative max difference <= ``tol`` (default 1e-4 in float32, 5e-2 in
        16-bit dtypes; a gauge reorders the sums inside every matmul, so logits agree to rounding, not bit for bit)."""
        if tol is None:
            tol = 1e-4 if "float32" in self.dtype or "float64" in self.dtype else 5e-2
        ok = self.transported_agreement == 1.0 if self.kind == "indices" else self.transported_agreement >= 1 - tol
        return ok and self.max_logits_rel_diff <= tol

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "space": self.space, "kind": self.kind, "original": self.original,
                "raw_agreement": self.raw_agreement, "transported_agreement": self.transported_agreement,
                "max_logits_diff": self.max_logits_diff,
                "max_logits_rel_diff": self.max_logits_rel_diff, "chance": self.chance,
                "rows": [r.__dict__ for r in self.rows]}

    def table(self) -> str:
        metric = "Jaccard" if self.kind == "indices" else "cosine"
        head = (f"gauge-sweep audit of {self.claim!r} on space {self.space!r} "
                f"({len(self.original) if self.kind == 'indices' else self.width} {'indices' if self.kind == 'indices' else 'values'}, "
                f"{len(self.rows)} random gauges; agreement = {metric})")
        lines = [head,
                 f"{'seed':>5} {'max|dlogits|':>13} {'rel':>9} {'raw':>7} {'transported':>12} {'raw rank':>9} {'tr. rank':>9} {'flipped':>8}"]
        for r in self.rows:
            lines.append(f"{r.seed:>5d} {r.logits_max_diff:>13.2e} {r.logits_rel_diff:>9.1e} {r.raw:>7.3f} {r.transported:>12.3f} "
                         f"{r.raw_rank:>9.3f} {r.transported_rank:>9.3f} {r.n_flipped:>8d}")
        lines.append(f"mean raw agreement {self.raw_agreement:.3f}"
                     + (f" (chance {self.chance:.3f})" if self.kind == "indices" else "")
                     + f"; min transported agreement {self.transported_agreement:.3f}; "
                     f"verdict: {'chart artefact in raw form, exact once transported' if self.passed() else 'FAILED'}")
        return "\n".join(lines)

    def plot(self, path: str | None = None):
        """Agreement per gauge (raw vs transported) and, for index claims, where the claimed indices land."""
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        n = len(self.rows)
        fig, axes = plt.subplots(1, 2 if self.kind == "indices" else 1, figsize=(11 if self.kind == "indices" else 6, 4),
                                 squeeze=False)
        ax = axes[0, 0]
        x = torch.arange(n).numpy()
        ax.bar(x - 0.2, [r.raw for r in self.rows], 0.4, label="raw (gauged chart)", color="tab:red")
        ax.bar(x + 0.2, [r.transported for r in self.rows], 0.4, label="transported back", color="tab:green")
        if self.kind == "indices":
            ax.axhline(self.chance, ls="--", color="gray", lw=1, label="chance")
        ax.set_xticks(x, [str(r.seed) for r in self.rows])
        ax.set_xlabel("random gauge (seed)")
        ax.set_ylabel("Jaccard with original" if self.kind == "indices" else "cosine with original")
        ax.set_ylim(0, 1.25)
        ax.set_title(f"{self.claim} on {self.space}", fontsize=10)
        ax.legend(loc="upper center", fontsize=8, ncol=3)
        if self.kind == "indices":
            ax = axes[0, 1]
            k = len(self.original)
            ax.scatter([-1] * k, self.original, marker="s", color="black", s=14, label="original")
            for i, r in enumerate(self.rows):
                ax.scatter([i - 0.12] * len(r.indices), r.indices, color="tab:red", s=10,
                           label="raw" if i == 0 else None)
                ax.scatter([i + 0.12] * len(r.back), r.back, color="tab:green", s=10, marker="x",
                           label="transported" if i == 0 else None)
            ax.set_xticks([-1] + list(range(n)), ["orig"] + [str(r.seed) for r in self.rows])
            ax.set_ylabel(f"coordinate index (0..{self.width - 1})")
            ax.set_xlabel("chart")
            ax.set_title("where the claimed coordinates are")
            ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        if path is not None:
            with atomic_path(Path(path)) as tmp:          # temp name keeps the suffix: savefig picks the format
                fig.savefig(tmp, dpi=110, format=Path(path).suffix[1:].lower() or None)
            plt.close(fig)
        return fig


# ----------------------------------------------------------------------------------------------------------------
def _normalize(obj: Any, sizes: dict[str, int]) -> tuple[str, str, torch.Tensor, torch.Tensor | None]:
    """``(kind, space, indices-or-vector, scores)`` from a claim result."""
    if hasattr(obj, "indices") and not isinstance(obj, torch.Tensor):
        idx = torch.as_tensor(obj.indices).reshape(-1).long()
        scores = getattr(obj, "scores", None)
        scores = None if scores is None else torch.as_tensor(scores).reshape(-1).double()
        space = getattr(obj, "space", None) or "residual"
        kind = "indices"
        val = idx
    elif isinstance(obj, torch.Tensor) and obj.dim() == 1 and not obj.is_floating_point():
        kind, space, val, scores = "indices", "residual", obj.long(), None
    elif isinstance(obj, torch.Tensor) and obj.dim() == 1:
        kind, space, val, scores = "vector", "residual", obj.detach().double().cpu(), None
    else:
        raise GaugeError(f"a claim must return an object with .indices (IndexSet, Attribution), a 1-D integer tensor "
                         f"of indices or a 1-D float tensor of per-coordinate values; got {type(obj).__name__}"
                         + (f" of shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else ""))
    if space not in sizes:
        raise GaugeError(f"the claim indexes space {space!r}, which this model lacks")
    d = sizes[space]
    if kind == "vector" and val.numel() != d:
        raise GaugeError(f"a vector claim must have one value per coordinate of {space!r} ({d}), got {val.numel()}")
    if kind == "indices" and val.numel() and (int(val.min()) < 0 or int(val.max()) >= d):
        raise GaugeError(f"claimed indices must lie in [0, {d}) for space {space!r}")
    if scores is not None and scores.numel() != val.numel():
        scores = None
    return kind, space, val, scores


def _jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _rank(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a)) if len(a) == len(b) else 0.0


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float((a @ b) / (na * nb))


def _probe_ids(m, data: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if data is not None:
        ids, mask = next(iter(token_batches(data)))
        return ids[:2, :64], None if mask is None else mask[:2, :64]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.config.vocab_size, (1, 16), generator=g), None


def _logits(m, ids, mask) -> torch.Tensor:
    lg = logits(m, ids, mask)
    return lg if mask is None else lg[mask.to(lg.device).bool()]


def audit(model: Any, claim: Callable[[Any], Any], n_gauges: int = 8, data: Any = None,
          spaces: Iterable[str] = ("residual",), seed: int = 0, *, name: str | None = None,
          group: str = "signed") -> AuditReport:
    """Re-evaluate ``claim`` under ``n_gauges`` random gauges (seeds ``seed .. seed+n_gauges-1``) of ``spaces``.

    ``model`` is never modified: one deep copy is gauged with ``g``, checked (max |Δlogits| against the original on
    ``data``'s first batch, or 16 random tokens), evaluated, and moved back with ``g.inverse()`` (exact).
    """
    if n_gauges < 1:
        raise GaugeError(f"n_gauges must be at least 1, got {n_gauges}")
    m = ModelView.of(model).module
    sizes = gauge_spaces(m)
    kind, space, orig, orig_scores = _normalize(claim(m), sizes)
    ids, mask = _probe_ids(m, data, seed)
    ref = _logits(m, ids, mask)
    scale = float(ref.abs().max()) or 1.0
    work = copy.deepcopy(m)
    rows: list[AuditRow] = []
    for i in range(n_gauges):
        s = seed + i
        g = random_gauge(m, seed=s, group=group, spaces=tuple(spaces))
        apply_gauge(work, g)
        try:
            diff = float((_logits(work, ids, mask) - ref).abs().max())
            k2, sp2, val, scores = _normalize(claim(work), sizes)
        finally:
            apply_gauge(work, g.inverse())
        if (k2, sp2) != (kind, space):
            raise GaugeError(f"the claim changed kind/space under a gauge: {kind}/{space} -> {k2}/{sp2}")
        el = g.spaces.get(space)
        if kind == "indices":
            raw_idx = val.tolist()
            back = (el.perm[val] if el is not None else val).tolist()
            flipped = int((el.sign[val] < 0).sum()) if el is not None else 0
            smd = float("nan")
            if orig_scores is not None and scores is not None:
                pos = {j: t for t, j in enumerate(back)}
                shared = [(t, pos[j]) for t, j in enumerate(orig.tolist()) if j in pos]
                if shared:
                    smd = max(abs(abs(float(orig_scores[a])) - abs(float(scores[b]))) for a, b in shared)
            o = orig.tolist()
            rows.append(AuditRow(s, diff, diff / scale, _jaccard(o, raw_idx), _jaccard(o, back), _rank(o, raw_idx), _rank(o, back),
                                 flipped, smd, raw_idx, back))
        else:
            back_v = el.inverse().apply(val) if el is not None else val
            rows.append(AuditRow(s, diff, diff / scale, _cos(orig, val), _cos(orig, back_v), float("nan"), float("nan"),
                                 int((el.sign < 0).sum()) if el is not None else 0,
                                 float((orig - back_v).abs().max())))
    del work
    return AuditReport(claim=name or getattr(claim, "__name__", type(claim).__name__), space=space, kind=kind,
                       original=orig.tolist() if kind == "indices" else [], rows=rows, width=sizes[space],
                       dtype=str(next(m.parameters()).dtype))


# ----------------------------------------------------------------------------------------------------------------
# A built-in claim: top-k residual coordinates by mean |activation|
# ----------------------------------------------------------------------------------------------------------------
def topk_residual_claim(data: Any, k: int = 20, layer: int | None = None) -> Callable[[Any], ClaimResult]:
    """``claim(model)``: the ``k`` residual coordinates with the largest mean |activation| at the output of block
    ``layer`` (default: the middle block) over the non-padding tokens of ``data`` (float64 running sums)."""
    if k < 1:
        raise GaugeError(f"k must be at least 1, got {k}")
    batches = list(token_batches(data))

    def claim(model: Any) -> ClaimResult:
        v = ModelView.of(model)
        m, spec = v.module, v.spec
        n_layers = v.config.n_layers
        L = n_layers // 2 if layer is None else layer
        if not 0 <= L < n_layers:
            raise GaugeError(f"layer {L} does not exist (the model has {n_layers} blocks)")
        d = v.config.hidden
        if k > d:
            raise GaugeError(f"k={k} exceeds the residual width {d}")
        total = torch.zeros(d, dtype=torch.float64)
        count = 0
        cur: dict[str, Any] = {}

        def hook(_mod, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.detach().reshape(-1, d)
            if cur["mask"] is not None:
                h = h[cur["mask"].reshape(-1).bool().to(h.device)]
            cur["sum"] = h.abs().double().sum(0).cpu()
            cur["n"] = h.shape[0]
            raise Stop

        handle = v.submodule(f"{spec.sites.layers}.{L}").register_forward_hook(hook)
        try:
            for ids, mask in batches:
                cur["mask"] = mask
                forward(m, ids, mask)
                total += cur["sum"]
                count += cur["n"]
        finally:
            handle.remove()
        mean = total / max(1, count)
        top = torch.topk(mean, k)
        return ClaimResult(indices=top.indices, scores=top.values, space="residual")

    claim.__name__ = f"top-{k} residual |activation| @ block {layer if layer is not None else 'mid'}"
    return claim


# ----------------------------------------------------------------------------------------------------------------
# CLI: hf-gauge audit MODEL --claim topk-resid --k 20 --n-gauges 4 --figure out.png
# ----------------------------------------------------------------------------------------------------------------
CLAIMS = ("topk-resid",)


def _default_text() -> str:
    from pydoc_data.topics import topics        # real English text shipped with Python: no download
    return " ".join(topics[k] for k in sorted(topics)[:40])


def _cmd_audit(args) -> int:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.model == "smollm2":
        from .weights import smollm2_path
        path = str(smollm2_path())
    else:
        path = args.model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False).eval()
    text = open(args.text_file).read() if args.text_file else _default_text()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        ids = tok(text, return_tensors="pt").input_ids[0]
    except (OSError, ValueError, TypeError, KeyError):   # no tokenizer saved with the model: random ids
        ids = torch.randint(0, model.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    n = (min(args.tokens, ids.numel()) // args.seq) * args.seq
    if n == 0:
        raise GaugeError(f"not enough tokens ({ids.numel()}) for one sequence of {args.seq}")
    data = ids[:n].reshape(-1, args.seq)
    claim = topk_residual_claim(data, k=args.k, layer=args.layer)
    report = audit(model, claim, n_gauges=args.n_gauges, data=data, spaces=tuple(args.spaces), seed=args.seed)
    print(report.table())
    if args.figure:
        report.plot(args.figure)
        print(f"figure written to {args.figure}")
    if args.json:
        atomic_write_bytes(Path(args.json), (json.dumps(report.to_dict(), indent=1) + "\n").encode())
    return 0 if report.passed() else 1


def add_subparser(subparsers) -> Any:
    """Register ``audit`` on an argparse subparsers object; the parser's ``func(args)`` returns an exit code."""
    p = subparsers.add_parser(
        "audit", help="gauge-sweep audit of an index-level claim (raw vs transported agreement)",
        description="Re-evaluate a coordinate-level claim under random gauges: raw indices disagree when the claim is a "
                    "chart artefact; transported back they agree exactly. Exit code 0 when every transported result "
                    "agrees and every gauged copy computes the same logits.")
    p.add_argument("model", help="local model folder or hub id ('smollm2' for the bundled real SmolLM2-135M)")
    p.add_argument("--claim", choices=CLAIMS, default="topk-resid",
                   help="topk-resid: top-k residual coordinates by mean |activation| at a block's output")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--layer", type=int, default=None, help="block index (default: middle)")
    p.add_argument("--n-gauges", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spaces", nargs="+", default=["residual"], help="gauge spaces to sweep (residual, mlp, attn)")
    p.add_argument("--max-tokens", "--tokens", dest="tokens", type=int, default=256,
                   help="tokens of text to evaluate the claim on (at most; whole rows of --seq)")
    p.add_argument("--seq", type=int, default=64, help="sequence length of each row")
    p.add_argument("--text-file", default=None, help="text to use (default: Python's bundled pydoc topics)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--figure", default=None, help="write a PNG figure here")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.set_defaults(func=_cmd_audit)
    return p
