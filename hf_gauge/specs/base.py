"""Declarative architecture specs: which tensor axis lies in which gauge space.

A spec is data. Each ``Rule`` names a parameter pattern (``{i}`` stands for a layer index) and the ``Axis``
entries of that tensor that move under a gauge. An empty tuple declares the tensor untouched. Space names are
templates: ``"residual"``, ``"mlp.{i}"`` (MLP hidden units of layer i), ``"attn.{i}"`` (query heads of layer i).

Axis semantics, for a gauge element ``Q = (perm, sign)`` of the axis' space:
- ``signed=True``: the axis is re-indexed by ``perm`` and multiplied by ``sign`` (readers' columns, writers' rows).
- ``signed=False``: re-indexed only (norm gains, SwiGLU gate rows, DoRA magnitudes).
- ``block``: the space indexes blocks of this many consecutive entries (a head's ``head_dim`` rows).
- ``kv=True``: the axis indexes KV heads; the query-head permutation is reduced to its KV-group permutation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

SignRule = Literal["any", "global", "none"]


@dataclass(frozen=True)
class Axis:
    axis: int
    space: str
    signed: bool = True
    block: str | None = None
    kv: bool = False


@dataclass(frozen=True)
class Space:
    """A gauge space template: its size from the config and which signs the architecture admits."""

    size: Callable[[object], int]
    signs: SignRule
    doc: str = ""
    per_layer: bool = False


@dataclass(frozen=True)
class Rule:
    pattern: str
    axes: tuple[Axis, ...] = ()

    def compile(self) -> re.Pattern:
        return re.compile(re.escape(self.pattern).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


@dataclass(frozen=True)
class Sites:
    """Module paths (with ``{i}``) where the spaces can be observed in a forward pass."""

    layers: str                     # ModuleList of blocks; each block's input and output lie in the residual chart
    final_norm: str                 # output of the final norm (gain permuted only: still the residual chart)
    embed: str                      # token embedding module
    mlp_in: str                     # module whose INPUT is the MLP hidden activation of layer {i}
    attn_out_in: str                # module whose INPUT is the concatenated head outputs of layer {i}


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    norm: Literal["rmsnorm", "layernorm"]
    spaces: Mapping[str, Space]
    rules: tuple[Rule, ...]
    dims: Callable[[object], dict[str, int]]
    sites: Sites
    _compiled: list = field(default_factory=list, compare=False, repr=False)
    _axes_memo: dict = field(default_factory=dict, compare=False, repr=False)   # engine.axes_for, per tensor name

    @property
    def group(self) -> str:
        return "B_d" if self.spaces["residual"].signs == "any" else "S_d x {±1}"

    def compiled(self) -> list[tuple[re.Pattern, Rule]]:
        if not self._compiled:
            self._compiled.extend((r.compile(), r) for r in self.rules)
        return self._compiled

    def match(self, name: str) -> tuple[Axis, ...] | None:
        """Axes of parameter ``name`` with ``{i}`` filled in, or None when no rule covers it."""
        for rx, rule in self.compiled():
            m = rx.match(name)
            if m:
                i = m.groupdict().get("i")
                return tuple(
                    Axis(a.axis, a.space.replace("{i}", i) if i is not None else a.space, a.signed, a.block, a.kv)
                    for a in rule.axes
                )
        return None

    def space_template(self, space: str) -> tuple[str, int | None]:
        """``"mlp.3"`` -> ``("mlp.{i}", 3)``; ``"residual"`` -> ``("residual", None)``."""
        head, _, tail = space.partition(".")
        if tail:
            if not tail.isdigit():
                raise KeyError(space)
            return f"{head}.{{i}}", int(tail)
        return head, None


# --- shorthand used by the spec files ------------------------------------------------------------------------
def reads(*extra: Axis) -> tuple[Axis, ...]:
    """A linear ``[out, d]`` that reads the residual: columns signed-permuted."""
    return (Axis(1, "residual"),) + extra


def writes(*extra: Axis) -> tuple[Axis, ...]:
    """A linear ``[d, in]`` that writes the residual (or its bias ``[d]``): rows signed-permuted."""
    return (Axis(0, "residual"),) + extra


def gain() -> tuple[Axis, ...]:
    """A norm gain on the residual: permuted, never signed."""
    return (Axis(0, "residual", signed=False),)


UNTOUCHED: tuple[Axis, ...] = ()
