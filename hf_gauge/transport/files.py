"""Path-level transport (used by the ``hf-gauge transport`` CLI): detect what a file or folder holds, write the
transported copy atomically, and refuse to overwrite the input or an existing non-empty output.

Detected kinds:
- SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) -> folder (``sae.transport_sae_folder``)
- PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) -> folder
- optimizer file (``.pt`` / ``.bin`` / ``.pth`` holding ``{'state', 'param_groups'}``) -> same-format file
- steering vectors: ``.safetensors`` whose tensors all have the residual width on their last axis, or a ``.pt``
  (loaded ``weights_only=True``) holding a tensor or a ``{layer: tensor}`` dict -> same-format file
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import GaugeError
from ..jsonio import read_json
from . import register
from ._io import atomic_file, check_out, gauge_record, read_safetensors
from .optim import is_optim_state, transport_optimizer_state
from .control_gguf import transport_control_gguf
from .peft_adapters import check_adapter_chart, is_adapter_folder, transport_adapter_folder
from .sae import is_sae_dict, is_sae_folder, transport_sae_folder, transport_sae_state
from .vectors import move_vector

TORCH_SUFFIXES = (".pt", ".bin", ".pth")


def detect(src: str | Path) -> str:
    """``"sae"``, ``"peft"``, ``"optimizer"``, ``"vectors"``, ``"control-gguf"`` or ``"vectors-torch"`` for a path (``GaugeError`` if unknown)."""
    src = Path(src)
    if not src.exists():
        raise GaugeError(f"{src} does not exist")
    if src.is_dir():
        if is_sae_folder(src):
            return "sae"
        if is_adapter_folder(src):
            return "peft"
        raise GaugeError(f"{src} is a folder but neither a SAELens SAE (cfg.json + sae_weights.safetensors) nor a "
                         "PEFT adapter (adapter_config.json + adapter_model.safetensors)")
    if src.suffix == ".safetensors":
        return "vectors"
    if src.suffix == ".gguf":
        return "control-gguf"
    if src.suffix in TORCH_SUFFIXES:
        obj = _load_torch(src)
        return "optimizer" if is_optim_state(obj) else "vectors-torch"
    raise GaugeError(f"don't know how to transport {src.name!r}: expected a SAELens or PEFT folder, an optimizer file "
                     f"({', '.join(TORCH_SUFFIXES)}), steering vectors (.safetensors / .pt) or a repeng control vector (.gguf)")


def _load_torch(src: Path) -> Any:
    try:
        return torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as e:
        raise GaugeError(f"{src}: cannot load with torch.load(weights_only=True) (hf_gauge never unpickles "
                         f"arbitrary objects): {e}") from None


def _move_named_vectors(gauge, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        try:
            out[k] = move_vector(gauge, v, what=f"tensor {k!r}")
        except GaugeError as e:
            raise GaugeError(f"{k}: {e}") from None
    return out


def _check_vector_record(gauge, src: Path, meta: dict[str, str]) -> None:
    """Refuse vectors already moved by this gauge, or already in its target chart (the ``hf_gauge`` record that
    every transport writes into the safetensors metadata, checked as an adapter folder's record is)."""
    if "hf_gauge" not in meta:
        return
    rec = read_json(meta["hf_gauge"].encode(), f"the hf_gauge metadata of {src}", "remove it from the file's "
                    "metadata or transport the original vectors")
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k, {}), dict) for k in ("source", "target")):
        raise GaugeError(f"the hf_gauge metadata of {src} is not a transport record; remove it from the file's "
                         "metadata or transport the original vectors")
    check_adapter_chart(gauge, src, None, rec, recorded_in="hf_gauge metadata")


def _transport_safetensors(gauge, src: Path, out: Path, **kw: Any) -> Path:
    from safetensors.torch import save_file
    tensors, meta = read_safetensors(src, "check the file is complete (re-save or re-download it) or give steering "
                                          "vectors as a .pt file")
    _check_vector_record(gauge, src, meta)
    if any("lora_" in k for k in tensors):
        raise GaugeError(f"{src} looks like PEFT adapter weights; transport the adapter folder (with its "
                         "adapter_config.json) instead")
    if is_sae_dict(tensors):
        moved = transport_sae_state(gauge, tensors, space=kw.get("space", "residual"), space_out=kw.get("space_out"),
                                    normalize_activations=kw.get("normalize_activations", "none"))
    else:
        moved = _move_named_vectors(gauge, tensors)
    meta["hf_gauge"] = json.dumps(gauge_record(gauge))
    with atomic_file(out, src) as tmp:
        save_file({k: v.contiguous() for k, v in moved.items()}, str(tmp), metadata=meta)
    return out


def _transport_torch_vectors(gauge, src: Path, out: Path) -> Path:
    obj = _load_torch(src)
    if isinstance(obj, torch.Tensor):
        moved: Any = move_vector(gauge, obj, what=f"tensor in {src.name}")
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        moved = {}
        for k, v in obj.items():
            try:
                moved[k] = move_vector(gauge, v, what=f"entry {k!r}")
            except GaugeError as e:
                raise GaugeError(f"{k}: {e}") from None
    else:
        raise GaugeError(f"{src} holds a {type(obj).__name__}; expected an optimizer state, a tensor [..., d] or a "
                         "{layer: tensor} dict")
    with atomic_file(out, src) as tmp:
        torch.save(moved, str(tmp))
    return out


def transport_path(gauge, src: str | Path, out: str | Path, **kw: Any) -> Path:
    """Transport the object stored at ``src`` into the gauge's target chart, writing it to ``out`` (atomically).

    Keyword arguments go to the specific handler (``model_type=``/``config=`` for adapters, ``model=``/
    ``param_names=`` for optimizer files, ``space=`` for SAEs). Returns ``out``.
    """
    src, out = Path(src), Path(out)
    kind = detect(src)
    check_out(src, out)
    if kind == "sae":
        return transport_sae_folder(gauge, src, out, **kw)
    if kind == "peft":
        return transport_adapter_folder(gauge, src, out, **kw)
    if kind == "optimizer":
        new = transport_optimizer_state(gauge, _load_torch(src), **kw)
        with atomic_file(out, src) as tmp:
            torch.save(new, str(tmp))
        return out
    if kind == "vectors":
        return _transport_safetensors(gauge, src, out, **kw)
    if kind == "control-gguf":
        return transport_control_gguf(gauge, src, out)
    return _transport_torch_vectors(gauge, src, out)


def _is_path(o: Any) -> bool:
    return isinstance(o, (str, os.PathLike)) and os.path.exists(os.fspath(o))


@register(_is_path, "a path (SAELens/PEFT folder, optimizer or vector file; needs out=)")
def _path(gauge, src: Any, *, out: str | Path | None = None, **kw: Any) -> Path:
    if out is None:
        raise GaugeError(f"transporting the path {src} needs out= (where to write the transported copy)")
    return transport_path(gauge, src, out, **kw)
