"""Attach gauge methods to the supported transformers ``*ForCausalLM`` classes (never swapping classes)."""
from __future__ import annotations

from typing import Any

from .specs import SPECS


def _apply_gauge(self, gauge, **kwargs: Any):
    """Apply ``gauge`` to this model in place (exact); returns the model. See ``hf_gauge.apply_gauge``."""
    from .models import apply_gauge
    return apply_gauge(self, gauge, **kwargs)


def _gauge_to(self, other, data=None, **kwargs: Any):
    """The gauge from this model's chart to ``other``'s (data-free by default). See ``hf_gauge.find_gauge``."""
    from .match import find_gauge
    gauge = find_gauge(self, other, data=data, **kwargs)
    self._hf_gauge_last = gauge
    return gauge


def _transport(self, obj, to=None, **kwargs: Any):
    """Move ``obj`` into ``to``'s chart (fitting and caching the gauge), or through the last ``gauge_to`` result."""
    from .errors import GaugeError
    if to is not None:
        cache = self.__dict__.setdefault("_hf_gauge_cache", {})
        key = id(to)
        if key not in cache:
            cache[key] = _gauge_to(self, to, **{k: kwargs.pop(k) for k in ("data", "method", "tokenizer") if k in kwargs})
        gauge = cache[key]
        self._hf_gauge_last = gauge
    else:
        gauge = getattr(self, "_hf_gauge_last", None)
        if gauge is None:
            raise GaugeError("no gauge to transport through: call model.gauge_to(other) first, or pass to=other_model")
    return gauge.transport(obj, **kwargs)


def _symmetry_group(self, **kwargs: Any) -> str:
    from .models import symmetry_group
    return symmetry_group(self, **kwargs)


METHODS = {"apply_gauge": _apply_gauge, "gauge_to": _gauge_to, "transport": _transport,
           "symmetry_group": _symmetry_group}


def attach() -> list[type]:
    """Add the methods to every importable ``*ForCausalLM`` class of a supported model_type; returns the classes."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    done = []
    for mt in SPECS:
        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt)
        cls = getattr(transformers, cls_name, None) if cls_name else None
        if cls is None:
            continue
        for name, fn in METHODS.items():
            if not hasattr(cls, name):
                setattr(cls, name, fn)
        done.append(cls)
    return done
