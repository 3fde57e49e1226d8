"""Declarative architecture specs: which tensor axis lies in which gauge space.

A spec is data. Each ``Rule`` names a parameter pattern and the ``Axis`` entries of that tensor that move under a
gauge; an empty tuple declares the tensor untouched. Patterns and space names are templates whose placeholders
(``{i}`` a layer, ``{e}`` an expert, any ``{name}``) stand for canonical non-negative integers (``0``, ``17``; never
``01``). Each ``Space`` template carries its *kind* (``"residual"``, ``"units"``, ``"heads"``, or any kind registered
in ``hf_gauge.kinds``), which says how its elements are drawn, checked, matched and ordered; the ranges of its
placeholders come from the config (``{i}`` ranges over the layers unless the space says otherwise).

Axis semantics, for a gauge element ``Q = (perm, sign)`` of the axis' space:
- ``signed=True``: the axis is re-indexed by ``perm`` and multiplied by ``sign`` (readers' columns, writers' rows).
- ``signed=False``: re-indexed only (norm gains, SwiGLU gate rows, DoRA magnitudes).
- ``block``: the space indexes blocks of this many consecutive entries (a head's ``head_dim`` rows).
- ``kv=True``: the axis indexes the reduced space of its kind (KV heads: the query-head permutation reduced to
  its KV-group permutation).
- ``stack="e"``: the axis indexes placeholder ``{e}`` (fused per-expert tensors ``[E, ...]``); every other axis of
  the tensor is resolved per slice ``k`` with ``{e}`` = k.
- ``segments``: a fused axis made of consecutive parts, each its own ``Axis`` (space, sign rule, block, kv); a part
  with ``space=""`` is never moved and spans ``dims[block]`` entries. Fused ``qkv_proj = [q|k|v]``,
  ``gate_up_proj = [gate|up]``.
- ``groups``: a fused axis whose parts are interleaved over groups (``segmented(..., groups="kv_heads")``): the axis
  is ``[group, (part0 chunk | part1 chunk | ...)]``, each part split into ``dims[groups]`` equal consecutive chunks
  (Falcon's grouped ``query_key_value``: per KV group its query heads, then its key and its value head).
- ``interleave``: a fused axis whose parts, all of one length, alternate entry by entry (``segmented(...,
  interleave=True)``): ``[p0[0], p1[0], p0[1], p1[1], ...]`` (gpt-oss's ``gate_up_proj``, gate and up at stride 2).

``ArchSpec.requires`` declares the config fields the spec's group depends on (activation, norm kind, MoE layout):
``Requires(field, allowed, why)``. A config whose field lies outside ``allowed`` is refused (``ArchSpec.refusal``,
run by ``hf_gauge.view.spec_for`` on every path that has a config) instead of being gauged silently wrong.

``ArchSpec.requires`` declares the config fields the spec's group depends on (activation, norm kind, MoE layout):
``Requires(field, allowed, why)``. A config whose field lies outside ``allowed`` is refused (``ArchSpec.refusal``,
run by ``hf_gauge.view.spec_for`` on every path that has a config) instead of being gauged silently wrong.

``ArchSpec.variant`` maps a config to the spec of its layout where one model type has several (OPT with
``project_in``/``project_out``, or post-LayerNorm blocks); configs without a config (a bare model type) get the base.

``ArchSpec.file_rules`` name tensors as checkpoint files store them where transformers renames or fuses them on
load (MoE experts stored per expert on disk, fused in memory); streaming apply on files uses them before ``rules``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping, Sequence

from ..errors import GaugeError

SignRule = Literal["any", "global", "none"]
INDEX = r"(?:0|[1-9][0-9]*)"               # canonical integers only: "mlp.01" is not a space name
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(template: str) -> tuple[str, ...]:
    """``"moe.{i}.{e}"`` -> ``("i", "e")``."""
    return tuple(_PLACEHOLDER.findall(template))


def template_regex(template: str) -> re.Pattern:
    """A regex matching the template's instances, one named group per placeholder (canonical integers)."""
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{INDEX})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z")


def fill(template: str, values: Mapping[str, str | int]) -> str:
    """Replace each ``{name}`` that ``values`` knows; others stay."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


@dataclass(frozen=True)
class Axis:
    axis: int
    space: str = ""
    signed: bool = True
    block: str | None = None
    kv: bool = False
    segments: tuple["Axis", ...] = ()
    stack: str | None = None
    groups: str | None = None
    interleave: bool = False

    def filled(self, values: Mapping[str, str | int]) -> "Axis":
        return dataclasses.replace(self, space=fill(self.space, values),
                                   segments=tuple(s.filled(values) for s in self.segments))

    def on(self, axis: int, **changes) -> "Axis":
        """The same axis semantics on another tensor axis (LoRA factors, stacked slices)."""
        return dataclasses.replace(self, axis=axis, **changes)

    def parts(self) -> tuple["Axis", ...]:
        """The segments of a fused axis, or the axis itself."""
        return self.segments or (self,)

    @property
    def spaces(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.space for p in self.parts() if p.space))


def segmented(axis: int, *parts: Axis, groups: str | None = None, interleave: bool = False) -> Axis:
    """A fused axis ``[part0 | part1 | ...]`` (each part an ``Axis``; its ``axis`` field is ignored); with ``groups``
    (a ``dims`` key) the parts are interleaved over that many groups: ``[group, (part0 | part1 | ...) chunk]``; with
    ``interleave`` the parts (of equal length) alternate entry by entry, ``[p0[0], p1[0], p0[1], p1[1], ...]``
    (gpt-oss's ``gate_up_proj``: gate and up at stride 2)."""
    if groups and interleave:
        raise GaugeError("segmented(): give groups= or interleave=, not both")
    return Axis(axis, segments=tuple(p.on(axis) for p in parts), groups=groups, interleave=interleave)


@dataclass(frozen=True)
class Space:
    """A gauge space template: its size from the config, the signs the architecture admits, and its kind.

    ``carried_by`` maps a placeholder to the space whose elements it indexes: ``"experts.{i}.{e}"`` with
    ``{"e": "moe.{i}"}`` is carried by the permutation of layer i's experts. Its elements are indexed in the SOURCE
    chart (A's expert ``e``): under ``moe.i = sigma``, B's expert ``k`` is A's expert ``sigma.perm[k]`` moved by
    ``experts.i.<sigma.perm[k]>``. Composition and inverse follow this wreath-product law (``Gauge.__matmul__``),
    stacked axes over ``{e}`` move the slices, and checkpoint tensors named with ``{e}`` are renamed.

    ``when`` (config -> bool): the space exists only for configs where it holds; elsewhere the model has no such
    space (its axes never move): Falcon's heads under ALiBi, whose slopes are fixed by head index.

    ``ranges`` gives each placeholder's range from the config: an int ``n`` (the values ``0 .. n-1``) or a sequence
    of distinct non-negative ints (the layers where the config puts this space: ``layers_where``); default: ``{i}``
    -> every layer. ``range_values`` reads either form. ``per_layer``
    is the legacy flag (a template with ``{i}`` is per layer anyway). ``kind=None`` is filled by the spec: residual
    for ``"residual"``, units for ``"mlp.{i}"``, heads for ``"attn.{i}"`` (the legacy shorthand).
    """

    size: Callable[[object], int]
    signs: SignRule
    doc: str = ""
    per_layer: bool = False
    kind: str | None = None
    ranges: Mapping[str, Callable[[object], "int | Sequence[int]"]] = field(default_factory=dict)
    carried_by: Mapping[str, str] = field(default_factory=dict)
    when: Callable[[object], bool] | None = None


@dataclass(frozen=True)
class Requires:
    """A config field the spec's group depends on, the values it supports and why.

    ``allowed`` holds values (compared by ``==``; a bool matches only a bool, so ``0`` is not ``False``) and/or types
    (any instance admitted: ``(float,)`` for "present, any value"). ``None`` stands for a field that is absent from
    the config and from its transformers class (or set to None): list it where absence is supported."""

    field: str
    allowed: tuple
    why: str

    def admits(self, value: object) -> bool:
        for a in self.allowed:
            if isinstance(a, type):
                if isinstance(value, a) and (a is bool or not isinstance(value, bool)):
                    return True
            elif (isinstance(a, bool) or isinstance(value, bool)) and type(a) is not type(value):
                continue
            elif value == a:
                return True
        return False

    def describe(self) -> str:
        """``'silu' or 'swish'``; a type reads as ``any float``."""
        return " or ".join("absent" if a is None else f"any {a.__name__}" if isinstance(a, type) else repr(a)
                           for a in self.allowed)


_LEGACY_KINDS = {"residual": "residual", "mlp.{i}": "units", "attn.{i}": "heads"}


@dataclass(frozen=True)
class Rule:
    """``pattern``'s tensor and its moving axes. ``transposed``: a weight stored ``[in, out]`` (GPT-2's ``Conv1D``)
    rather than ``nn.Linear``'s ``[out, in]``; its axes say so already (a reader's residual axis is 0), and the flag
    tells the LoRA roles which axis PEFT's ``lora_A [r, in]`` and ``lora_B [out, r]`` inherit.

    ``carried`` maps a placeholder of the pattern to an ``Axis`` whose space (``kv=True``: its reduced space, KV
    heads) indexes tensors by name: one module per head (StableLM's ``q_layernorm.norms.{h}``). Under an element
    ``perm`` of that space the tensor named with ``h = k`` takes the source tensor named with ``h = perm[k]`` (the
    source chart, as for ``Space.carried_by``); live models, checkpoint files and optimizer states are renamed so."""

    pattern: str
    axes: tuple[Axis, ...] = ()
    transposed: bool = False
    carried: Mapping[str, Axis] = field(default_factory=dict, compare=False)

    def compile(self) -> re.Pattern:
        return template_regex(self.pattern)


@dataclass(frozen=True)
class Sites:
    """Module paths (with placeholders) where the spaces can be observed in a forward pass.

    ``inputs`` maps a space template to the module whose INPUT is that space's activation (MLP hidden units: the
    down projection; heads: the output projection). ``mlp_in`` / ``attn_out_in`` are the legacy shorthand for the
    ``"mlp.{i}"`` / ``"attn.{i}"`` entries.
    """

    layers: str                     # ModuleList of blocks; each block's input and output lie in the residual chart
    final_norm: str                 # output of the final norm (gain permuted only: still the residual chart)
    embed: str                      # token embedding module
    mlp_in: str | None = None
    attn_out_in: str | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)
    final_norm_files: tuple[str, ...] = ()   # other names of the final norm's gain in checkpoint files

    def __post_init__(self) -> None:
        merged = dict(self.inputs)
        if self.mlp_in:
            merged.setdefault("mlp.{i}", self.mlp_in)
        if self.attn_out_in:
            merged.setdefault("attn.{i}", self.attn_out_in)
        object.__setattr__(self, "inputs", merged)


@dataclass(frozen=True)
class ArchSpec:
    """An architecture's gauge structure. Rule patterns use the ``*ForCausalLM`` names; ``prefix`` is the base
    model's attribute (``"model."``) that a bare base model (``AutoModel``) lacks in its parameter names."""

    name: str
    model_types: tuple[str, ...]
    norm: Literal["rmsnorm", "layernorm"]
    spaces: Mapping[str, Space]
    rules: tuple[Rule, ...]
    dims: Callable[[object], dict[str, int]]
    sites: Sites
    file_rules: tuple[Rule, ...] = ()
    requires: tuple[Requires, ...] = ()
    # a config whose layout differs (OPT's projected embeddings, post-LayerNorm blocks) gets the spec this returns
    # (``hf_gauge.view.spec_for`` resolves it on every path that has a config); None: one layout for every config
    variant: Callable[[object], "ArchSpec"] | None = None
    # layers that checkpoint files may store after the model's num_hidden_layers ones and transformers never loads
    # (DeepSeek-V3's multi-token-prediction layers at index num_hidden_layers + k): config -> how many at most. Their
    # tensors match the layer rules with {i} = that index (and file_rules for their own modules); their per-layer
    # spaces are not spaces of the model, so no gauge names them and they move with the residual only
    file_only_layers: Callable[[object], int] | None = None
    # caches, fresh in every instance (also after ``dataclasses.replace``)
    _compiled: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    _axes_memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)   # engine.axes_for

    def __post_init__(self) -> None:
        spaces = {}
        for tmpl, sp in self.spaces.items():
            kind = sp.kind or _LEGACY_KINDS.get(tmpl)
            if kind is None:
                raise GaugeError(f"spec {self.name!r}: space {tmpl!r} declares no kind")
            ranges = dict(sp.ranges)
            for ph in placeholders(tmpl):
                if ph not in ranges:
                    if ph != "i":
                        raise GaugeError(f"spec {self.name!r}: space {tmpl!r} has no range for placeholder {{{ph}}}")
                    ranges[ph] = _n_layers
            spaces[tmpl] = dataclasses.replace(sp, kind=kind, ranges=ranges, per_layer="i" in ranges)
        for tmpl, sp in spaces.items():
            for ph, carrier in sp.carried_by.items():
                if ph not in sp.ranges or carrier not in spaces:
                    raise GaugeError(f"spec {self.name!r}: space {tmpl!r} is carried along {{{ph}}} by {carrier!r}, "
                                     "which needs that placeholder and a space template of that name")
                if spaces[carrier].signs != "none" or set(placeholders(carrier)) - set(placeholders(tmpl)):
                    raise GaugeError(f"spec {self.name!r}: carrier {carrier!r} must be a permutation space whose "
                                     f"placeholders all appear in {tmpl!r}")
        object.__setattr__(self, "spaces", spaces)

    def refusal(self, read: Callable[[str], object], model_type: str | None) -> str | None:
        """The one-line reason a config lies outside ``requires`` (``read(field)`` gives its value, None when
        absent), or None when every declared field has a supported value."""
        for req in self.requires:
            value = read(req.field)
            if not req.admits(value):
                shown = "absent" if value is None else repr(value)
                return (f"model_type={model_type!r} has {req.field}={shown}, but the {self.name!r} spec supports "
                        f"{req.field} = {req.describe()} only ({req.why}); hf_gauge cannot gauge this config exactly: "
                        "add a spec for it under hf_gauge/specs/ (docs/adding-an-architecture.md)")
        return None

    @property
    def families(self) -> tuple[str, ...]:
        """The space families (template prefixes: ``"residual"``, ``"mlp"``, ``"attn"``, ...) in template order."""
        return tuple(dict.fromkeys(t.split(".")[0] for t in self.spaces))

    @property
    def group(self) -> str:
        return "B_d" if self.spaces["residual"].signs == "any" else "S_d x {±1}"

    def compiled(self, files: bool = False) -> list[tuple[re.Pattern, Rule]]:
        key = "files" if files else "live"
        if key not in self._compiled:
            rules = (self.file_rules if files else ()) + self.rules
            self._compiled[key] = [(r.compile(), r) for r in rules]
        return self._compiled[key]

    def match(self, name: str, files: bool = False) -> tuple[Axis, ...] | None:
        """Axes of parameter ``name`` with its placeholders filled in, or None when no rule covers it.
        ``files=True`` also consults ``file_rules`` (names as checkpoint files store them)."""
        hit = self.rule_for(name, files)
        return None if hit is None else tuple(a.filled(hit[1]) for a in hit[0].axes)

    # ---------------------------------------------------------------- space names
    def _space_rx(self) -> list[tuple[re.Pattern, str]]:
        if "spaces" not in self._compiled:
            self._compiled["spaces"] = [(template_regex(t), t) for t in self.spaces]
        return self._compiled["spaces"]

    def parse_space(self, space: str) -> tuple[str, dict[str, int]]:
        """``"mlp.3"`` -> ``("mlp.{i}", {"i": 3})``; ``GaugeError`` if no template of this spec matches."""
        for rx, tmpl in self._space_rx():
            m = rx.match(space)
            if m:
                return tmpl, {k: int(v) for k, v in m.groupdict().items()}
        raise GaugeError(f"{space!r} is not a gauge space of the {self.name!r} architecture; its spaces are "
                         f"{', '.join(self.spaces)} (placeholders are canonical integers)")

    def space_template(self, space: str) -> tuple[str, int | None]:
        """``"mlp.3"`` -> ``("mlp.{i}", 3)``; ``"residual"`` -> ``("residual", None)`` (legacy; see ``parse_space``)."""
        try:
            tmpl, values = self.parse_space(space)
        except GaugeError:
            raise KeyError(space) from None
        return tmpl, values.get("i")

    def space(self, space: str) -> Space:
        """The ``Space`` template of a concrete space name."""
        return self.spaces[self.parse_space(space)[0]]

    def space_sizes(self, config) -> dict[str, int]:
        """Every concrete space (placeholders over their config ranges, in declaration order) and its size."""
        out: dict[str, int] = {}
        for tmpl, sp in self.spaces.items():
            if sp.when is not None and not sp.when(config):
                continue
            names = [tmpl]
            for ph, count in sp.ranges.items():
                names = [fill(n, {ph: k}) for n in names for k in range_values(count, config)]
            size = int(sp.size(config))
            for n in names:
                out[n] = size
        return out

    @property
    def carriers(self) -> dict[str, str]:
        """``{placeholder: carrier template}`` over every space (``{"e": "moe.{i}"}``): tensors whose names or
        stacked axes carry that placeholder are re-indexed by the carrier's permutation."""
        return {ph: c for sp in self.spaces.values() for ph, c in sp.carried_by.items()}

    def file_alias(self, name: str) -> tuple[str, str]:
        """``(old, new)`` name prefixes such that ``new + name[len(old):]`` is the spec's name of a checkpoint-file
        tensor: a bare base model (``AutoModel``) saves ``layers.0...`` for ``model.layers.0...``, a
        ``*ForQuestionAnswering`` saves its body as ``transformer.``; ``("", "")`` when the name is the spec's own
        or no alias is covered by a rule."""
        if self.rule_for(name, files=True) is not None:
            return "", ""
        body = "".join(self.sites.layers.rpartition(".")[:2])     # "model." (Llama), "transformer." (Falcon)
        head, dot, rest = name.partition(".")
        for old, new in (("", body), (head + dot, body)):
            if new and old != new and self.rule_for(new + name[len(old):], files=True) is not None:
                return old, new
        return "", ""

    def final_norm_key(self, names: Iterable[str]) -> str | None:
        """The checkpoint tensor among ``names`` that holds the final norm's gain (the fingerprint): the spec's name,
        one of ``Sites.final_norm_files`` (EXAONE's ``transformer.ln_f.weight``), or either under a bare base
        model's prefix (``file_alias``); None when absent."""
        names = list(names)
        want = {self.sites.final_norm + ".weight", *self.sites.final_norm_files}
        hit = next((n for n in names if n in want), None)
        if hit is not None:
            return hit
        for n in names:
            old, new = self.file_alias(n)
            if (old or new) and new + n[len(old):] in want:
                return n
        return None

    def rule_for(self, name: str, files: bool = False) -> tuple[Rule, dict[str, str]] | None:
        """The rule covering ``name`` and its placeholder values, or None."""
        for rx, rule in self.compiled(files):
            m = rx.match(name)
            if m:
                return rule, m.groupdict()
        return None

    def spaces_of_kind(self, *kinds: str) -> list[str]:
        return [t for t, sp in self.spaces.items() if sp.kind in kinds]


def _n_layers(config) -> int:
    return config.num_hidden_layers


class LayerSubset:
    """A placeholder range over the layers where ``pred(config, i)`` holds (``layers_where``); ``full`` is the range
    it filters (every layer), which ``hf_gauge.fileconfig`` checks against the files before the predicate runs."""

    full = staticmethod(_n_layers)

    def __init__(self, pred: Callable[[object, int], bool]) -> None:
        self.pred = pred

    def __call__(self, config) -> tuple[int, ...]:
        return tuple(i for i in range(int(_n_layers(config))) if bool(self.pred(config, i)))


def layers_where(pred: Callable[[object, int], bool]) -> LayerSubset:
    """The range of ``{i}`` over the layers ``i`` in ``range(num_hidden_layers)`` where ``pred(config, i)`` holds:
    ``ranges={"i": layers_where(lambda c, i: is_moe_layer(c, i))}`` for a space that exists on MoE layers only."""
    return LayerSubset(pred)


def range_values(count: Callable[[object], "int | Sequence[int]"], config) -> tuple[int, ...]:
    """The values of a placeholder range on ``config``: ``0 .. n-1`` for an int ``n``, else the sequence's ints
    (distinct, non-negative). ``GaugeError`` for anything else."""
    got = count(config)
    if isinstance(got, int) and not isinstance(got, bool):
        return tuple(range(got))
    if isinstance(got, (tuple, list, range)):
        vals = tuple(got)
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals) \
                and len(set(vals)) == len(vals):
            return vals
    raise GaugeError(f"a placeholder range gave {str(got)[:60]!r}; a range is an int n (0 .. n-1) or a sequence of "
                     "distinct non-negative ints (the spec or the config is wrong)")


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
