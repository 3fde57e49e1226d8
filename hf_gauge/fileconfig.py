"""The one reader of a checkpoint folder's ``config.json``, checked against the tensors its safetensors headers list.

A config.json from the Hub may lie: ``num_hidden_layers: 10**9`` on a 2-layer checkpoint (loops and tables without
bound), ``num_attention_heads: 0`` (a division by zero), ``hidden_size: "64"`` or ``1e308``. Every file path (find,
verify and streaming apply from files) reads the config here, and every size the spec derives from it is checked
before anything is allocated or looped over, driven by the spec's data only:

1. Before transformers sees the file: the JSON (``jsonio.read_json``: bounded) is read as plain fields, and every
   space's size function, every placeholder range (``{i}`` layers, ``{e}`` experts) and the ``dims`` are evaluated on
   it. Each must give an ``int`` (not a bool, float or string) in ``[1, 2**31]``. Each placeholder range must equal
   the tensors on disk: the values the placeholder takes in the tensor names the spec's rules match are exactly
   ``0 .. n-1``, and every stacked axis over it (``Axis(stack="e")``) has ``n`` entries. A range over some layers
   only (``specs.base.layers_where``: MoE layers among dense ones) has its full range (every layer) checked so
   before its predicate runs, then must hold exactly the layers whose tensors on disk lie in its space. A space whose
   ``Space.when`` is false on the config is skipped. A field the file omits is left to transformers' default and
   checked in step 2.
2. The transformers config (``AutoConfig``, any failure a ``GaugeError``) is checked the same way, then every
   tensor axis the rules map to a gauge space (blocks, KV groups and fused segments included: ``segment_spans``)
   must have the size the config gives that space.

Every refusal is one ``GaugeError`` naming the file, the config fields the size was computed from and the tensor.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from .engine import axes_for, segment_spans
from .errors import GaugeError
from .jsonio import read_json
from .kinds import get_kind
from .specs import ArchSpec, get_spec
from .specs.base import Axis, LayerSubset, placeholders, range_values
from .view import ConfigView, JsonConfig, spec_for

__all__ = ["MAX_SIZE", "checkpoint_config", "check_config_sizes"]

MAX_SIZE = 2 ** 31          # no width, depth or count of a real checkpoint comes near this


class _Fields:
    """A JSON object read as attributes (what a config's size functions see); missing fields are AttributeError."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_doc", doc)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            value = self._doc[name]
        except KeyError:
            raise AttributeError(name) from None
        return _Fields(value) if isinstance(value, dict) else value


class _Reads(ConfigView):
    """A ``ConfigView`` that records the config fields each computation reads (for the error message)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.log: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            value = super().__getattr__(name)
        except AttributeError:
            self.log[name] = "<missing>"
            raise
        self.log[name] = value
        return value

    def get(self, name: str, default: Any = None) -> Any:
        value = super().get(name, default)
        self.log[name] = value
        return value

    def fields(self) -> str:
        return ", ".join(f"{k}={v!r}"[:80] for k, v in self.log.items()) or "no field"


_DEFERRED = object()


def _call(view: _Reads, fn: Callable[[Any], Any], what: str, where: str, deferred: bool) -> Any:
    """``fn(view)``; ``_DEFERRED`` when a field is missing and ``deferred`` (transformers fills it in step 2)."""
    view.log = {}
    try:
        return fn(view)
    except GaugeError as e:
        raise GaugeError(f"{where}: {e}") from None
    except AttributeError:
        if deferred:
            return _DEFERRED
        raise GaugeError(f"{where}: {what} needs config fields ({view.fields()}) that the config lacks; the file is "
                         "incomplete or not this architecture's") from None
    except (ArithmeticError, TypeError, ValueError, RecursionError) as e:
        raise GaugeError(f"{where}: {what} cannot be computed from {view.fields()} ({type(e).__name__}); the "
                         "config is corrupt or hostile") from None


def _checked(value: Any, view: _Reads, what: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
        raise GaugeError(f"{where}: {what} is {value!r} (from {view.fields()}); a size must be an integer between 1 "
                         f"and {MAX_SIZE}: the config is corrupt or hostile")
    return value


def _size(view: _Reads, fn: Callable[[Any], Any], what: str, where: str, deferred: bool) -> int | None:
    """``fn(view)`` as a checked size (``_call``)."""
    value = _call(view, fn, what, where, deferred)
    return None if value is _DEFERRED else _checked(value, view, what, where)


def _on_disk(spec: ArchSpec, tensors: Mapping[str, Mapping[str, Any]]
             ) -> tuple[dict[str, set[int]], dict[str, list[tuple[str, int]]], dict[tuple[str, str], set[int]]]:
    """``({placeholder: values in matched tensor names}, {placeholder: [(tensor, entries of its stacked axis)]},
    {(space template, placeholder): values in the names of the tensors whose axes lie in that space})``."""
    named: dict[str, set[int]] = {}
    stacked: dict[str, list[tuple[str, int]]] = {}
    by_space: dict[tuple[str, str], set[int]] = {}
    for name, info in tensors.items():
        old, new = spec.file_alias(name)
        hit = spec.rule_for(new + name[len(old):], files=True)
        if hit is None:
            continue
        rule, values = hit
        for ph, v in values.items():
            if len(v) > 10:                              # int() of thousands of digits is slow, then refused
                raise GaugeError(f"tensor {name!r} has a {{{ph}}} index of {len(v)} digits; the shard is corrupt or "
                                 "hostile: re-download the checkpoint")
            named.setdefault(ph, set()).add(int(v))
        for a in (*rule.axes, *rule.carried.values()):
            for tmpl in a.spaces:
                for ph in placeholders(tmpl):
                    if ph in values:
                        by_space.setdefault((tmpl, ph), set()).add(int(values[ph]))
        shape = info["shape"]
        for a in rule.axes:
            if a.stack:
                stacked.setdefault(a.stack, []).append((name, shape[a.axis] if a.axis < len(shape) else 0))
    return named, stacked, by_space


def _check_ranges(spec: ArchSpec, view: _Reads, tensors: Mapping[str, Mapping[str, Any]], where: str,
                  deferred: bool) -> None:
    """Every placeholder range equals what the tensors on disk hold (names ``0..n-1``, stacked axes of ``n``); a
    range over some layers only (``layers_where``) first has its full range checked so, then its layers must be
    exactly those whose tensors lie in the space. Layers stored after the model's (``ArchSpec.file_only_layers``)
    are checked on their own (``_file_only_layers``) and left out here."""
    tensors = _file_only_layers(spec, view, tensors, where, deferred)
    named, stacked, by_space = _on_disk(spec, tensors)
    for tmpl, sp in spec.spaces.items():
        if _absent(view, sp, tmpl, where, deferred):
            continue
        no_layer = False        # a layers_where range that is empty here: the space's other placeholders have no tensors
        for ph, count in sorted(sp.ranges.items(), key=lambda kv: not isinstance(kv[1], LayerSubset)):
            if no_layer:        # (DeepSeek with every layer dense: no expert tensor carries {e})
                continue
            what = f"the range of {{{ph}}} in space {tmpl!r}"
            full = count.full if isinstance(count, LayerSubset) else count
            got = _call(view, full, what, where, deferred)
            if got is _DEFERRED:
                continue
            if not isinstance(count, LayerSubset) and not isinstance(got, int):
                _check_subset(view, count, by_space.get((tmpl, ph), set()), tmpl, ph, what, where, deferred)
                continue
            n = _checked(got, view, what, where)
            have = named.get(ph)
            if have is not None and not (len(have) == n and min(have) == 0 and max(have) == n - 1):
                top = max(have)
                raise GaugeError(f"{where}: the config gives {{{ph}}} of space {tmpl!r} {n} values ({view.fields()}) "
                                 f"but the checkpoint's tensors hold {len(have)} (indices {min(have)}..{top}); the "
                                 "config does not describe these weights: re-download the checkpoint")
            for name, k in stacked.get(ph, []):
                if k != n:
                    raise GaugeError(f"{where}: the config gives {{{ph}}} of space {tmpl!r} {n} values "
                                     f"({view.fields()}) but tensor {name!r} stacks {k}; the config does not describe "
                                     "these weights: re-download the checkpoint")
            if have is None and ph not in stacked:
                raise GaugeError(f"{where}: the config gives {{{ph}}} of space {tmpl!r} {n} values "
                                 f"({view.fields()}) but no tensor of the checkpoint carries it; the config does not "
                                 "describe these weights: re-download the checkpoint")
            if isinstance(count, LayerSubset):
                _check_subset(view, count, by_space.get((tmpl, ph), set()), tmpl, ph, what, where, deferred)
                no_layer = not _call(view, lambda c, f=count: range_values(f, c), what, where, deferred)


def _absent(view: _Reads, sp: Any, tmpl: str, where: str, deferred: bool) -> bool:
    """The space does not exist on this config (``Space.when`` false): nothing of it is sized or checked. A ``when``
    that needs a field the raw file omits is decided in step 2."""
    if sp.when is None:
        return False
    got = _call(view, sp.when, f"whether space {tmpl!r} exists", where, deferred)
    return got is _DEFERRED or not got


def _file_only_layers(spec: ArchSpec, view: _Reads, tensors: Mapping[str, Mapping[str, Any]], where: str,
                      deferred: bool) -> Mapping[str, Mapping[str, Any]]:
    """``tensors`` without those of the layers a spec allows after the model's (``ArchSpec.file_only_layers``:
    DeepSeek-V3's multi-token-prediction layers, ``{i}`` = ``num_hidden_layers + k``). Such layers must be
    ``num_hidden_layers .. num_hidden_layers + m - 1`` with ``m`` at most what the config allows."""
    if spec.file_only_layers is None:
        return tensors
    n = _call(view, lambda c: c.num_hidden_layers, "the number of layers", where, deferred)
    extra = _call(view, spec.file_only_layers, "the number of layers stored after the model's", where, deferred)
    if n is _DEFERRED or extra is _DEFERRED:
        return tensors
    n = _checked(n, view, "num_hidden_layers", where)
    if extra is None or isinstance(extra, bool) or not isinstance(extra, int) or not 0 <= extra <= MAX_SIZE:
        raise GaugeError(f"{where}: the number of layers stored after the model's is {extra!r} (from "
                         f"{view.fields()}); it must be an integer >= 0: the config is corrupt or hostile")
    kept, extra_layers = {}, set()
    for name, info in tensors.items():
        old, new = spec.file_alias(name)
        hit = spec.rule_for(new + name[len(old):], files=True)
        i = hit[1].get("i") if hit is not None else None
        if i is not None and len(i) <= 10 and int(i) >= n:
            extra_layers.add(int(i))
        else:
            kept[name] = info
    if extra_layers and (max(extra_layers) >= n + extra or len(extra_layers) != max(extra_layers) - n + 1):
        raise GaugeError(f"{where}: the checkpoint stores layers {sorted(extra_layers)[:8]} after the model's {n} "
                         f"({view.fields()} allows at most {extra} more, numbered from {n}); the config does not "
                         "describe these weights: re-download the checkpoint")
    return kept


def _check_subset(view: _Reads, count: Callable[[Any], Any], have: set[int], tmpl: str, ph: str, what: str,
                  where: str, deferred: bool) -> None:
    """A range given as a sequence (the layers where a space lives) holds exactly the values of ``{ph}`` in the names
    of the tensors on disk whose axes lie in space ``tmpl``."""
    vals = _call(view, lambda c: range_values(count, c), what, where, deferred)
    if vals is _DEFERRED:
        return
    if any(v > MAX_SIZE for v in vals):
        raise GaugeError(f"{where}: {what} holds {max(vals)} (from {view.fields()}); the config is corrupt or hostile")
    if set(vals) != have:
        odd = sorted(set(vals) ^ have)[:6]
        raise GaugeError(f"{where}: the config puts space {tmpl!r} at {{{ph}}} in {sorted(vals)[:12]} "
                         f"({view.fields()}) but the checkpoint's tensors of that space are at {sorted(have)[:12]} "
                         f"(they differ at {odd}); the config does not describe these weights: re-download the "
                         "checkpoint")


def _check_sizes(spec: ArchSpec, view: _Reads, where: str, deferred: bool) -> dict[str, tuple[int, str]]:
    """``{space template or dim: (size, fields it was computed from)}``, each size checked."""
    out: dict[str, tuple[int, str]] = {}
    for tmpl, sp in spec.spaces.items():
        if _absent(view, sp, tmpl, where, deferred):
            continue
        n = _size(view, sp.size, f"the size of space {tmpl!r}", where, deferred)
        if n is not None:
            out[tmpl] = (n, view.fields())
    dims = _call(view, spec.dims, "the spec's dims", where, deferred)
    if dims is not _DEFERRED:
        for key, n in dims.items():
            out[key] = (_checked(n, view, repr(key), where), view.fields())
    return out


def _check_widths(spec: ArchSpec, view: _Reads, tensors: Mapping[str, Mapping[str, Any]], where: str,
                  known: Mapping[str, tuple[int, str]]) -> None:
    """Every tensor axis the rules map to gauge spaces has the entries the config gives those spaces."""
    try:
        sizes = spec.space_sizes(view)
    except (ArithmeticError, TypeError, ValueError, AttributeError) as e:
        raise GaugeError(f"{where}: the gauge spaces cannot be sized ({type(e).__name__}); the config is corrupt") \
            from None
    for name, info in tensors.items():
        axes = axes_for(spec, name, files=True)
        if not axes:
            continue
        shape = list(info["shape"])
        st = next((a for a in axes if a.stack), None)
        for a in axes:
            if a is st:
                continue
            if st is not None:                        # a stacked tensor: every slice's axes, at {e} = 0
                a = a.filled({st.stack: 0})
            _check_axis(spec, view, sizes, name, shape, a, where, known)


def _check_axis(spec: ArchSpec, view: _Reads, sizes: dict[str, int], name: str, shape: list[int], a: Axis,
                where: str, known: Mapping[str, tuple[int, str]]) -> None:
    try:
        want = sum(n for _, n, _ in segment_spans(spec, view, a, sizes))
    except GaugeError as e:
        raise GaugeError(f"{where}: tensor {name!r}: {e}") from None
    except (ArithmeticError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise GaugeError(f"{where}: the width of {name!r} on axis {a.axis} cannot be computed from the config "
                         f"({type(e).__name__}: {str(e)[:80]}); the config is corrupt") from None
    have = shape[a.axis] if a.axis < len(shape) else None
    if have != want:
        src = "; ".join(f"{k} = {known[k][0]} from {known[k][1]}"
                        for k in dict.fromkeys(spec.parse_space(p.space)[0] if p.space else p.block
                                               for p in a.parts()) if k in known)
        fields = dict.fromkeys(f for p in a.parts() if p.kv for f in get_kind(spec.space(p.space).kind).group_fields)
        if fields:
            src += "; grouped by " + ", ".join(f"{f}={view.get(f)!r}" for f in fields if view.get(f) is not None)
        raise GaugeError(f"{where}: width mismatch: tensor {name!r} has shape {shape}, but the config makes its "
                         f"axis {a.axis} {want} entries ({src or 'spaces ' + ', '.join(a.spaces)}); the config does "
                         "not describe these weights: re-download the checkpoint")


def check_config_sizes(spec: ArchSpec, config: Any, tensors: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Step 2 of the module docstring on a loaded config: sizes, ranges against the tensors, then widths."""
    view = _Reads(ConfigView.of(config).raw)
    known = _check_sizes(spec, view, where, deferred=False)
    _check_ranges(spec, view, tensors, where, deferred=False)
    _check_widths(spec, view, tensors, where, known)


# quantization methods whose checkpoints transformers can dequantize on load: the way to a float checkpoint
_DEQUANTIZE = {"mxfp4": "(gpt-oss is released only so) load it with from_pretrained(folder, "
                        "quantization_config=Mxfp4Config(dequantize=True)) and save_pretrained a float checkpoint"}


def _quantized(doc: Mapping[str, Any], folder: Path) -> None:
    quant = doc.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        hint = _DEQUANTIZE.get(method) if isinstance(method, str) else None
        raise GaugeError(f"{folder} is a quantized checkpoint ({method or 'config.quantization_config'}): its packed "
                         "weights cannot be moved by index. Apply the gauge to the float checkpoint and quantize the "
                         "result again" + (f"; {hint}" if hint else ""))


def checkpoint_config(folder: str | os.PathLike, tensors: Mapping[str, Mapping[str, Any]], *, stored: bool = False
                      ) -> tuple[ConfigView, ArchSpec]:
    """``(config view, spec)`` of a checkpoint folder whose safetensors headers list ``tensors`` (``{name: {"shape":
    [...], ...}}`` over every shard); every size checked against them (module docstring). ``GaugeError`` otherwise.

    ``stored=True`` views the file as stored (``view.JsonConfig``: no transformers config class is imported, about
    1 s of a fresh process) and raises ``ConfigAbsent`` as soon as anything reads a value only a config class's
    default would give; the caller then asks again without it (step 2 above, through ``AutoConfig``)."""
    folder = Path(folder)
    where = str(folder / "config.json")
    doc = read_json(folder / "config.json", where, "re-download the checkpoint")
    if not isinstance(doc, dict):
        raise GaugeError(f"{where} is not a JSON object; re-download the checkpoint")
    model_type = doc.get("model_type")
    if not isinstance(model_type, str):
        raise GaugeError(f"{where} has model_type {model_type!r}; a transformers config names its architecture "
                         "with a string model_type")
    spec = get_spec(model_type)
    _quantized(doc, folder)
    raw = _Reads(_Fields(doc))
    _check_sizes(spec, raw, where, deferred=True)
    _check_ranges(spec, raw, tensors, where, deferred=True)
    if stored:
        config = JsonConfig(doc)
    else:
        config = _auto_config(folder, where)
    view = ConfigView(config)
    if view.model_type != model_type:
        raise GaugeError(f"{where}: transformers reads model_type {view.model_type!r} from a file that says "
                         f"{model_type!r}; re-download the checkpoint")
    spec = spec_for(view)             # the declared fields checked; the layout's variant (OPT's projections)
    check_config_sizes(spec, view, tensors, where)
    return view, spec


def _auto_config(folder: Path, where: str) -> Any:
    """``AutoConfig.from_pretrained(folder)``; any failure of transformers' validation is a ``GaugeError``."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:   # transformers' validation raises assorted types (ValueError, its strict-dataclass errors)
        raise GaugeError(f"cannot read {where}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}") \
            from None
