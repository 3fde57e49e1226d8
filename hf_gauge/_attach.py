"""Attach gauge methods to transformers' shared model base class ``PreTrainedModel`` (never swapping classes).

Every transformers model (``AutoModel`` bodies, ``*ForCausalLM``, ``*ForSequenceClassification``,
``*ForTokenClassification``, ``*ForQuestionAnswering``, ...) inherits ``apply_gauge``, ``gauge_to``, ``transport``
and ``symmetry_group``. Each method first checks that a spec covers the model's ``model_type`` and otherwise raises
``GaugeError`` naming it and the supported ones.
"""
from __future__ import annotations

from typing import Any

from .specs import get_spec


def _supported(model) -> None:
    """``GaugeError`` naming the model_type and the supported ones unless a spec covers ``model``."""
    from .models import unwrap
    get_spec(unwrap(model))


def _apply_gauge(self, gauge, **kwargs: Any):
    """Apply ``gauge`` to this model in place (exact); returns the model. See ``hf_gauge.apply_gauge``."""
    from .models import apply_gauge
    _supported(self)
    return apply_gauge(self, gauge, **kwargs)


def _gauge_to(self, other, data=None, **kwargs: Any):
    """The gauge from this model's chart to ``other``'s (data-free by default). See ``hf_gauge.find_gauge``."""
    from .match import find_gauge
    _supported(self)
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
    _supported(self)
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
    _supported(self)
    return symmetry_group(self, **kwargs)


METHODS = {"apply_gauge": _apply_gauge, "gauge_to": _gauge_to, "transport": _transport,
           "symmetry_group": _symmetry_group}


def _attach_methods(cls: type) -> None:
    for name, fn in METHODS.items():
        if not hasattr(cls, name):
            setattr(cls, name, fn)


def watched_modules() -> dict[str, str]:
    """Module -> the class it defines that gets the methods: transformers' shared base ``PreTrainedModel``
    (inherited by every model class, supported or not: the methods check support) and PEFT's ``PeftModel`` (whose
    attribute forwarding would otherwise bind them to the wrapped model, so ``peft_model.apply_gauge(g)`` returned
    the inner model)."""
    return {"transformers.modeling_utils": "PreTrainedModel", "peft.peft_model": "PeftModel"}


def _attach_module(module: Any, cls_name: str) -> None:
    """Attach to the class ``cls_name`` that ``module`` defines."""
    cls = getattr(module, cls_name, None)
    if isinstance(cls, type):
        _attach_methods(cls)


class _AttachOnImport:
    """A ``sys.meta_path`` finder that lets the usual finders load a watched module, then attaches the methods to
    its class right after the module has executed (a post-import hook): importing hf_gauge imports neither torch
    nor transformers, yet every supported model class has the methods by the time a model can exist."""

    def __init__(self, modules: dict[str, str]) -> None:
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
        cls_name, run = self.modules[fullname], loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _attach_module(module, cls_name)

        loader.exec_module = exec_module          # this module's own loader instance
        return spec


def install() -> None:
    """Attach now to the watched modules already imported; attach to the others when they are imported."""
    import sys
    pending = {}
    for name, cls_name in watched_modules().items():
        mod = sys.modules.get(name)
        if mod is not None:
            _attach_module(mod, cls_name)
        else:
            pending[name] = cls_name
    if pending and not any(isinstance(f, _AttachOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AttachOnImport(pending))
