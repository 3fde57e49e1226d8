"""PEFT LoRA / DoRA adapters: live ``PeftModel``s, adapter state dicts, and adapter folders.

Driven by the engine (``engine.axes_for`` / ``moves_for`` / ``move_tensor`` on the base architecture's spec): a LoRA
factor inherits the axis of the module it wraps. On a reader (q/k/v, gate/up, lm_head) ``lora_A [r, d]`` has its
columns signed-permuted; on a writer (o/down) ``lora_B [d, r]`` (and its bias) has its rows signed-permuted; an
embedding's ``lora_embedding_B [d, r]`` has its rows signed-permuted; DoRA magnitudes follow the wrapped module's
output rows (permuted, never signed; an embedding's ``[d]`` magnitude is permuted with the residual);
``modules_to_save`` copies and saved embedding layers move like the base parameters they copy; MLP-unit and head
gauges move the other factor's rows/columns the same way. Loaded on the gauged base, the transported adapter gives
the original's outputs exactly (up to float reassociation).

Return types: a ``PeftModel`` in, a ``PeftModel`` out (``gauge.transport(peft_model)``: base and every adapter moved,
or ``adapter_name=``'s); ``transport_peft_model(gauge, peft_model, gauged_base)`` puts the adapters on a model already
in the target chart, and ``hf_gauge.load_adapter(model_b, adapter, gauge=g)`` (``peft_load``) loads a saved adapter
(folder or Hub id) onto it. A state dict in (``get_peft_model_state_dict`` format), a state dict out; a folder in, a
folder out (``transport_adapter_folder``).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..engine import check_gauge, move_tensor, segment_spans, source_names, stack_count
from ..errors import GaugeError
from ..inputs import audit_folder
from ..jsonio import read_json
from ..modelref import local_base, model_ref
from ..specs import ArchSpec
from ..specs.base import template_regex
from ..view import resolve_name
from . import register
from ._io import (GAUGE_RECORD_FILE, atomic_dir, copy_other_files, gauge_fingerprint, move_named, moves_for_names,
                  read_safetensors, spec_and_config, write_record)

ADAPTER_CFG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_README = "README.md"
SUPPORTED_PEFT_TYPES = ("LORA",)


def _peft_type(cfg: Any) -> str:
    t = cfg.get("peft_type") if isinstance(cfg, Mapping) else getattr(cfg, "peft_type", None)
    return str(getattr(t, "value", t) or "").upper()


def check_peft_type(cfg: Any, where: str) -> None:
    t = _peft_type(cfg)
    if t not in SUPPORTED_PEFT_TYPES:
        raise GaugeError(f"{where}: PEFT type {t or 'unknown'!r} is not supported; hf_gauge transports LoRA/DoRA "
                         "adapters (peft_type LORA)")


def transport_adapter_state(gauge, sd: Mapping[str, torch.Tensor], *, model_type: str | None = None,
                            spec: ArchSpec | None = None, config: Any = None, model: Any = None,
                            **_: Any) -> dict[str, torch.Tensor]:
    """Move an adapter state dict (``get_peft_model_state_dict`` keys, or live PEFT parameter names).

    The architecture comes from ``spec=``, ``model_type=``, ``config=``/``model=`` or ``gauge.source['model_type']``.
    Keys the architecture spec does not cover (an adapter for another model) raise ``GaugeError`` naming the key.
    """
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise GaugeError(f"adapter entry {k!r} must be a tensor, got {type(v).__name__}")
    spec, config = spec_and_config(gauge, model=model, config=config, model_type=model_type, spec=spec,
                                   what="adapter")
    if config.known:
        check_gauge(spec, config, gauge)
    views = param_wrapper_views(spec, config, sd)
    plan = moves_for_names(spec, config, gauge, [views[k][0] if k in views else k for k in sd])
    out = move_named(plan, {k: v for k, v in sd.items() if k not in views})
    for k, (name, shape) in views.items():
        t = sd[k].detach()
        try:
            out[k] = move_tensor(t.reshape(shape), plan[name]).reshape(t.shape)
        except GaugeError as e:
            raise GaugeError(f"{k}: {e}") from None
    return _follow_renames(spec, config, gauge, out)


def _follow_renames(spec: ArchSpec, config: Any, gauge, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries of modules the gauge renames (``Rule.carried``: one module per head, saved with ``modules_to_save``)
    take the moved entry of their source module (same role), in the key order of ``out``."""
    resolved = {k: resolve_name(k) for k in out}
    renamed = source_names(spec, gauge, {b for b, _ in resolved.values()}, config=config)
    if not renamed:
        return out
    key_of = {r: k for k, r in resolved.items()}
    result = {}
    for k, (base, role) in resolved.items():
        src = renamed.get(base)
        if src is not None and (src, role) not in key_of:
            raise GaugeError(f"{k}: its module takes the place of {src!r}, which the adapter does not hold")
        result[k] = out[key_of[(src, role)]] if src is not None else out[k]
    return result


def param_wrapper_views(spec: ArchSpec, config: Any, sd: Mapping[str, torch.Tensor]
                        ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """PEFT ``ParamWrapper`` factors of stacked parameters (LoRA on fused MoE experts ``[E, out, in]``):
    ``{key: (name the spec covers, view shape)}``. PEFT names them after the experts module (``experts.lora_A``,
    ``experts.base_layer.lora_A`` when two parameters are wrapped), so the parameter is identified by shape: the
    wrapper's ``lora_A [E * r, in]`` and ``lora_B [out, r * E]`` must fit exactly one stacked parameter of that
    module (``in`` and ``out`` of two experts' parameters never both agree: gate|up is ``[2 ff, d]``, down ``[d, ff]``).
    Views: ``lora_A`` as ``[E, r, in]``, ``lora_B`` as ``[out, r, E]`` (PEFT's layout)."""
    stacked = [r for r in spec.rules if any(a.stack for a in r.axes)]
    groups: dict[str, list[tuple[str, str, str]]] = {}
    if stacked:
        for k in sd:
            base, role = resolve_name(k)
            if role in ("lora_A", "lora_B") and base.endswith(".weight") and spec.match(base) is None:
                wrapper = k.replace(".lora_A", ".lora_*").replace(".lora_B", ".lora_*")
                groups.setdefault(wrapper, []).append((k, base[: -len(".weight")], role))
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for wrapper, members in groups.items():
        if not config.known:
            raise GaugeError(f"{members[0][0]}: a LoRA on fused MoE experts needs the model's sizes: pass config= "
                             "(the base model's config) or model=")
        fits = []
        for rule in stacked:
            module_t, _, param = rule.pattern.rpartition(".")
            m = template_regex(module_t).match(members[0][1])
            if m is None:
                continue
            st = next(a.stack for a in rule.axes if a.stack)
            axes = tuple(a.filled({**m.groupdict(), st: 0}) for a in rule.axes)    # every expert has one shape
            n = stack_count(spec, config, st)
            dims = {a.axis: sum(span for _, span, _ in segment_spans(spec, config, a)) for a in axes if not a.stack}
            shapes = {}
            for k, _, role in members:
                t = sd[k]
                ok = t.dim() == 2 and (t.shape[1] == dims.get(2) and t.shape[0] % n == 0 if role == "lora_A"
                                       else t.shape[0] == dims.get(1) and t.shape[1] % n == 0)
                if not ok:
                    break
                shapes[k] = ((n, t.shape[0] // n, t.shape[1]) if role == "lora_A"
                             else (t.shape[0], t.shape[1] // n, n))
            else:
                fits.append((f"{members[0][1]}.{param}", shapes))
        if len(fits) != 1:
            raise GaugeError(f"{members[0][0]}: a LoRA factor on fused experts that fits "
                             f"{'no' if not fits else 'more than one'} stacked parameter of the {spec.name!r} spec "
                             f"(shape {tuple(sd[members[0][0]].shape)}); was the adapter made for another model?")
        param_name, shapes = fits[0]
        for k, _, role in members:
            out[k] = (f"{param_name}.{role}.weight", shapes[k])
    return out


def _is_peft_model(o: Any) -> bool:
    return isinstance(o, torch.nn.Module) and hasattr(o, "peft_config") and callable(getattr(o, "get_base_model", None))


def _adapter_names(adapter_name: str | Iterable[str]) -> list[str]:
    return [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)


@register(_is_peft_model, "peft.PeftModel (-> PeftModel)")
def _peft_model(gauge, pm: Any, *, adapter_name: str | Iterable[str] | None = None, **_: Any) -> Any:
    """A new ``PeftModel``: a copy of ``pm`` with its base model and every adapter (keyed by adapter name; only
    ``adapter_name``, a name or several, when given) moved into the target chart, so it computes what ``pm``
    computes (``gauge`` applied to base + adapters). The adapter state dict route stays:
    ``gauge.transport(get_peft_model_state_dict(pm, adapter_name=...), model=pm)``; an adapter for a model already in
    the target chart: ``transport_peft_model(gauge, pm, gauged_base)`` or ``hf_gauge.load_adapter``."""
    from ..models import apply_gauge
    names = list(pm.peft_config) if adapter_name is None else _adapter_names(adapter_name)
    missing = [n for n in names if n not in pm.peft_config]
    if missing or not names:
        raise GaugeError(f"the PeftModel has no adapter {missing[0] if missing else adapter_name!r}; it has "
                         f"{list(pm.peft_config)}")
    for name in names:
        check_peft_type(pm.peft_config[name], f"adapter {name!r}")
    new = copy.deepcopy(pm)
    for name in [n for n in new.peft_config if n not in names]:
        new.delete_adapter(name)
    act = getattr(new, "active_adapter", None)
    if act not in names:
        new.set_adapter(names[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # a fine-tune of the gauge's source is a legitimate input
        apply_gauge(new, gauge)
    return new


def _adapter_state_of(gauge, pm: Any, name: str, **kw: Any) -> dict[str, torch.Tensor]:
    """Adapter ``name`` of ``pm`` as a transported ``get_peft_model_state_dict``."""
    from peft import get_peft_model_state_dict
    if name not in pm.peft_config:
        raise GaugeError(f"the PeftModel has no adapter {name!r}; it has {list(pm.peft_config)}")
    check_peft_type(pm.peft_config[name], f"adapter {name!r}")
    sd = get_peft_model_state_dict(pm, adapter_name=name)
    kw.setdefault("config", pm.get_base_model().config)     # its model_type is checked against the gauge's
    return transport_adapter_state(gauge, sd, **kw)


def transport_peft_model(gauge, peft_model: Any, base_model: Any, *, adapter_names: Iterable[str] | None = None,
                         strict: bool = False) -> Any:
    """A new ``PeftModel`` on ``base_model`` (already in the gauge's target chart) carrying every adapter of
    ``peft_model`` transported. Like ``PeftModel.from_pretrained``, this injects adapter layers into ``base_model``.

    ``strict=True`` refuses a base whose chart fingerprint differs from ``gauge.target['fingerprint']``.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    from ..models import fingerprint, unwrap
    if _is_peft_model(base_model):
        raise GaugeError("base_model must be a plain transformers model in the target chart, not a PeftModel")
    want = gauge.target.get("fingerprint")
    if want:
        have = fingerprint(base_model)
        if have != want:
            msg = (f"base_model's chart fingerprint {have} differs from the gauge's target {want}: is the base gauged "
                   "(apply_gauge) or the gauge's target model?")
            if strict:
                raise GaugeError(msg)
            warnings.warn(msg, stacklevel=2)
    names = list(adapter_names) if adapter_names is not None else list(peft_model.peft_config)
    new = None
    for name in names:
        cfg = copy.deepcopy(peft_model.peft_config[name])
        check_peft_type(cfg, f"adapter {name!r}")
        cfg.inference_mode = getattr(peft_model.peft_config[name], "inference_mode", False)
        sd = _adapter_state_of(gauge, peft_model, name, config=unwrap(base_model).config)
        if new is None:
            new = get_peft_model(base_model, cfg, adapter_name=name)
        else:
            new.add_adapter(name, cfg)
        res = set_peft_model_state_dict(new, sd, adapter_name=name)
        if getattr(res, "unexpected_keys", None):
            raise GaugeError(f"adapter {name!r}: keys not loaded into the new model: {res.unexpected_keys[:5]}")
    if new is None:
        raise GaugeError("no adapters to transport")
    act = getattr(peft_model, "active_adapter", None)
    if isinstance(act, str) and act in names:
        new.set_adapter(act)
    return new


def is_adapter_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CFG).is_file()


def _local_base_config(cfg: Mapping[str, Any]) -> Any:
    base = cfg.get("base_model_name_or_path")
    if isinstance(base, str) and base and "\0" not in base and (Path(base) / "config.json").is_file():
        from transformers import AutoConfig
        try:
            return AutoConfig.from_pretrained(base, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise GaugeError(f"cannot read the base model config {base}/config.json named by the adapter: "
                             f"{str(e).splitlines()[0]}; pass model_type= or config=") from None
    return None


def read_record(src: Path) -> dict[str, Any] | None:
    """The gauge provenance an earlier transport wrote into ``src`` (None when there is none)."""
    p = src / GAUGE_RECORD_FILE
    if not p.is_file():
        return None
    rec = read_json(p, str(p), "remove it or re-transport the original adapter")
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k, {}), dict) for k in ("source", "target")):
        raise GaugeError(f"{p} is not an hf_gauge provenance record; remove it or re-transport the original adapter")
    return rec


def check_adapter_chart(gauge, src: Path, adapter_base: str | None, rec: dict[str, Any] | None,
                        recorded_in: str = GAUGE_RECORD_FILE) -> None:
    """Refuse an adapter that is not in the gauge's source chart.

    With a provenance record (the adapter was transported before): a second transport through the same gauge, and a
    record whose target chart fingerprint is not the gauge's source chart (the gauge's target: the wrong direction).
    Without one: an adapter whose base is the gauge's recorded target model (the wrong direction).
    """
    if rec is not None:
        if rec.get("fingerprint") == gauge_fingerprint(gauge):
            raise GaugeError(f"{src} was already transported through this gauge (its {recorded_in} records "
                             f"gauge {rec['fingerprint']}); transporting it again would move it out of the chart of "
                             "its base. Use it as it is, or the original")
        chart, want = rec["target"].get("fingerprint"), gauge.source.get("fingerprint")
        if chart and want and chart != want:
            if chart == gauge.target.get("fingerprint"):
                raise GaugeError(f"{src} is already in this gauge's target chart (fingerprint {chart}): this is the "
                                 "wrong direction; use the inverse gauge (--inverse / gauge.inverse()) to go back")
            raise GaugeError(f"{src} is in the chart with fingerprint {chart} (its {recorded_in}) but the gauge "
                             f"starts from the chart {want}: fit a gauge from the adapter's base instead")
        return
    tgt, srcid = gauge.target.get("model_id"), gauge.source.get("model_id")
    if adapter_base and tgt and tgt != srcid and model_ref(adapter_base)[0] == model_ref(tgt)[0]:   # ./B == /abs/B
        raise GaugeError(f"{src} is an adapter of {tgt!r}, the gauge's target model: this is the wrong direction; use "
                         "the inverse gauge (--inverse / gauge.inverse()) to move it to the source chart")


def gauged_base(gauge, base: str | None, rec: dict[str, Any] | None = None) -> str:
    """The base model the transported adapter must be loaded on: ``base``, the original base when this gauge undoes
    the recorded transport, or the gauge's recorded target model; ``GaugeError`` when unknown."""
    if base:
        return str(base)
    if rec is not None and rec.get("original_base") and rec.get("fingerprint") == gauge_fingerprint(gauge.inverse()):
        return str(rec["original_base"])
    tgt, srcid = gauge.target.get("model_id"), gauge.source.get("model_id")
    if tgt and tgt != srcid:
        return str(tgt)
    raise GaugeError("the gauged base model is unknown (the gauge does not record a target model distinct from its "
                     "source): pass base= (CLI: --base) naming the gauged checkpoint, e.g. the folder written by "
                     "hf-gauge apply or its Hub id, so that AutoPeftModel loads the adapter on the right chart")


def _write_adapter_config(src: Path, dst: Path, base: str, source: Mapping[str, Any]) -> str | None:
    """Rewrite ``adapter_config.json`` (``source``, as read) through PEFT's own ``PeftConfig`` with
    ``base_model_name_or_path=base`` (revision cleared: it pinned the old base); returns the old base."""
    from peft import PeftConfig
    try:
        cfg = PeftConfig.from_pretrained(str(src))
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise GaugeError(f"{src / ADAPTER_CFG} is not a valid PEFT config: {' '.join(str(e).split())[:200]}") from None
    old = cfg.base_model_name_or_path
    cfg.base_model_name_or_path, cfg.revision = base, None
    _keep_list_order(cfg, source)
    cfg.save_pretrained(str(dst))
    return old


def _keep_list_order(cfg: Any, source: Mapping[str, Any]) -> None:
    """PEFT holds list fields (``target_modules``, ``exclude_modules``) as sets and writes them in set-iteration
    order, which changes with the hash seed: give each such field back the source file's list (same elements, the
    user's order), so users' diffs of ``adapter_config.json`` show only what hf_gauge changed."""
    for key, value in list(vars(cfg).items()):
        old = source.get(key)
        if isinstance(value, set) and isinstance(old, list) and all(isinstance(x, str) for x in old) \
                and set(old) == value:
            setattr(cfg, key, list(old))


def _write_adapter_card(src: Path, dst: Path, base: str, old: str | None, gauge) -> None:
    """The adapter's README with ``base_model`` set to the gauged base (metadata through ``huggingface_hub.ModelCard``;
    the user's text kept) and a note on the transport; a short card when the adapter had none."""
    from huggingface_hub import ModelCard, ModelCardData
    note = (f"\n\n## hf_gauge transport\n\nThis adapter was moved through the gauge `{gauge_fingerprint(gauge)}` "
            f"from the chart of `{old or 'its original base'}` to the chart of `{base}`. Load it on `{base}` "
            f"(`AutoPeftModelForCausalLM.from_pretrained(...)` does so); on the original base it is wrong. Provenance: "
            f"`{GAUGE_RECORD_FILE}`.\n")
    p = src / ADAPTER_README
    if p.is_file():
        try:
            card = ModelCard(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise GaugeError(f"{p} has an unreadable model card header: {e}; fix or remove it") from None
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name='peft').to_yaml()}\n---\n# PEFT adapter")
    card.data.base_model = base
    card.text = card.text.rstrip() + note
    card.save(str(dst / ADAPTER_README))


def transport_adapter_folder(gauge, src: str | Path, out: str | Path, *, base: str | None = None,
                             model_type: str | None = None, spec: ArchSpec | None = None, config: Any = None,
                             model: Any = None, **_: Any) -> Path:
    """PEFT adapter folder -> a new folder in the target chart (atomic). Extra adapters saved in subfolders are
    transported too.

    The output names the gauged base in ``adapter_config.json`` (``base_model_name_or_path``) and in its README's
    ``base_model``: ``base``, else the gauge's recorded target model (refused when unknown), so that
    ``AutoPeftModelForCausalLM.from_pretrained(out)`` loads the right chart. Gauge provenance goes to
    ``hf_gauge_transport.json``; with it a second transport through the same gauge, or one in the wrong direction,
    is refused. The architecture comes from the kwargs, ``gauge.source['model_type']``, or a local
    ``base_model_name_or_path/config.json``; a gauge that moves attention heads also needs the head geometry, from
    ``config=``/``model=`` or that local base config.
    """
    from safetensors.torch import save_file
    src, out = Path(src), Path(out)
    if not is_adapter_folder(src):
        raise GaugeError(f"{src} is not a PEFT adapter folder (needs {ADAPTER_CFG})")
    files = audit_folder(src)                       # links and special files, before anything is read
    if not (src / ADAPTER_WEIGHTS).is_file():
        if (src / "adapter_model.bin").is_file():
            raise GaugeError(f"{src} holds adapter_model.bin (a pickle); hf_gauge reads safetensors only. Re-save "
                             "the adapter with save_pretrained(..., safe_serialization=True)")
        raise GaugeError(f"{src} has no {ADAPTER_WEIGHTS}")
    cfg = read_json(src / ADAPTER_CFG, str(src / ADAPTER_CFG), "re-save the adapter with save_pretrained")
    if not isinstance(cfg, dict):
        raise GaugeError(f"{src / ADAPTER_CFG} must hold a JSON object (the adapter config), got a "
                         f"{type(cfg).__name__}")
    check_peft_type(cfg, str(src))
    sd, st_meta = read_safetensors(src / ADAPTER_WEIGHTS, "re-save the adapter with save_pretrained")
    rec = read_record(src)
    check_adapter_chart(gauge, src, cfg.get("base_model_name_or_path"), rec)
    new_base = local_base(gauged_base(gauge, base, rec))     # a relative folder would load from here only
    if config is None and model is None:        # architecture and head geometry from a local base's config.json
        config = _local_base_config(cfg)
    moved = transport_adapter_state(gauge, sd, model_type=model_type, spec=spec, config=config, model=model)
    subs = [p for p in sorted(src.iterdir()) if p.is_dir()]
    for p in subs:
        if not is_adapter_folder(p):
            raise GaugeError(f"{src} contains a subfolder {p.name!r} that is not an adapter; refusing to copy it unmoved")
    with atomic_dir(out, src) as tmp:
        copy_other_files(src, files, tmp, skip=[ADAPTER_WEIGHTS, ADAPTER_CFG, ADAPTER_README] + [p.name for p in subs])
        old_base = _write_adapter_config(src, tmp, new_base, cfg)
        _write_adapter_card(src, tmp, new_base, old_base, gauge)
        save_file({k: v.contiguous() for k, v in moved.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=st_meta)
        for p in subs:
            transport_adapter_folder(gauge, p, tmp / p.name, base=new_base, model_type=model_type, spec=spec,
                                     config=config, model=model)
        write_record(tmp, gauge, kind="peft_adapter", source_path=str(src), base_model=new_base,
                     original_base=old_base)
    return out


def _is_adapter_state(o: Any) -> bool:
    return isinstance(o, Mapping) and bool(o) and all(isinstance(k, str) for k in o) \
        and all(isinstance(v, torch.Tensor) for v in o.values()) \
        and any(("lora_" in k) or k.startswith("base_model.model.") for k in o)


@register(_is_adapter_state, "PEFT adapter state dict (needs model_type= / spec= / config=)")
def _adapter_state(gauge, sd: Mapping[str, torch.Tensor], **kw: Any) -> dict[str, torch.Tensor]:
    return transport_adapter_state(gauge, sd, **kw)
