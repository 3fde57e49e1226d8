"""``Gauge``: one signed permutation per gauge space of a model, mapping model A's chart to model B's.

``x_B = g(x_A)`` on every space. Spaces are named ``"residual"``, ``"mlp.{layer}"``, ``"attn.{layer}"`` and so on
(the specs' templates); a space the gauge does not mention is the identity there. ``(g2 @ g1)`` applies ``g1`` first.

Carried spaces (``Space.carried_by``: an expert's units ``"experts.{i}.{e}"`` under the permutation of the experts
``"moe.{i}"``) are indexed in the source chart, so the group is a wreath product: with ``sigma = g["moe.i"]``,
``g.inverse()["experts.i.k"] = g["experts.i.<sigma.perm[k]>"].inverse()`` and
``(g2 @ g1)["experts.i.a"] = g2["experts.i.<sigma1^-1(a)>"] @ g1["experts.i.a"]``.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping

from .errors import GaugeError
from .group import SignedPermutation
from .specs import SPECS, carried

__all__ = ["Gauge", "check_space_name", "target_space"]


def check_space_name(name: Any) -> str:
    """``name`` if it instantiates a space template of a registered spec (canonical integers: ``"mlp.3"``, never
    ``"mlp.03"``), else ``GaugeError``."""
    templates: list[str] = []
    if not isinstance(name, str):
        raise GaugeError(f"unknown gauge space {name!r}: space names are strings such as 'residual', 'mlp.3', 'attn.0'")
    for spec in {id(s): s for s in SPECS.values()}.values():
        try:
            spec.parse_space(name)
            return name
        except GaugeError:
            templates += [t for t in spec.spaces if t not in templates]
    raise GaugeError(f"unknown gauge space {name!r}: use one of the space templates {', '.join(templates)} with "
                     "canonical integers (e.g. 'residual', 'mlp.3', 'attn.0')")


def target_space(space: str, elements: Mapping[str, SignedPermutation]) -> str:
    """The name in the target chart of the source chart's space ``space``: itself, or for a carried space
    (``experts.3.a``, indexed by A's expert ``a``) B's slot of that expert under the carrier's element in
    ``elements`` (``moe.3 = sigma``: slot ``sigma^-1(a)``; a missing carrier is the identity)."""
    return _reindexed(space, elements, to_target=True)


def _reindexed(space: str, elements: Mapping[str, SignedPermutation], to_target: bool) -> str:
    """``target_space``, or (``to_target=False``) its inverse: the source chart's name of target slot ``k``
    (``sigma.perm[k]``)."""
    c = carried(space)
    if c is None:
        return space
    carrier, k, at = c
    sigma = elements.get(carrier)
    if sigma is None:
        return space
    return at(int((sigma.inverse() if to_target else sigma).perm[k]))


class Gauge:
    """The gauge of a whole model: ``{space: SignedPermutation}`` plus provenance.

    Args:
        residual: the residual-stream element (B_d for RMSNorm models).
        mlp: ``{layer: SignedPermutation}`` on the MLP hidden units (signs act on the up/down pair).
        attn: ``{layer: SignedPermutation}`` on query heads (permutations that respect KV groups).
        spaces: alternatively, ``{"residual": ..., "mlp.3": ..., "attn.0": ...}``.
        source, target: descriptions of the two charts (model id, revision, model_type, width, fingerprint).
        method: how the gauge was obtained (``"random"``, ``"signed"``, ``"data-free"``, ``"composed"``, ...).
        metrics: fit metrics (mean matched |C|, margins, ...).
    """

    def __init__(self, residual: SignedPermutation | None = None, *,
                 mlp: Mapping[int, SignedPermutation] | None = None,
                 attn: Mapping[int, SignedPermutation] | None = None,
                 spaces: Mapping[str, SignedPermutation] | None = None,
                 source: Mapping[str, Any] | None = None, target: Mapping[str, Any] | None = None,
                 method: str | None = None, metrics: Mapping[str, Any] | None = None,
                 confidence: Mapping[str, Any] | None = None) -> None:
        sp: dict[str, SignedPermutation] = {}
        for name, el in (spaces or {}).items():
            sp[name] = el
        if residual is not None:
            sp["residual"] = residual
        for prefix, table in (("mlp", mlp), ("attn", attn)):
            for layer, el in (table or {}).items():
                sp[f"{prefix}.{int(layer)}"] = el
        for name, el in sp.items():
            check_space_name(name)
            if not isinstance(el, SignedPermutation):
                raise GaugeError(f"space {name!r} must be a SignedPermutation, got {type(el).__name__}")
        if not sp:
            raise GaugeError("a Gauge needs at least one space (e.g. Gauge(residual=SignedPermutation(...)))")
        self.spaces: dict[str, SignedPermutation] = dict(sorted(sp.items(), key=lambda kv: _order(kv[0])))
        self.source: dict[str, Any] = dict(source or {})
        self.target: dict[str, Any] = dict(target or {})
        self.method = method
        self.metrics: dict[str, Any] = dict(metrics or {})
        self.confidence: dict[str, Any] = dict(confidence or {})

    # ----------------------------------------------------------------- views
    @property
    def residual(self) -> SignedPermutation | None:
        return self.spaces.get("residual")

    def family(self, name: str) -> dict[int, SignedPermutation]:
        """``{layer: element}`` of the one-index spaces ``"<name>.<layer>"`` (``family("mlp")``)."""
        out = {}
        for k, v in self.spaces.items():
            head, _, tail = k.partition(".")
            if head == name and tail.isdigit():
                out[int(tail)] = v
        return out

    @property
    def mlp(self) -> dict[int, SignedPermutation]:
        return self.family("mlp")

    @property
    def attn(self) -> dict[int, SignedPermutation]:
        return self.family("attn")

    @property
    def width(self) -> int | None:
        return self.residual.size if self.residual is not None else None

    def __iter__(self) -> Iterator[str]:
        return iter(self.spaces)

    def __getitem__(self, space: str) -> SignedPermutation:
        try:
            return self.spaces[space]
        except KeyError:
            raise GaugeError(f"this gauge has no space {space!r}; it has {list(self.spaces)}") from None

    # ----------------------------------------------------------------- group law
    def inverse(self) -> "Gauge":
        out = {target_space(name, self.spaces): el.inverse() for name, el in self.spaces.items()}
        return Gauge(spaces=out, source=self.target, target=self.source, method=self.method, metrics=self.metrics)

    def __matmul__(self, other: "Gauge") -> "Gauge":
        """``(self @ other)`` applies ``other`` first, then ``self``; missing spaces are the identity. Each of
        ``other``'s spaces meets ``self``'s space of the same name in the intermediate chart (``target_space``:
        the slot an expert moved to, for carried spaces)."""
        if not isinstance(other, Gauge):
            return NotImplemented
        out: dict[str, SignedPermutation] = {}
        met: set[str] = set()
        for name, a in other.spaces.items():
            partner = target_space(name, other.spaces)
            b = self.spaces.get(partner)
            out[name] = a if b is None else b @ a
            met.add(partner)
        for name, b in self.spaces.items():
            if name not in met:                          # self alone: named back in the source chart
                out[_reindexed(name, other.spaces, to_target=False)] = b
        return Gauge(spaces=out, source=other.source, target=self.target, method="composed")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Gauge):
            return NotImplemented
        names = set(self.spaces) | set(other.spaces)
        for n in names:
            a, b = self.spaces.get(n), other.spaces.get(n)
            a = a if a is not None else (SignedPermutation.identity(b.size) if b is not None else None)
            b = b if b is not None else SignedPermutation.identity(a.size)
            if a != b:
                return False
        return True

    __hash__ = None

    @property
    def is_permutation(self) -> bool:
        return all(v.is_permutation for v in self.spaces.values())

    def restrict(self, *spaces: str) -> "Gauge":
        """The same gauge on the named spaces only (``"mlp"`` / ``"attn"`` select every layer)."""
        keep = {k: v for k, v in self.spaces.items() if k in spaces or k.split(".")[0] in spaces}
        g = copy.copy(self)
        g.spaces = keep
        return g

    def __repr__(self) -> str:
        parts = [f"{k}: d={v.size}, +{v.positive_fraction:.2f}" for k, v in list(self.spaces.items())[:4]]
        more = f", ... ({len(self.spaces)} spaces)" if len(self.spaces) > 4 else ""
        return f"Gauge({'; '.join(parts)}{more}, method={self.method!r})"

    # ----------------------------------------------------------------- action on objects
    def transport(self, obj: Any, **kwargs: Any) -> Any:
        """Return ``obj`` moved into the target chart (a new object; ``obj`` is never mutated).

        A tensor or array ``[..., n]`` moves along its last axis by the residual element (``n`` = the width), or with
        ``space="mlp.10"`` by that space's element (``n`` = its size; the identity where the gauge holds no element
        there). The element itself does the same: ``g["mlp.10"].apply(v)`` (also ``g.mlp[10].apply(v)``,
        ``g.residual.apply(v)``). PEFT models, SAEs, steering vectors and files have their own handlers
        (``hf_gauge.transport``); a ``PeftModel`` comes back as a ``PeftModel`` (``adapter_name=`` picks adapters).
        """
        from .transport import transport
        return transport(self, obj, **kwargs)

    # persistence: ``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` are attached by ``hf_gauge.hub``
    # (file I/O stays out of this module)


def _order(name: str) -> tuple:
    """Residual first, then template families (mlp, attn, then others by name), then their integer indices."""
    head, *rest = name.split(".")
    return ({"residual": 0, "mlp": 1, "attn": 2}.get(head, 3), head,
            tuple(int(r) if r.isdigit() else -1 for r in rest))
