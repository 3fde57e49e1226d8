"""Live models: unwrap wrappers, describe charts, apply gauges in place, draw random gauges, name the group."""
from __future__ import annotations

import re
import warnings
from typing import Any, Iterable

import torch
from transformers.utils import logging

from . import hub  # noqa: F401  (attaches Gauge.save_pretrained / from_pretrained / push_to_hub: every gauge made here)
from .engine import check_gauge, check_moves, move_tensors_, moves_for, prepare_kernels, source_names
from .errors import GaugeError
from .gauge import Gauge
from .group import SignedPermutation
from .kinds import get_kind
from .modelref import model_ref
from .orthogonal import refuse_apply
from .view import ModelView, gain_fingerprint, unwrap

logger = logging.get_logger("hf_gauge")

__all__ = ["unwrap", "apply_gauge", "random_gauge", "symmetry_group", "describe", "fingerprint", "gauge_spaces",
           "gain_fingerprint", "quantization"]


def offloaded_value(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The value of ``module.<name>`` where accelerate keeps it when the parameter is offloaded (on the meta device:
    the ``weights_map`` of the module's ``AlignDevicesHook``, backed by the offload folder or the checkpoint)."""
    t = getattr(module, name)
    if t.device.type != "meta":
        return t.detach()
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:
        weights = getattr(h, "weights_map", None)
        if weights is not None and name in weights:
            return weights[name].detach()
    raise GaugeError(f"{type(module).__name__}.{name} is on the meta device and no accelerate hook holds its value; "
                     "load the model with its weights (device_map/offload_folder) before fingerprinting it")


def fingerprint(model: torch.nn.Module, gauge: Gauge | None = None) -> str:
    """A short hash of the model's chart: its final norm gain (exact, permuted by any gauge, never signed).

    With ``gauge``, the fingerprint the model will have after ``apply_gauge(model, gauge)``. Offloaded (accelerate
    ``device_map`` with ``"disk"``/``"cpu"`` offload) gains are read from where accelerate keeps them.
    """
    v = ModelView.of(model)
    gain = offloaded_value(v.submodule(v.spec.sites.final_norm), "weight")
    if gauge is not None and gauge.residual is not None:
        gain = gain.cpu()[gauge.residual.perm]
    return gain_fingerprint(gain)


def describe(model: Any) -> dict[str, Any]:
    """Provenance of a model's chart, recorded in gauges as ``source`` / ``target`` (``model_id``: its Hub id where
    one can be known, else the absolute path of its folder: ``modelref.model_ref``)."""
    v = ModelView.of(model)
    cfg = v.config
    model_id, revision = model_ref(getattr(cfg.raw, "_name_or_path", "") or "", getattr(cfg.raw, "_commit_hash", None))
    return {
        "model_id": model_id,
        "revision": revision,
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "fingerprint": fingerprint(v),
    }


def gauge_spaces(model: Any) -> dict[str, int]:
    """Every gauge space of the model and its size (``{"residual": d, "mlp.0": d_ff, "attn.0": n_heads, ...}``)."""
    return ModelView.of(model).space_sizes()


_QUANT_MODULES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized", "bitsandbytes",
                  "auto_gptq", "gptqmodel", "awq", "optimum.quanto", "hqq", "torchao", "compressed_tensors")
_QUANT_CLASSES = re.compile(r"Linear8bitLt|Linear4bit|Params4bit|Int8Params|QuantLinear|WQLinear|HQQLinear|"
                            r"QLinear|FP8Linear|MarlinLinear|ExllamaLinear|Quantized")


def quantization(model: torch.nn.Module) -> str | None:
    """What quantizes ``model`` (``None`` for a float model): a ``quantization_config``/``hf_quantizer``, a module
    or parameter class of a quantization library, or packed non-float weights (``qweight``, quantized tensors)."""
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if cfg is not None or getattr(model, "hf_quantizer", None) is not None:
        method = cfg.get("quant_method") if isinstance(cfg, dict) else getattr(cfg, "quant_method", None)
        return f"{getattr(method, 'value', method) or 'unknown method'} (config.quantization_config)"
    for name, mod in model.named_modules():
        t = type(mod)
        if t.__module__.startswith(_QUANT_MODULES) or _QUANT_CLASSES.search(t.__name__):
            return f"{t.__module__}.{t.__name__} at {name or 'the top level'}"
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        t = type(p)
        if _QUANT_CLASSES.search(t.__name__) or p.is_quantized:
            return f"{t.__name__} {name}"
        if not (p.is_floating_point() or p.is_complex()) and name.rsplit(".", 1)[-1] in (
                "weight", "qweight", "qzeros", "g_idx", "weight_packed", "weight_scale", "SCB"):
            return f"packed {p.dtype} weight {name}"
    return None


@torch.no_grad()
def apply_gauge(model: Any, gauge: Gauge, *, strict: bool = False) -> Any:
    """Move every parameter of ``model`` into the gauge's target chart, in place; returns ``model``.

    Parameters keep their storage (views, tied weights and optimizer references stay valid). Exact (index
    operations only), works through PEFT wrappers (LoRA factors move with their modules) and on
    models spread over several devices. ``strict=True`` refuses a gauge whose recorded source fingerprint differs
    from the model's (otherwise that only warns: a fine-tune of the source is a legitimate target).
    """
    if not isinstance(gauge, Gauge):
        refuse_apply(gauge)            # explains why orthogonal maps / dense matrices are refused
    v = ModelView.of(model)
    quant = quantization(model if isinstance(model, torch.nn.Module) else v.module)
    if quant is not None:
        raise GaugeError(f"this model is quantized ({quant}): a gauge moves float weights by index and would leave "
                         "packed/quantized weights in the old chart. Dequantize it first (e.g. model.dequantize()), "
                         "or apply the gauge to the float checkpoint (apply_gauge_to_checkpoint) and quantize the "
                         "result again")
    spec, cfg = v.spec, v.config
    if gauge.source.get("model_type") not in (None, cfg.model_type):
        raise GaugeError(f"the gauge was fitted for model_type={gauge.source['model_type']!r} but this model is "
                         f"{cfg.model_type!r}")
    check_gauge(spec, cfg, gauge)
    params = dict(v.named_parameters())
    for n, p in params.items():
        if p.device.type == "meta":
            raise GaugeError(f"parameter {n!r} is on the meta device (offloaded); load the model fully before applying a "
                             "gauge, or gauge the checkpoint on disk without loading it: "
                             "hf_gauge.apply_gauge_to_checkpoint(src, gauge, out) or `hf-gauge apply`")
    want = gauge.source.get("fingerprint")
    if want:
        have = fingerprint(v)
        if have != want:
            msg = (f"the gauge expects a source chart with fingerprint {want} but this model's is {have}; "
                   "the model may be a fine-tune of the source (fine) or already gauged or another model")
            if strict:
                raise GaugeError(msg + " (strict=True refuses)")
            warnings.warn(msg, stacklevel=2)
    plan = moves_for(spec, cfg, gauge, params)
    for n, moves in plan.items():          # refuse before touching anything: never leave a half-gauged model
        try:
            check_moves(params[n], moves)
        except GaugeError as e:
            raise GaugeError(f"{n}: {e}") from None
    renamed = source_names(spec, gauge, params, config=cfg)       # one module per head: tensors change places
    prepare_kernels(sum(params[n].numel() for n in plan))
    move_tensors_((params[n].data, moves) for n, moves in plan.items())
    held = {src: params[src].detach().clone() for src in set(renamed.values())}
    with torch.no_grad():
        for n, src in renamed.items():
            params[n].copy_(held[src])
    return model


def _residual_gains(v: ModelView) -> list[torch.Tensor]:
    out = []
    for n, p in v.named_parameters():
        axes = v.spec.match(n)
        if axes and len(axes) == 1 and axes[0].space == "residual" and not axes[0].signed and p.dim() == 1:
            out.append(p.detach())
    return out


def symmetry_group(model: Any, warn: bool = True) -> str:
    """``"B_d"`` (RMSNorm, generic gains), ``"O(d)"`` (RMSNorm, every residual gain constant), ``"S_d x {±1}"`` (LayerNorm)."""
    v = ModelView.of(model)
    if v.spec.norm == "layernorm":
        return "S_d x {±1}"
    gains = _residual_gains(v)
    if gains and all(bool(torch.all(g == g[0])) for g in gains):
        if warn:
            warnings.warn("every residual RMSNorm gain is constant: any orthogonal map preserves this model's "
                          "function, so coordinates carry no privileged basis (group O(d))", stacklevel=2)
        return "O(d)"
    return "B_d"


def random_gauge(model: Any, seed: int = 0, group: str = "signed",
                 spaces: Iterable[str] = ("residual",), positive_fraction: float | None = None) -> Gauge:
    """A reproducible random gauge of ``model``'s symmetry group.

    ``group="signed"`` draws from the full group (B_d on RMSNorm residuals; on LayerNorm, a permutation and one
    random global sign), ``"permutation"`` from S_d. ``spaces`` (``"all"`` for every space) picks concrete spaces (``"residual"``,
    ``"mlp.3"``) or every space of a template's family by its first name part (``"mlp"``, ``"attn"``).
    """
    if group not in ("signed", "permutation"):
        raise GaugeError(f"group must be 'signed' or 'permutation', got {group!r}")
    v = ModelView.of(model)
    spec, cfg = v.spec, v.config
    sizes = v.space_sizes()
    wanted = select_spaces(spec, sizes, spaces)
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, SignedPermutation] = {}
    for name in wanted:
        sp = spec.space(name)
        out[name] = get_kind(sp.kind).random(sizes[name], sp.signs, group, gen, positive_fraction, cfg)
    g = Gauge(spaces=out, method=f"random(seed={seed}, group={group})")
    g.source = describe(v)
    g.target = {**g.source, "fingerprint": fingerprint(v, g)}
    return g


def select_spaces(spec, sizes: dict[str, int], spaces: Iterable[str]) -> list[str]:
    """Concrete spaces selected by ``spaces``: names (``"mlp.3"``) or families (``"mlp"``: every space whose
    template starts with ``mlp.``), or ``"all"``; ``GaugeError`` for a selector that selects nothing."""
    spaces = (spaces,) if isinstance(spaces, str) else tuple(spaces)
    fams = {t.split(".")[0] for t in spec.spaces}
    if spaces == ("all",):
        return list(sizes)
    unknown = [s for s in spaces if s not in sizes and s not in fams]
    wanted = [s for s in sizes if s in spaces or s.split(".")[0] in spaces]
    if unknown or not wanted:
        raise GaugeError(f"unknown gauge space(s) {unknown or list(spaces)}; this model has "
                         f"{', '.join(spec.spaces)} (select by template family: {', '.join(sorted(fams))})")
    return wanted
