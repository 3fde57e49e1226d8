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


# keywords of ``model.transport(obj, to=other, ...)`` that configure the fit (``find_gauge`` / ``collect_pair_stats``)
FIT_KEYS = frozenset({"data", "method", "tokenizer", "batch_size", "progress", "low_confidence", "spaces",
                      "max_length", "layers", "include_embed", "include_final_norm", "stats_device", "shard",
                      "max_rows"})


def _same(a: Any, b: Any) -> bool:
    """Fit arguments match: the same object, or equal plain values (tensors and data iterables by identity)."""
    return a is b or (isinstance(a, (str, int, float, bool, tuple)) and type(a) is type(b) and a == b)


def _transport(self, obj, to=None, **kwargs: Any):
    """Move ``obj`` into ``to``'s chart, or through the last ``gauge_to`` result.

    With ``to``, the gauge is fitted with the fit keywords given (``FIT_KEYS``: ``data``, ``method``, ``spaces``, ...)
    and cached on this model for that target model and those keywords; other keywords go to ``gauge.transport``.
    """
    import weakref

    from .errors import GaugeError
    if to is not None:
        fit = {k: kwargs.pop(k) for k in list(kwargs) if k in FIT_KEYS}
        cache = self.__dict__.setdefault("_hf_gauge_cache", [])
        cache[:] = [e for e in cache if e[0]() is not None]            # forget targets that no longer exist
        gauge = next((g for ref, f, g in cache if ref() is to and f.keys() == fit.keys()
                      and all(_same(f[k], fit[k]) for k in f)), None)
        if gauge is None:
            gauge = _gauge_to(self, to, **fit)
            cache.append((weakref.ref(to), fit, gauge))
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


def _attach_methods(cls: type) -> None:
    for name, fn in METHODS.items():
        if not hasattr(cls, name):
            setattr(cls, name, fn)


PEFT_MODULE = "peft.peft_model"


def watched_modules() -> dict[str, str | None]:
    """Module -> model_type of every module defining a class that gets the methods (``None``: PEFT's)."""
    out: dict[str, str | None] = {f"transformers.models.{mt}.modeling_{mt}": mt for mt in SPECS}
    out[PEFT_MODULE] = None
    return out


def _attach_module(module: Any, model_type: str | None) -> None:
    """Attach to the class(es) ``module`` defines: the model_type's ``*ForCausalLM``, or PEFT's ``PeftModel``."""
    if model_type is None:
        cls = getattr(module, "PeftModel", None)
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        cls = getattr(module, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or "", None)
    if isinstance(cls, type):
        _attach_methods(cls)


class _AttachOnImport:
    """A ``sys.meta_path`` finder that lets the usual finders load a watched module, then attaches the methods to
    its class right after the module has executed (a post-import hook): importing hf_gauge imports neither torch
    nor transformers, yet every supported model class has the methods by the time a model can exist."""

    def __init__(self, modules: dict[str, str | None]) -> None:
        self.modules = dict(modules)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.modules:
            return None
        import sys
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        model_type, run = self.modules[fullname], loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _attach_module(module, model_type)

        loader.exec_module = exec_module          # this module's own loader instance
        return spec


def install() -> None:
    """Attach now to the watched modules already imported; attach to the others when they are imported."""
    import sys
    pending = {}
    for name, mt in watched_modules().items():
        mod = sys.modules.get(name)
        if mod is not None:
            _attach_module(mod, mt)
        else:
            pending[name] = mt
    if pending and not any(isinstance(f, _AttachOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AttachOnImport(pending))
