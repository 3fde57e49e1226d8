"""One view of a model: its config (the only reader of config attributes) and, resolved once per public call, the
module, spec, parameters and observation sites.

``ConfigView`` reads the text part of a config (``text_config`` of composite vision-language models: dimensions from
the text model, identity such as ``model_type`` from the composite) and computes head geometry once.
``unwrap(model)`` removes PEFT / compiled / DDP wrappers and, where the model names its decoder differently from the
spec (rules are written for ``*ForCausalLM``, whose decoder lives under ``model.``: a bare ``AutoModel`` lacks the
prefix, ``*ForQuestionAnswering`` keeps its body under ``transformer``) or has a composite config, returns a
``SpecNamedModel`` sharing every parameter under the spec's names. ``ModelView.of(model)`` resolves a model once
(module, spec, config view) and is passed down instead of re-resolving.
"""
from __future__ import annotations

import hashlib
import re
from functools import cache, cached_property
from typing import Any, Iterator

import torch

from .errors import GaugeError
from .specs import SPECS, ArchSpec, get_spec

__all__ = ["ConfigView", "JsonConfig", "ConfigAbsent", "ModelView", "SpecNamedModel", "spec_for", "unwrap",
           "resolve_name", "gain_fingerprint"]


# ----------------------------------------------------------------------------------------------------------------
# Names: live PEFT / wrapper parameter names -> (base parameter name, role)
# ----------------------------------------------------------------------------------------------------------------
_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)")
_ROLES: tuple[tuple[re.Pattern, str, str], ...] = (
    (re.compile(r"^(.*)\.lora_A(?:\.[^.]+)?\.weight$"), "lora_A", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_B(?:\.[^.]+)?\.weight$"), "lora_B", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_B(?:\.[^.]+)?\.bias$"), "lora_B_bias", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_embedding_A(?:\.[^.]+)?$"), "lora_emb_A", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_embedding_B(?:\.[^.]+)?$"), "lora_emb_B", r"\1.weight"),
    (re.compile(r"^(.*)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"), "magnitude", r"\1.weight"),
    # PEFT trainable_token_indices: ``trainable_tokens_delta [n_tokens, d]`` holds rows of the wrapped embedding
    # (or lm_head), so it moves exactly like that weight (residual columns signed-permuted).
    (re.compile(r"^(.*)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$"), "weight", r"\1.weight"),
)
_WRAPPERS = (re.compile(r"\.token_adapter\.base_layer\."),        # PEFT TrainableTokensWrapper's embedding
             re.compile(r"(?:\.base_layer)+\."),                      # nested: LoRA on two params of one module
             re.compile(r"\.modules_to_save\.[^.]+\."),
             re.compile(r"\.modules_to_save\."), re.compile(r"\.original_module\."))


def resolve_name(name: str) -> tuple[str, str]:
    """``'...q_proj.lora_A.default.weight'`` -> ``('...q_proj.weight', 'lora_A')``; plain names get role ``'weight'``."""
    name = _PEFT_PREFIX.sub("", name)
    for rx in _WRAPPERS:
        name = rx.sub(".", name)
    for rx, role, repl in _ROLES:
        if rx.match(name):
            return rx.sub(repl, name), role
    return name, "weight"


class ConfigAbsent(Exception):
    """A ``JsonConfig`` lacks an attribute that transformers' config class would fill with a default: read the
    config with ``AutoConfig`` instead."""


class JsonConfig:
    """A model's ``config.json`` read as stored, without importing transformers' config classes (about 1 s in a
    fresh process). Only values the file holds are returned: asking for any other attribute raises
    ``ConfigAbsent`` (not ``AttributeError``, so ``getattr(c, name, default)`` cannot swallow it), except the ones
    a transformers config lacks too unless they are set (``text_config``, ``quantization_config``,
    ``get_text_config``). Nested objects (``text_config``) are ``JsonConfig`` too."""

    OPTIONAL = frozenset({"text_config", "quantization_config", "get_text_config"})

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    @classmethod
    def read(cls, path: Any) -> "JsonConfig | None":
        """The config at ``path``, or ``None`` where it is not a JSON object naming a ``model_type``."""
        import json

        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
            return None
        return cls(values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_values":
            raise AttributeError(name)
        if name not in self._values:
            if name in self.OPTIONAL:
                raise AttributeError(name)
            raise ConfigAbsent(name)
        v = self._values[name]
        return JsonConfig(v) if isinstance(v, dict) and name == "text_config" else v


class ConfigView:
    """Read-only view of a transformers config's text part; unknown attributes fall through to it."""

    def __init__(self, config: Any, model_type: str | None = None) -> None:
        if isinstance(config, ConfigView):
            config = config.raw
        self.raw = config
        self._model_type = model_type
        text = None
        get_text = getattr(config, "get_text_config", None)
        if callable(get_text):
            try:
                text = get_text(decoder=True)
            except TypeError:
                text = get_text()
        if text is None and config is not None:
            text = getattr(config, "text_config", None) or config
        self.text = text

    @classmethod
    def of(cls, config: Any) -> "ConfigView":
        return config if isinstance(config, ConfigView) else cls(config)

    def __getattr__(self, name: str) -> Any:
        if name in ("raw", "text", "_model_type") or name.startswith("__"):
            raise AttributeError(name)
        if self.text is None:
            raise GaugeError(f"this needs the model's config ({name}); pass config= (the base model's config) or "
                             "model=")
        if hasattr(self.text, name):
            return getattr(self.text, name)
        return getattr(self.raw, name)

    def get(self, name: str, default: Any = None) -> Any:
        v = getattr(self.text, name, None) if self.text is not None else None
        return default if v is None else v

    @property
    def known(self) -> bool:
        """False for the stand-in of an unknown config (only the model type is known)."""
        return self.text is not None

    @property
    def model_type(self) -> str | None:
        return (getattr(self.raw, "model_type", None) or getattr(self.text, "model_type", None)
                or self._model_type)

    @cached_property
    def hidden(self) -> int:
        return int(self.hidden_size)

    @cached_property
    def n_layers(self) -> int:
        return int(self.num_hidden_layers)

    @cached_property
    def n_heads(self) -> int:
        return int(self.num_attention_heads)

    @cached_property
    def n_kv_heads(self) -> int:
        return int(self.get("num_key_value_heads") or self.n_heads)

    @cached_property
    def head_dim(self) -> int:
        return int(self.get("head_dim") or self.hidden // self.n_heads)

    @cached_property
    def intermediate(self) -> int:
        return int(self.intermediate_size)


_UNSET = object()


@cache
def _class_default(model_type: str | None, field: str) -> Any:
    """The value the transformers config class of ``model_type`` gives ``field`` when a config omits it (its text
    config for a composite model); None when the class has no such field or transformers has no such model type."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return None
    try:
        view = ConfigView(CONFIG_MAPPING[model_type]())
    except Exception:                          # a config class that cannot be built bare: no default known
        return None
    return getattr(view.text, field, None)


def spec_for(config: Any, spec: ArchSpec | None = None) -> ArchSpec:
    """The spec of ``config`` (``spec``, or the one registered for its model type) after checking the config
    against the spec's ``requires``, then resolved to the spec's ``variant`` for this config's layout: every path
    that has a config (live models through ``ModelView``, checkpoint folders, transported objects) resolves its spec
    here. Fields are read through ``ConfigView`` (a composite config reads its text config); a field the config
    omits takes its transformers class default. ``GaugeError`` names the field, its value and what the spec
    supports."""
    cfg = ConfigView.of(config)
    spec = spec or get_spec(cfg.model_type)
    if not cfg.known:
        return spec

    def read(field: str) -> Any:
        value = getattr(cfg.text, field, _UNSET)
        return _class_default(cfg.model_type, field) if value is _UNSET else value

    reason = spec.refusal(read, cfg.model_type) if spec.requires else None
    if reason is not None:
        raise GaugeError(reason)
    return spec.variant(cfg) if spec.variant is not None else spec


def gain_fingerprint(gain: torch.Tensor) -> str:
    """The chart fingerprint of a final-norm gain (``fingerprint`` of a model whose final norm has this gain)."""
    return hashlib.sha256(gain.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def unwrap(model: Any) -> torch.nn.Module:
    """The transformers model under PEFT, torch.compile, DDP/accelerate wrappers."""
    if isinstance(model, ModelView):
        return model.module
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
    if isinstance(model, SpecNamedModel):
        return model
    spec = SPECS.get(getattr(model.config, "model_type", None))
    prefix = spec.sites.layers.split(".")[0] if spec is not None else ""
    renamed = bool(prefix) and "." in spec.sites.layers and not isinstance(getattr(model, prefix, None), torch.nn.Module)
    if renamed or ConfigView(model.config).text is not model.config:
        # a base model, a head keeping its body under another name, or a composite (vision-language) config
        return SpecNamedModel(model, prefix if renamed else "")
    return model


class SpecNamedModel(torch.nn.Module):
    """A transformers model seen with its body under the spec's prefix (``model.layers.0...``) and its config
    through ``ConfigView`` (a composite vision-language config reads as its text model's).

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
        self.config = ConfigView(model.config)
        self.base_model_prefix = prefix or getattr(model, "base_model_prefix", "")
        object.__setattr__(self, "view_of", model)       # not a second registration of the same modules

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.view_of(*args, **kwargs)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.view_of.get_input_embeddings()


class ModelView:
    """A model resolved once: ``module``, ``spec``, ``config`` (a ``ConfigView``) and the name mapping."""

    def __init__(self, module: torch.nn.Module, spec: ArchSpec | None = None) -> None:
        self.module = module                       # parameter and module names are the spec's (see ``unwrap``)
        self.config = ConfigView(module.config)
        self.spec = spec_for(self.config, spec)

    @classmethod
    def of(cls, model: Any) -> "ModelView":
        if isinstance(model, ModelView):
            return model
        return cls(unwrap(model))

    # ---------------------------------------------------------------- names
    def submodule(self, spec_path: str) -> torch.nn.Module:
        return self.module.get_submodule(spec_path)

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(spec name, parameter)`` for every parameter (tied tensors once), then every persistent buffer that a
        rule of the spec moves: model state that is not a parameter but lives in a gauge space (GLM-4-MoE's router
        ``e_score_correction_bias`` buffer moves with the experts; checkpoint files store it like a parameter)."""
        yield from self.module.named_parameters()
        for prefix, mod in self.module.named_modules():
            skip = getattr(mod, "_non_persistent_buffers_set", set())
            for bn, buf in mod.named_buffers(recurse=False):
                name = f"{prefix}.{bn}" if prefix else bn
                if bn not in skip and self.spec.match(name):
                    yield name, buf

    def params(self) -> dict[str, torch.Tensor]:
        """The chart's detached parameters (tied tensors once) under plain spec names: a PEFT-wrapped base layer is
        keyed like the unwrapped one; LoRA factors and DoRA magnitudes (not part of the chart) are left out."""
        out = {}
        for n, p in self.named_parameters():
            name, role = resolve_name(n)
            if role == "weight":
                out[name] = p.detach()
        return out

    @property
    def final_norm_weight(self) -> torch.Tensor:
        return self.submodule(self.spec.sites.final_norm).weight

    def space_sizes(self) -> dict[str, int]:
        return self.spec.space_sizes(self.config)
