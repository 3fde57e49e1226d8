"""Live models: unwrap wrappers, describe charts, apply gauges in place, draw random gauges, name the group."""
from __future__ import annotations

import hashlib
import re
import warnings
from typing import Any, Iterable

import torch
from transformers.utils import logging

from .engine import Scratch, check_gauge, check_moves, move_tensor_, moves_for, space_sizes
from .configs import gauge_config
from .errors import GaugeError
from .gauge import Gauge
from .group import SignedPermutation
from .specs import SPECS, ArchSpec, get_spec

logger = logging.get_logger("hf_gauge")

__all__ = ["unwrap", "ModelView", "apply_gauge", "random_gauge", "symmetry_group", "describe", "fingerprint",
           "gauge_spaces", "quantization", "gain_fingerprint"]


def unwrap(model: Any) -> torch.nn.Module:
    """The transformers model under PEFT, torch.compile, DDP/accelerate wrappers.

    Where the spec's parameter names or config fields differ from the model's (base models such as ``LlamaModel``,
    ``LlamaForQuestionAnswering.transformer``, composite configs), a ``ModelView`` sharing every parameter.
    """
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod"):                  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model) and hasattr(model, "peft_config"):
            model = model.get_base_model()               # PeftModel -> the transformers model (LoRA layers inside)
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            break
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise GaugeError(f"expected a transformers model (or a PEFT/compiled wrapper of one), got {type(model).__name__}")
    spec = SPECS.get(getattr(model.config, "model_type", None))
    prefix = spec.sites.layers.split(".")[0] if spec is not None else ""
    renamed = bool(prefix) and "." in spec.sites.layers and not isinstance(getattr(model, prefix, None), torch.nn.Module)
    if renamed or gauge_config(model.config) is not model.config:
        # a base model, a head keeping its body under another name, or a composite (vision-language) config
        return ModelView(model, prefix if renamed else "")
    return model


class ModelView(torch.nn.Module):
    """A transformers model seen with its body under the spec's prefix (``model.layers.0...``) and its config
    through ``gauge_config`` (a composite vision-language config reads as its text model's).

    Base models (``LlamaModel``: ``layers.0...``) and heads that keep the body under another attribute
    (``LlamaForQuestionAnswering.transformer``) get the spec's parameter names and module paths this way; the
    head's other modules (``qa_outputs``) keep theirs. Shares every parameter and module (nothing is copied);
    ``forward`` goes to the model itself."""

    def __init__(self, model: torch.nn.Module, prefix: str) -> None:
        super().__init__()
        body = getattr(model, "base_model", model)
        if body is model and prefix:
            self.add_module(prefix, model)
        else:
            for name, child in model.named_children():
                self.add_module(prefix if prefix and child is body else name, child)
            for name, p in model.named_parameters(recurse=False):
                self.register_parameter(name, p)
        self.config = gauge_config(model.config)
        self.base_model_prefix = prefix or getattr(model, "base_model_prefix", "")
        object.__setattr__(self, "view_of", model)       # not a second registration of the same modules

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.view_of(*args, **kwargs)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.view_of.get_input_embeddings()


def gain_fingerprint(gain: torch.Tensor) -> str:
    """The chart fingerprint of a final-norm gain (``fingerprint`` of a model whose final norm has this gain)."""
    return hashlib.sha256(gain.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _offloaded_value(module: torch.nn.Module, name: str) -> torch.Tensor:
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
    m = unwrap(model)
    gain = _offloaded_value(m.get_submodule(get_spec(m).sites.final_norm), "weight")
    if gauge is not None and gauge.residual is not None:
        gain = gain.detach().cpu()[gauge.residual.perm]
    return gain_fingerprint(gain)


def describe(model: Any) -> dict[str, Any]:
    """Provenance of a model's chart, recorded in gauges as ``source`` / ``target``."""
    m = unwrap(model)
    cfg = m.config
    return {
        "model_id": getattr(cfg, "_name_or_path", "") or "",
        "revision": getattr(cfg, "_commit_hash", None),
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "fingerprint": fingerprint(m),
    }


def gauge_spaces(model: Any) -> dict[str, int]:
    """Every gauge space of the model and its size (``{"residual": d, "mlp.0": d_ff, "attn.0": n_heads, ...}``)."""
    m = unwrap(model)
    return space_sizes(get_spec(m), m.config)


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
        from .orthogonal import refuse_apply  # issue 3: explain why orthogonal maps / dense matrices are refused
        refuse_apply(gauge)
    m = unwrap(model)
    quant = quantization(model if isinstance(model, torch.nn.Module) else m)
    if quant is not None:
        raise GaugeError(f"this model is quantized ({quant}): a gauge moves float weights by index and would leave "
                         "packed/quantized weights in the old chart. Dequantize it first (e.g. model.dequantize()), "
                         "or apply the gauge to the float checkpoint (apply_gauge_to_checkpoint) and quantize the "
                         "result again")
    spec = get_spec(m)
    if gauge.source.get("model_type") not in (None, m.config.model_type):
        raise GaugeError(f"the gauge was fitted for model_type={gauge.source['model_type']!r} but this model is "
                         f"{m.config.model_type!r}")
    check_gauge(spec, m.config, gauge)
    params = dict(m.named_parameters())
    for n, p in params.items():
        if p.device.type == "meta":
            raise GaugeError(f"parameter {n!r} is on the meta device (offloaded); load the model fully before applying a "
                             "gauge, or gauge the checkpoint on disk without loading it: "
                             "hf_gauge.apply_gauge_to_checkpoint(src, gauge, out) or `hf-gauge apply`")
    want = gauge.source.get("fingerprint")
    if want:
        have = fingerprint(m)
        if have != want:
            msg = (f"the gauge expects a source chart with fingerprint {want} but this model's is {have}; "
                   "the model may be a fine-tune of the source (fine) or already gauged or another model")
            if strict:
                raise GaugeError(msg + " (strict=True refuses)")
            warnings.warn(msg, stacklevel=2)
    plan = moves_for(spec, m.config, gauge, params)
    for n, moves in plan.items():          # refuse before touching anything: never leave a half-gauged model
        try:
            check_moves(params[n], moves)
        except GaugeError as e:
            raise GaugeError(f"{n}: {e}") from None
    scratch = Scratch()
    for n, moves in plan.items():
        move_tensor_(params[n].data, moves, scratch)
    return model


def _residual_gains(m: torch.nn.Module, spec: ArchSpec) -> list[torch.Tensor]:
    out = []
    for n, p in m.named_parameters():
        axes = spec.match(n)
        if axes and len(axes) == 1 and axes[0].space == "residual" and not axes[0].signed and p.dim() == 1:
            out.append(p.detach())
    return out


def symmetry_group(model: Any, warn: bool = True) -> str:
    """``"B_d"`` (RMSNorm, generic gains), ``"O(d)"`` (RMSNorm, every residual gain constant), ``"S_d x {±1}"`` (LayerNorm)."""
    m = unwrap(model)
    spec = get_spec(m)
    if spec.norm == "layernorm":
        return "S_d x {±1}"
    gains = _residual_gains(m, spec)
    if gains and all(bool(torch.all(g == g[0])) for g in gains):
        if warn:
            warnings.warn("every residual RMSNorm gain is constant: any orthogonal map preserves this model's "
                          "function, so coordinates carry no privileged basis (group O(d))", stacklevel=2)
        return "O(d)"
    return "B_d"


def _random_heads(n_heads: int, n_kv: int, gen: torch.Generator) -> SignedPermutation:
    g = n_heads // n_kv
    groups = torch.randperm(n_kv, generator=gen)
    perm = torch.cat([grp * g + torch.randperm(g, generator=gen) for grp in groups.tolist()])
    return SignedPermutation(perm)


def random_gauge(model: Any, seed: int = 0, group: str = "signed",
                 spaces: Iterable[str] = ("residual",), positive_fraction: float | None = None) -> Gauge:
    """A reproducible random gauge of ``model``'s symmetry group.

    ``group="signed"`` draws from the full group (B_d on RMSNorm residuals; on LayerNorm, a permutation and one
    random global sign), ``"permutation"`` from S_d. ``spaces`` picks ``"residual"``, ``"mlp"``, ``"attn"``
    (every layer) or single spaces like ``"mlp.3"``.
    """
    if group not in ("signed", "permutation"):
        raise GaugeError(f"group must be 'signed' or 'permutation', got {group!r}")
    m = unwrap(model)
    spec = get_spec(m)
    sizes = space_sizes(spec, m.config)
    gen = torch.Generator().manual_seed(int(seed))
    wanted = [s for s in sizes if s in spaces or s.split(".")[0] in spaces]
    unknown = [s for s in spaces if s not in sizes and s not in ("mlp", "attn")]
    if unknown or not wanted:
        raise GaugeError(f"unknown gauge space(s) {unknown or list(spaces)}; this model has residual, mlp.<i>, attn.<i>")
    out: dict[str, SignedPermutation] = {}
    n_kv = getattr(m.config, "num_key_value_heads", None) or m.config.num_attention_heads
    for name in wanted:
        rule = spec.spaces[spec.space_template(name)[0]].signs
        if name.startswith("attn."):
            out[name] = _random_heads(sizes[name], n_kv, gen)
            continue
        signed = group == "signed" and rule != "none"
        el = SignedPermutation.random(sizes[name], gen, signed=signed and rule == "any",
                                      positive_fraction=positive_fraction if rule == "any" else None)
        if signed and rule == "global" and torch.rand((), generator=gen) < 0.5:
            el = SignedPermutation(el.perm, -torch.ones(el.size, dtype=torch.int64))
        out[name] = el
    g = Gauge(spaces=out, method=f"random(seed={seed}, group={group})")
    g.source = describe(m)
    g.target = {**g.source, "fingerprint": fingerprint(m, g)}
    return g
