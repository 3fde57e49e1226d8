"""hf_gauge: find, apply and transport residual-stream gauges between checkpoints of transformers models.

Importing this package attaches ``apply_gauge``, ``gauge_to`` and ``transport`` to the supported
``*ForCausalLM`` classes (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX).
"""
from __future__ import annotations

from .errors import GaugeError
from .gauge import Gauge
from .group import SignedPermutation
from .models import apply_gauge, describe, fingerprint, gauge_spaces, random_gauge, symmetry_group, unwrap
from .specs import get_spec, supported_model_types
from ._attach import attach

__version__ = "0.1.0"

attach()

__all__ = [
    "GaugeError", "Gauge", "SignedPermutation", "apply_gauge", "random_gauge", "symmetry_group", "describe",
    "fingerprint", "gauge_spaces", "unwrap", "get_spec", "supported_model_types", "__version__",
]

# --- matching (issue 3) exports ---
# --- transport (issue 4) exports ---
# --- hub / checkpoint / verify (issue 5) exports ---
# --- inner spaces / canonical / audit (issue 6) exports ---
