"""Sparse autoencoders (SAELens orientation): live ``SAE`` objects, SAELens folders, and plain state dicts.

For a gauge element ``Q`` on the SAE's input space (``x_B = Q x_A``) the transported SAE has
``W_enc' = Q W_enc`` (rows of ``W_enc [d_in, m]`` signed-permuted), ``W_dec' = W_dec Q^T`` (columns of
``W_dec [m, d_out]``), ``b_dec' = Q b_dec``; ``b_enc``, thresholds, gates and every other per-feature ``[m]``
tensor are unchanged. Then ``encode_B(Q x) = encode_A(x)`` and ``decode_B(f) = Q decode_A(f)``: identical codes,
identical reconstruction error. Transcoders move ``W_dec``/``b_dec`` (and ``W_skip [d_out, d_in]``) with their
output space. An SAE that mean-centres its input (``normalize_activations="layer_norm"``) is covariant only under
permutations and one global sign flip, so mixed signs are refused.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..engine import Move
from ..errors import GaugeError
from ..inputs import audit_folder
from ..jsonio import read_json
from ..modelref import shareable
from . import register
from ._io import (atomic_dir, copy_other_files, element, gauge_record, move_of, read_safetensors, write_record)

SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CHART_FREE = ("sparsity.safetensors",)   # per-feature statistics: indexed by features, not coordinates

# name -> ((axis, "in" | "out"), ...); an empty tuple: per-feature or scalar, never moves
SAE_RULES: dict[str, tuple[tuple[int, str], ...]] = {
    "W_enc": ((0, "in"),),
    "W_dec": ((1, "out"),),
    "b_dec": ((0, "out"),),
    "W_skip": ((0, "out"), (1, "in")),
    "b_enc": (), "threshold": (), "log_threshold": (), "b_gate": (), "r_mag": (), "b_mag": (),
    "scaling_factor": (), "topk_threshold": (),
}

_MLP_HOOK = re.compile(r"(?:^|\.)blocks\.(\d+)\.mlp\.hook_post$")
_HEAD_HOOKS = re.compile(r"(hook_z|hook_q|hook_k|hook_v|hook_pattern|hook_attn_scores|hook_result|mlp\.hook_pre"
                         r"|hook_pre_linear|hook_rot_q|hook_rot_k)$")


def space_for_hook(hook_name: str | None) -> str:
    """Gauge space of a TransformerLens-style hook: ``blocks.L.mlp.hook_post`` -> ``mlp.L``; residual otherwise.

    Head-space hooks (``hook_z``, ...) and pre-activation MLP hooks are refused: their coordinates are not
    permuted by a residual or MLP-unit gauge in the way this module assumes.
    """
    if not hook_name:
        return "residual"
    m = _MLP_HOOK.search(hook_name)
    if m:
        return f"mlp.{m.group(1)}"
    if _HEAD_HOOKS.search(hook_name):
        raise GaugeError(f"SAE hook {hook_name!r} reads attention-head or pre-activation coordinates; hf_gauge "
                         "transports SAEs on the residual stream or on MLP units (blocks.L.mlp.hook_post). "
                         "Pass space='residual' or space='mlp.<L>' if you know better.")
    return "residual"


def _check_norm(normalize: str | None, el, space: str) -> None:
    if normalize == "layer_norm" and el is not None:
        s = el.sign
        if not (bool(torch.all(s == 1)) or bool(torch.all(s == -1))):
            raise GaugeError(
                f"this SAE mean-centres its input (normalize_activations='layer_norm'), which is covariant only under "
                f"permutations and one global sign flip, but the gauge on {space!r} has {int((s < 0).sum())} of "
                f"{el.size} negative signs. Use an SAE without layer_norm normalisation, or a permutation gauge."
            )


def transport_sae_state(gauge, sd: Mapping[str, torch.Tensor], *, space: str = "residual",
                        space_out: str | None = None, normalize_activations: str | None = "none",
                        apply_b_dec_to_input: bool = True) -> dict[str, torch.Tensor]:
    """Move an SAELens-orientation state dict into the gauge's target chart (new tensors; bit-exact)."""
    space_out = space_out or space
    el_in, el_out = element(gauge, space), element(gauge, space_out)
    if space_out != space and apply_b_dec_to_input and "b_dec" in sd and (el_in is not None or el_out is not None):
        raise GaugeError(f"this SAE subtracts b_dec (output space {space_out!r}) from its input (space {space!r}); "
                         "input and output must share one gauge space")
    _check_norm(normalize_activations, el_in, space)
    if space_out != space:
        _check_norm(normalize_activations, el_out, space_out)
    if "W_enc" not in sd and "W_dec" not in sd:
        raise GaugeError(f"not an SAE state dict: it has neither W_enc nor W_dec (keys: {sorted(sd)[:8]})")
    from ..engine import move_tensor
    els = {"in": el_in, "out": el_out}
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if k not in SAE_RULES:
            raise GaugeError(f"SAE tensor {k!r} (shape {tuple(t.shape)}) is not one hf_gauge knows how to transport; "
                             f"known: {sorted(SAE_RULES)}")
        if not isinstance(t, torch.Tensor):
            raise GaugeError(f"SAE entry {k!r} must be a tensor, got {type(t).__name__}")
        moves: tuple[Move, ...] = ()
        for axis, which in SAE_RULES[k]:
            if t.dim() <= axis:
                raise GaugeError(f"SAE tensor {k!r} has shape {tuple(t.shape)}; expected at least {axis + 1} axes")
            moves += move_of(els[which], axis)
        try:
            out[k] = move_tensor(t.detach(), moves)
        except GaugeError as e:
            raise GaugeError(f"SAE tensor {k!r} (input space {space!r}, output space {space_out!r}): {e}") from None
    return out


def _record(gauge, space: str, space_out: str) -> dict[str, Any]:
    """The record kept in the SAE's ``cfg.json`` (published with the SAE): no local model paths."""
    rec = gauge_record(gauge, space=space, space_out=space_out)
    return {**rec, "source": shareable(rec["source"]), "target": shareable(rec["target"])}


def _is_sae(o: Any) -> bool:
    t = type(o)
    return isinstance(o, torch.nn.Module) and t.__module__.startswith("sae_lens") and hasattr(o, "cfg") \
        and hasattr(o, "W_dec")


def _meta(cfg: Any, key: str) -> Any:
    md = getattr(cfg, "metadata", None)
    try:
        v = md[key] if md is not None else None
    except (KeyError, TypeError):
        v = None
    return v if v is not None else getattr(cfg, key, None)


@register(_is_sae, "sae_lens.SAE")
def _sae_object(gauge, sae: Any, *, space: str | None = None, space_out: str | None = None, **_: Any) -> Any:
    """A new SAE of the same class and config (a copy) with moved weights; its ``cfg.metadata['hf_gauge']`` lists
    the gauges it was transported through."""
    cfg = sae.cfg
    space = space or space_for_hook(_meta(cfg, "hook_name"))
    if space_out is None:
        hook_out = _meta(cfg, "hook_name_out")
        space_out = space_for_hook(hook_out) if hook_out else space
    moved = transport_sae_state(gauge, sae.state_dict(), space=space, space_out=space_out,
                                normalize_activations=getattr(cfg, "normalize_activations", "none"),
                                apply_b_dec_to_input=getattr(cfg, "apply_b_dec_to_input", True))
    new = copy.deepcopy(sae)
    new.load_state_dict(moved)
    md = getattr(new.cfg, "metadata", None)
    if md is not None:
        hist = list(md["hf_gauge"] or []) if "hf_gauge" in md else []
        md["hf_gauge"] = hist + [_record(gauge, space, space_out)]
    return new


def is_sae_dict(o: Any) -> bool:
    return isinstance(o, Mapping) and bool(o) and all(isinstance(k, str) for k in o) \
        and ("W_enc" in o or "W_dec" in o) and all(isinstance(v, torch.Tensor) for v in o.values())


@register(is_sae_dict, "SAE state dict {W_enc, W_dec, b_enc, b_dec, ...}")
def _sae_dict(gauge, sd: Mapping[str, torch.Tensor], *, space: str = "residual", space_out: str | None = None,
              normalize_activations: str | None = "none", apply_b_dec_to_input: bool = True, **_: Any) -> dict:
    return transport_sae_state(gauge, sd, space=space, space_out=space_out,
                               normalize_activations=normalize_activations,
                               apply_b_dec_to_input=apply_b_dec_to_input)


def is_sae_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / SAE_CFG).is_file() and (path / SAE_WEIGHTS).is_file()


def transport_sae_folder(gauge, src: str | Path, out: str | Path, *, space: str | None = None,
                         space_out: str | None = None, **_: Any) -> Path:
    """SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) -> a new folder in the target chart (atomic).

    The new ``cfg.json`` records the gauge under ``metadata.hf_gauge`` (a list, one entry per transport);
    ``hf_gauge_transport.json`` holds the same record. Per-feature files (``sparsity.safetensors``) are copied.
    """
    from safetensors.torch import save_file
    src, out = Path(src), Path(out)
    if not is_sae_folder(src):
        raise GaugeError(f"{src} is not a SAELens folder (needs {SAE_CFG} and {SAE_WEIGHTS})")
    files = audit_folder(src)                       # links and special files, before anything is read
    cfg = read_json(src / SAE_CFG, str(src / SAE_CFG), "re-save the SAE with SAE.save_model")
    if not isinstance(cfg, dict):
        raise GaugeError(f"{src / SAE_CFG} must hold a JSON object (the SAE config), got a {type(cfg).__name__}")
    md = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for key in ("hook_name", "hook_name_out", "normalize_activations"):
        for v in (md.get(key), cfg.get(key)):
            if v is not None and not isinstance(v, str):
                raise GaugeError(f"{src / SAE_CFG}: {key} is a {type(v).__name__}, expected a string; the file is "
                                 "corrupt: re-save the SAE")
    for v in (md.get("hf_gauge"), cfg.get("hf_gauge")):
        if v is not None and not isinstance(v, list):
            raise GaugeError(f"{src / SAE_CFG}: hf_gauge is a {type(v).__name__}, expected a list of records")
    hook = md.get("hook_name") or cfg.get("hook_name")
    space = space or space_for_hook(hook)
    hook_out = md.get("hook_name_out") or cfg.get("hook_name_out")
    space_out = space_out or (space_for_hook(hook_out) if hook_out else space)
    sd, st_meta = read_safetensors(src / SAE_WEIGHTS, "re-save the SAE with SAE.save_model")
    moved = transport_sae_state(gauge, sd, space=space, space_out=space_out,
                                normalize_activations=cfg.get("normalize_activations", "none"),
                                apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True))
    rec = _record(gauge, space, space_out)
    if isinstance(cfg.get("metadata"), dict):
        cfg["metadata"]["hf_gauge"] = list(cfg["metadata"].get("hf_gauge") or []) + [rec]
    else:
        cfg["hf_gauge"] = list(cfg.get("hf_gauge") or []) + [rec]
    with atomic_dir(out, src) as tmp:
        copy_other_files(src, files, tmp, skip=(SAE_CFG, SAE_WEIGHTS), chart_free=SAE_CHART_FREE)
        save_file({k: v.contiguous() for k, v in moved.items()}, str(tmp / SAE_WEIGHTS), metadata=st_meta)
        (tmp / SAE_CFG).write_text(json.dumps(cfg))
        write_record(tmp, gauge, kind="sae", source_path=str(src), space=space, space_out=space_out)
    return out
