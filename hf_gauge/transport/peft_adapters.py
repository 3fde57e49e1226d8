"""PEFT LoRA / DoRA adapters: live ``PeftModel``s, adapter state dicts, and adapter folders.

Driven by the engine (``engine.axes_for`` / ``moves_for`` / ``move_tensor`` on the base architecture's spec): a LoRA
factor inherits the axis of the module it wraps. On a reader (q/k/v, gate/up, lm_head) ``lora_A [r, d]`` has its
columns signed-permuted; on a writer (o/down) ``lora_B [d, r]`` (and its bias) has its rows signed-permuted; an
embedding's ``lora_embedding_B [d, r]`` has its rows signed-permuted; DoRA magnitudes follow the wrapped module's
output rows (permuted, never signed; an embedding's ``[d]`` magnitude is permuted with the residual);
``modules_to_save`` copies and saved embedding layers move like the base parameters they copy; MLP-unit and head
gauges move the other factor's rows/columns the same way. Loaded on the gauged base, the transported adapter gives
the original's outputs exactly (up to float reassociation).

Return types: ``gauge.transport(peft_model)`` returns the adapter state dict (the format of
``peft.get_peft_model_state_dict``, ready for ``set_peft_model_state_dict`` or ``save_file``); use
``transport_peft_model(gauge, peft_model, gauged_base)`` for a new ``PeftModel``. A state dict in, a state dict out;
a folder in, a folder out (``transport_adapter_folder``).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import GaugeError
from ..specs import ArchSpec
from . import register
from ._io import (atomic_dir, copy_other_files, move_named, moves_for_names, read_json, read_safetensors,
                  spec_and_config, write_record)

ADAPTER_CFG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SUPPORTED_PEFT_TYPES = ("LORA",)


def _peft_type(cfg: Any) -> str:
    t = cfg.get("peft_type") if isinstance(cfg, Mapping) else getattr(cfg, "peft_type", None)
    return str(getattr(t, "value", t) or "").upper()


def _check_peft_type(cfg: Any, where: str) -> None:
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
    if not isinstance(config, type(None)) and hasattr(config, "num_hidden_layers"):
        from ..engine import check_gauge
        check_gauge(spec, config, gauge)
    plan = moves_for_names(spec, config, gauge, sd.keys())
    return move_named(plan, dict(sd))


def _is_peft_model(o: Any) -> bool:
    return isinstance(o, torch.nn.Module) and hasattr(o, "peft_config") and callable(getattr(o, "get_base_model", None))


def _adapter_names(pm: Any, adapter_name: str | Iterable[str] | None) -> list[str]:
    if adapter_name is None:
        act = getattr(pm, "active_adapter", None) or "default"
        return [act] if isinstance(act, str) else list(act)
    return [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)


@register(_is_peft_model, "peft.PeftModel (-> adapter state dict)")
def _peft_model(gauge, pm: Any, *, adapter_name: str | None = None, **kw: Any) -> dict[str, torch.Tensor]:
    """The adapter ``adapter_name`` (default: the active one) as a transported ``get_peft_model_state_dict``."""
    from peft import get_peft_model_state_dict
    (name,) = _adapter_names(pm, adapter_name)[:1] or ["default"]
    if name not in pm.peft_config:
        raise GaugeError(f"the PeftModel has no adapter {name!r}; it has {list(pm.peft_config)}")
    _check_peft_type(pm.peft_config[name], f"adapter {name!r}")
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
        _check_peft_type(cfg, f"adapter {name!r}")
        cfg.inference_mode = getattr(peft_model.peft_config[name], "inference_mode", False)
        sd = _peft_model(gauge, peft_model, adapter_name=name, config=unwrap(base_model).config)
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


def transport_adapter_folder(gauge, src: str | Path, out: str | Path, *, model_type: str | None = None,
                             spec: ArchSpec | None = None, config: Any = None, model: Any = None, **_: Any) -> Path:
    """PEFT adapter folder -> a new folder in the target chart (atomic; ``adapter_config.json`` copied unchanged,
    gauge provenance in ``hf_gauge_transport.json``). Extra adapters saved in subfolders are transported too.

    The architecture comes from the kwargs, ``gauge.source['model_type']``, or a local
    ``base_model_name_or_path/config.json``.
    """
    from safetensors.torch import save_file
    src, out = Path(src), Path(out)
    if not is_adapter_folder(src):
        raise GaugeError(f"{src} is not a PEFT adapter folder (needs {ADAPTER_CFG})")
    if not (src / ADAPTER_WEIGHTS).is_file():
        if (src / "adapter_model.bin").is_file():
            raise GaugeError(f"{src} holds adapter_model.bin (a pickle); hf_gauge reads safetensors only. Re-save "
                             "the adapter with save_pretrained(..., safe_serialization=True)")
        raise GaugeError(f"{src} has no {ADAPTER_WEIGHTS}")
    cfg = read_json(src / ADAPTER_CFG, str(src / ADAPTER_CFG), "re-save the adapter with save_pretrained")
    if not isinstance(cfg, dict):
        raise GaugeError(f"{src / ADAPTER_CFG} must hold a JSON object (the adapter config), got a "
                         f"{type(cfg).__name__}")
    _check_peft_type(cfg, str(src))
    if spec is None and model_type is None and config is None and model is None and not gauge.source.get("model_type"):
        config = _local_base_config(cfg)
    sd, st_meta = read_safetensors(src / ADAPTER_WEIGHTS, "re-save the adapter with save_pretrained")
    moved = transport_adapter_state(gauge, sd, model_type=model_type, spec=spec, config=config, model=model)
    subs = [p for p in sorted(src.iterdir()) if p.is_dir()]
    for p in subs:
        if not is_adapter_folder(p):
            raise GaugeError(f"{src} contains a subfolder {p.name!r} that is not an adapter; refusing to copy it unmoved")
    with atomic_dir(out, src) as tmp:
        copy_other_files(src, tmp, skip=[ADAPTER_WEIGHTS] + [p.name for p in subs])
        save_file({k: v.contiguous() for k, v in moved.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=st_meta)
        for p in subs:
            transport_adapter_folder(gauge, p, tmp / p.name, model_type=model_type, spec=spec, config=config,
                                     model=model)
        write_record(tmp, gauge, kind="peft_adapter", source_path=str(src))
    return out


def _is_adapter_state(o: Any) -> bool:
    return isinstance(o, Mapping) and bool(o) and all(isinstance(k, str) for k in o) \
        and all(isinstance(v, torch.Tensor) for v in o.values()) \
        and any(("lora_" in k) or k.startswith("base_model.model.") for k in o)


@register(_is_adapter_state, "PEFT adapter state dict (needs model_type= / spec= / config=)")
def _adapter_state(gauge, sd: Mapping[str, torch.Tensor], **kw: Any) -> dict[str, torch.Tensor]:
    return transport_adapter_state(gauge, sd, **kw)
