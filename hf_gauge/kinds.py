"""Gauge-space kinds: the behaviour of each kind of space, written once and looked up by the kind a spec declares.

A kind says how an element of its spaces is drawn at random, which elements a model admits (beyond the spec's sign
rule), how an axis of the *reduced* space moves (``Axis(kv=True)``: KV heads under a query-head permutation), how
two models' units are assigned from a similarity, and how activation statistics are blocked.

- ``residual``: the residual stream (matched by ``match.find_gauge``, not here).
- ``units``: independent hidden units (SwiGLU / GELU MLP units, an expert's units): any permutation, signs per the
  spec's sign rule.
- ``heads``: attention query heads: permutations that move KV groups as wholes (``grouped``).
- ``linear_heads``: the value heads of a linear-attention (Gated DeltaNet) layer: ``linear_num_value_heads /
  linear_num_key_heads`` consecutive value heads share one query/key head, so they permute within that group and
  groups as wholes (``GroupedHeadsKind``).
- ``ssm_heads``: the heads of a Mamba-2 mixer: ``n_heads / n_groups`` consecutive heads share one group's B and C
  (and one group of the gated RMSNorm), so they permute within a group and groups as wholes (``GroupedHeadsKind``).
- ``experts``: the experts of a mixture-of-experts layer as wholes (router rows with every tensor of the expert):
  permutations only (the router's softmax is not odd). An expert's own units form a space carried by it
  (``Space.carried_by``). Matched from the router rows, which read the residual.
- ``grouped_experts``: experts under group-limited routing (DeepSeek-V3, GLM-4-MoE: ``n_group`` consecutive groups
  of experts; a token first picks ``topk_group`` groups by their best scores, then experts within them). A
  permutation is exact only if it maps groups to groups as wholes: experts permute within a group, groups as wholes
  (``grouped``, like heads in KV groups), the group count read from the config field the kind names.

A new architecture with another kind registers a ``Kind`` (``register_kind``) and names it in its spec.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .assign import UnitSlice, head_assignment, match_correlation, match_units, slice_similarity
from .errors import GaugeError
from .group import SignedPermutation

__all__ = ["Kind", "ResidualKind", "UnitsKind", "HeadsKind", "GroupedHeadsKind", "ExpertsKind", "KINDS", "register_kind", "get_kind"]


class Kind:
    """Behaviour shared by every space of one kind. ``cfg`` is a ``view.ConfigView``."""

    name = "kind"
    grouped = False        # elements move groups of coordinates as wholes (``group_size`` > 1)
    group_fields: tuple[str, ...] = ()     # the config fields the group count is read from (error messages)

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ---------------------------------------------------------------- structure
    def group_size(self, size: int, cfg: Any) -> int:
        return 1

    def reduced_size(self, size: int, cfg: Any) -> int:
        return size // self.group_size(size, cfg)

    def reduce(self, el: SignedPermutation, cfg: Any) -> torch.Tensor:
        """The permutation of the reduced space (one entry per group) implied by ``el``."""
        g = self.group_size(el.size, cfg)
        if g == 1:
            return el.perm
        groups = el.perm.view(el.size // g, g) // g
        if not torch.all(groups == groups[:, :1]):
            raise GaugeError(self.mixing_error(g))
        return groups[:, 0].contiguous()

    def mixing_error(self, g: int) -> str:
        return (f"the {self.name} permutation mixes groups: entries sharing a group ({g} per group) must move "
                "together to one group. Permute within a group, and groups as wholes.")

    def blocks(self, size: int, cfg: Any) -> int | None:
        """Activation statistics: ``None`` for per-coordinate correlations, else the number of blocks of the
        observed width (per-dimension correlations averaged within a block)."""
        return None

    # ---------------------------------------------------------------- elements
    def random(self, size: int, rule: str, group: str, gen: torch.Generator, positive_fraction: float | None,
               cfg: Any) -> SignedPermutation:
        signed = group == "signed" and rule != "none"
        el = SignedPermutation.random(size, gen, signed=signed and rule == "any",
                                      positive_fraction=positive_fraction if rule == "any" else None)
        if signed and rule == "global" and torch.rand((), generator=gen) < 0.5:
            el = SignedPermutation(el.perm, -torch.ones(el.size, dtype=torch.int64))
        return el

    def check(self, name: str, el: SignedPermutation, rule: str, cfg: Any) -> None:
        """Refuse (``GaugeError``) an element the model cannot absorb on space ``name``."""
        mt = cfg.model_type
        if rule == "none" and not el.is_permutation:
            raise GaugeError(f"space {name!r} of {mt} admits permutations only, but the gauge has "
                             f"{int((el.sign < 0).sum())} negative signs")
        if rule == "global" and not (bool(torch.all(el.sign == 1)) or bool(torch.all(el.sign == -1))):
            raise GaugeError(
                f"mixed signs on a LayerNorm model ({mt}): LayerNorm's mean-centring admits only "
                f"permutations and one global sign flip (S_d x {{±1}}), but the gauge on {name!r} has "
                f"{int((el.sign < 0).sum())} of {el.size} negative signs. Use a permutation gauge, or flip all signs."
            )
        if self.grouped:
            self.reduce(el, cfg)

    # ---------------------------------------------------------------- matching two models
    def match_weights(self, sa: list[UnitSlice], sb: list[UnitSlice], signed: bool, method: str,
                      cfg: Any) -> tuple[SignedPermutation, dict]:
        """Assign B's units to A's from their weight slices (``inner.unit_slices``)."""
        score, cs, plain = slice_similarity(sa, sb)
        if method == "signed":
            return match_units(score, cs, signed)
        return match_units(plain, None, False)

    def match_activations(self, C: np.ndarray, signed: bool, method: str, cfg: Any) -> tuple[SignedPermutation, dict]:
        """Assign from an activation correlation ``C [n_A, n_B]``. ``conf["_margin"]`` (popped by the caller) holds
        each B coordinate's margin over its best competitor: ~0 where the data cannot tell units apart."""
        res = match_correlation(C, method="signed" if (signed and method == "signed") else "permutation")
        conf = res.summary()
        conf["mean_score"] = conf["mean_matched"]
        conf["_margin"] = res.margin
        return res.element, conf


class ResidualKind(Kind):
    name = "residual"


class UnitsKind(Kind):
    name = "units"


class HeadsKind(Kind):
    """Query heads of one layer; ``cfg.n_kv_heads`` KV groups of ``n_heads / n_kv`` heads each."""

    name = "heads"
    grouped = True
    group_fields = ("num_key_value_heads",)

    def group_size(self, size: int, cfg: Any) -> int:
        n_kv = cfg.n_kv_heads
        if size % n_kv:
            raise GaugeError(f"{size} heads do not split into {n_kv} KV groups")
        return size // n_kv

    def blocks(self, size: int, cfg: Any) -> int | None:
        return size

    def mixing_error(self, g: int) -> str:
        return (f"the attention-head permutation mixes KV groups: query heads sharing a KV head ({g} per group) must "
                "move together to one group. Permute heads only within a group, and groups as wholes.")

    def random(self, size: int, rule: str, group: str, gen: torch.Generator, positive_fraction: float | None,
               cfg: Any) -> SignedPermutation:
        g = self.group_size(size, cfg)
        groups = torch.randperm(size // g, generator=gen)
        perm = torch.cat([grp * g + torch.randperm(g, generator=gen) for grp in groups.tolist()])
        return SignedPermutation(perm)

    def match_weights(self, sa: list[UnitSlice], sb: list[UnitSlice], signed: bool, method: str,
                      cfg: Any) -> tuple[SignedPermutation, dict]:
        qa, qb = [s for s in sa if not s.kv], [s for s in sb if not s.kv]
        ka, kb = [s for s in sa if s.kv], [s for s in sb if s.kv]
        H = slice_similarity(qa, qb)[0]
        K = slice_similarity(ka, kb)[0] if ka else None
        w = len(ka) / (len(ka) + len(qa)) if ka else 0.0
        n = H.shape[0]
        return head_assignment(H, n // self.group_size(n, cfg), K, w)

    def match_activations(self, C: np.ndarray, signed: bool, method: str, cfg: Any) -> tuple[SignedPermutation, dict]:
        n = C.shape[0]
        return head_assignment(C, n // self.group_size(n, cfg))


class GroupedHeadsKind(HeadsKind):
    """Heads in groups whose count a config field gives (the first of ``fields`` the config sets): a linear-attention
    layer's value heads sharing a query/key head, a Mamba-2 mixer's heads sharing B and C. Matched and blocked as
    attention heads; the ``kv=True`` axes of its spaces index the groups."""

    def __init__(self, name: str, fields: tuple[str, ...], members: str) -> None:
        super().__init__(name)
        self.fields, self.members = fields, members
        self.group_fields = fields

    def group_size(self, size: int, cfg: Any) -> int:
        n = next((cfg.get(f) for f in self.fields if cfg.get(f) is not None), None)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or size % n:
            raise GaugeError(f"{size} {self.name} do not split into the config's {' / '.join(self.fields)} = {n!r} "
                             "groups; the config is wrong")
        return size // n

    def mixing_error(self, g: int) -> str:
        return (f"the {self.name} permutation mixes groups: {self.members} ({g} per group) must move together to one "
                "group. Permute heads only within a group, and groups as wholes.")


class ExpertsKind(UnitsKind):
    """The experts of one MoE layer: ``perm[k]`` is the expert that slot ``k`` takes (router row k with it).

    ``groups`` names a config field (``"n_group"``) that splits the experts into that many consecutive routing
    groups (group-limited routing): elements must then move groups as wholes. A field that is absent or None is one
    group."""

    name = "experts"

    def __init__(self, name: str | None = None, groups: str | None = None) -> None:
        super().__init__(name)
        self.groups = groups
        self.grouped = groups is not None

    def group_size(self, size: int, cfg: Any) -> int:
        if self.groups is None:
            return 1
        n = cfg.get(self.groups)
        n = 1 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or size % n:
            raise GaugeError(f"{size} experts do not split into {self.groups}={n!r} routing groups; the config is "
                             "corrupt")
        return size // n

    def mixing_error(self, g: int) -> str:
        return (f"the expert permutation mixes routing groups: experts of one group ({g} per group, "
                f"config.{self.groups}) must move together to one group, since the router picks whole groups first. "
                "Permute experts only within a group, and groups as wholes.")

    def random(self, size: int, rule: str, group: str, gen: torch.Generator, positive_fraction: float | None,
               cfg: Any) -> SignedPermutation:
        if not self.grouped:
            return super().random(size, rule, group, gen, positive_fraction, cfg)
        g = self.group_size(size, cfg)
        groups = torch.randperm(size // g, generator=gen)
        return SignedPermutation(torch.cat([grp * g + torch.randperm(g, generator=gen) for grp in groups.tolist()]))

    def match_weights(self, sa: list[UnitSlice], sb: list[UnitSlice], signed: bool, method: str,
                      cfg: Any) -> tuple[SignedPermutation, dict]:
        if not self.grouped:
            return super().match_weights(sa, sb, signed, method, cfg)
        H = slice_similarity(sa, sb)[0 if method == "signed" else 2]
        n = H.shape[0]
        return head_assignment(H, n // self.group_size(n, cfg))

    def check(self, name: str, el: SignedPermutation, rule: str, cfg: Any) -> None:
        if not el.is_permutation:
            raise GaugeError(f"space {name!r} permutes whole experts: the router's softmax admits no sign flip of an "
                             f"expert, but the gauge has {int((el.sign < 0).sum())} negative signs")
        super().check(name, el, rule, cfg)


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind, *, replace: bool = False) -> Kind:
    """Make ``kind`` available to specs under ``kind.name``; returns it."""
    if kind.name in KINDS and not replace and KINDS[kind.name] is not kind:
        raise GaugeError(f"a gauge-space kind named {kind.name!r} is registered already (pass replace=True)")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise GaugeError(f"unknown gauge-space kind {name!r}; registered kinds: {', '.join(KINDS)}") from None


for _k in (ResidualKind(), UnitsKind(), HeadsKind(), ExpertsKind(), ExpertsKind("grouped_experts", groups="n_group")):
    register_kind(_k)

LINEAR_HEADS = register_kind(GroupedHeadsKind("linear_heads", ("linear_num_key_heads",),
                                              "value heads sharing a query/key head"))
SSM_HEADS = register_kind(GroupedHeadsKind("ssm_heads", ("mamba_n_groups", "n_groups"),
                                           "SSM heads sharing a group's B and C"))
