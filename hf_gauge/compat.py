"""Compatibility with ecosystem packages that lag behind their dependencies.

repeng 0.4.0 (the newest release) annotates ``ControlVector.__mul__`` with ``np.float_``, which NumPy 2 removed, so
``import repeng`` raises ``AttributeError`` under NumPy 2. The annotation is only evaluated once, at import time:
:func:`import_repeng` imports repeng with ``np.float_`` aliased to ``np.float64`` for that moment and removes the
alias again, so NumPy itself is left as it was. Use ``repeng = hf_gauge.compat.import_repeng()`` (or import repeng
after calling it once: the module stays imported).
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

import numpy as np

from .errors import GaugeError

__all__ = ["import_repeng"]


def import_repeng() -> ModuleType:
    """``repeng``, importable under NumPy 1 and 2 (see the module docstring); ``GaugeError`` when not installed."""
    if "repeng" in sys.modules and hasattr(sys.modules["repeng"], "ControlVector"):
        return sys.modules["repeng"]
    for k in [k for k in sys.modules if k == "repeng" or k.startswith("repeng.")]:
        del sys.modules[k]                      # a half-imported module from an earlier failed import
    had = hasattr(np, "float_")
    if not had:
        np.float_ = np.float64                  # type: ignore[attr-defined]
    try:
        return importlib.import_module("repeng")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "repeng":
            raise GaugeError("repeng is not installed: pip install repeng") from None
        raise
    finally:
        if not had:
            del np.float_                       # type: ignore[attr-defined]
