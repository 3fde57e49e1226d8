"""hf_gauge: find, apply and transport residual-stream gauges between checkpoints of transformers models.

Importing this package attaches ``apply_gauge``, ``gauge_to``, ``transport`` and ``symmetry_group`` to
``transformers.PreTrainedModel`` and to PEFT's ``PeftModel``: every model class of a supported model_type
(``supported_model_types()``) uses them; on any other model they raise ``GaugeError``. They are attached at once
when those classes are already imported, otherwise as their modules are imported (``_attach.install``). The public
names below are loaded on first use (PEP 562), so ``import hf_gauge`` and ``hf-gauge --help`` import neither torch
nor transformers.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from ._attach import install
from .errors import GaugeError
from .version import __version__

install()

# public name -> the module defining it
_EXPORTS = {
    "Gauge": "hub", "SignedPermutation": "group",      # hub: the Gauge class with its persistence methods attached
    "apply_gauge": "models", "describe": "models", "fingerprint": "models", "gauge_spaces": "models",
    "random_gauge": "models", "symmetry_group": "models", "unwrap": "models",
    "get_spec": "specs", "supported_model_types": "specs",
    # matching
    "find_gauge": "filefind", "match_correlation": "match", "OrthogonalMap": "orthogonal", "compose_path": "path",
    "PairStats": "stats", "collect_pair_stats": "stats",
    # transport
    "merge": "merge", "IndexSet": "objects", "Attribution": "objects", "transport_path": "transport.files",
    "transport_peft_model": "transport.peft_adapters", "load_adapter": "transport.peft_load",
    # hub / checkpoint / verify
    "save_gauge": "hub", "load_gauge": "hub", "push_gauge": "hub", "list_gauges": "hub", "GaugeConfig": "gauge_config",
    "apply_gauge_to_checkpoint": "checkpoint", "verify": "verify",
    # inner spaces / canonical / audit
    "InnerMatch": "inner", "match_inner": "inner", "find_full_gauge": "match", "canonical_gauge": "canonical",
    "canonicalize": "canonical", "canonical_stability": "canonical", "AuditReport": "audit", "audit": "audit",
}

# submodules reachable as attributes without an explicit import (``hf_gauge.compat.import_repeng()``)
_SUBMODULES = ("compat",)

__all__ = ["GaugeError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'hf_gauge' has no attribute {name!r}")
    importlib.import_module(".hub", __name__)      # attaches Gauge.save_pretrained / from_pretrained / push_to_hub
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


class _Package(types.ModuleType):
    """Keeps ``hf_gauge.merge`` / ``.verify`` / ``.audit`` the exported functions when their submodules (of the same
    name) are imported: the import system would otherwise rebind the package attribute to the submodule."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
