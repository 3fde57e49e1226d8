"""Transport of coordinate-indexed objects into a gauge's target chart.

``transport(gauge, obj)`` dispatches on the object's type through a registry of handlers; each returns a new
object and never mutates its input. Handlers register with ``@register(predicate)``; later registrations are
tried first, so specific types win over the generic tensor rule.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import GaugeError

Handler = Callable[..., Any]
_HANDLERS: list[tuple[Callable[[Any], bool], Handler, str]] = []


def register(predicate: Callable[[Any], bool], name: str | None = None) -> Callable[[Handler], Handler]:
    """Register ``fn(gauge, obj, **kw)`` for objects where ``predicate(obj)`` is true."""
    def deco(fn: Handler) -> Handler:
        _HANDLERS.insert(0, (predicate, fn, name or fn.__name__))
        return fn
    return deco


def transport(gauge, obj: Any, **kwargs: Any) -> Any:
    """Move ``obj`` from the gauge's source chart to its target chart (a new object)."""
    _load_handlers()
    for pred, fn, _ in _HANDLERS:
        try:
            ok = pred(obj)
        except Exception:  # a predicate that cannot judge an object does not claim it
            ok = False
        if ok:
            return fn(gauge, obj, **kwargs)
    raise GaugeError(
        f"don't know how to transport an object of type {type(obj).__module__}.{type(obj).__qualname__}; supported: "
        + ", ".join(sorted({n for _, _, n in _HANDLERS}))
    )


_LOADED = False


def _load_handlers() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
