"""One view of a model: its config (the only reader of config attributes) and, resolved once per public call, the
module, spec, parameter names and observation sites.

``ConfigView`` reads the text part of a config (``text_config`` of multimodal models) and computes head geometry
once. ``ModelView.of(model)`` unwraps PEFT / compiled / DDP wrappers, finds the spec, and maps live parameter and
module names to the spec's names: rules are written for ``*ForCausalLM``, whose decoder lives under
``base_model_prefix`` (``model.``); a bare base model (``AutoModel``) has the same tensors without that prefix, and
other heads (``*ForSequenceClassification``) keep it.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, Iterator

import torch

from .errors import GaugeError
from .specs import ArchSpec, get_spec

__all__ = ["ConfigView", "ModelView", "unwrap"]


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
    return model


class ModelView:
    """A model resolved once: ``module``, ``spec``, ``config`` (a ``ConfigView``) and the name mapping."""

    def __init__(self, module: torch.nn.Module, spec: ArchSpec | None = None) -> None:
        self.module = module
        self.config = ConfigView(module.config)
        self.spec = spec or get_spec(self.config.model_type)
        prefix = getattr(module, "base_model_prefix", "") or ""
        first = self.spec.sites.layers.split(".")[0]
        # a bare base model: the spec's decoder prefix ("model.") is missing from every name
        bare = bool(prefix) and first == prefix and not isinstance(getattr(module, prefix, None), torch.nn.Module)
        self.prefix = prefix + "." if bare else ""

    @classmethod
    def of(cls, model: Any) -> "ModelView":
        if isinstance(model, ModelView):
            return model
        return cls(unwrap(model))

    # ---------------------------------------------------------------- names
    def spec_name(self, live: str) -> str:
        """A live parameter / module name as the spec writes it."""
        return self.prefix + live if self.prefix else live

    def live_name(self, spec_name: str) -> str:
        """A spec module path (a site) as this model names it."""
        if self.prefix and spec_name.startswith(self.prefix):
            return spec_name[len(self.prefix):]
        return spec_name

    def submodule(self, spec_path: str) -> torch.nn.Module:
        return self.module.get_submodule(self.live_name(spec_path))

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(spec name, parameter)`` for every parameter (tied tensors once)."""
        for n, p in self.module.named_parameters():
            yield self.spec_name(n), p

    def params(self) -> dict[str, torch.Tensor]:
        """Detached parameters keyed by spec name."""
        return {n: p.detach() for n, p in self.named_parameters()}

    @property
    def final_norm_weight(self) -> torch.Tensor:
        return self.submodule(self.spec.sites.final_norm).weight

    def space_sizes(self) -> dict[str, int]:
        return self.spec.space_sizes(self.config)
