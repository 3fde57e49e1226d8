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
from .match import match_correlation  # noqa: E402
from .filefind import find_gauge  # noqa: E402  (live models, or checkpoint folders / Hub ids read from files)
from .orthogonal import OrthogonalMap  # noqa: E402
from .path import compose_path  # noqa: E402
from .stats import PairStats, collect_pair_stats  # noqa: E402
__all__ += ["find_gauge", "match_correlation", "OrthogonalMap", "compose_path", "PairStats", "collect_pair_stats"]
# --- transport (issue 4) exports ---
from .merge import merge  # noqa: E402
from .objects import Attribution, IndexSet  # noqa: E402
from .transport.files import transport_path  # noqa: E402
from .transport.peft_adapters import transport_peft_model  # noqa: E402

__all__ += ["merge", "IndexSet", "Attribution", "transport_path", "transport_peft_model"]
# --- hub / checkpoint / verify (issue 5) exports ---
from .hub import load_gauge, push_gauge, save_gauge  # noqa: E402
from .checkpoint import apply_gauge_to_checkpoint  # noqa: E402
from .verify import verify  # noqa: E402
__all__ += ["save_gauge", "load_gauge", "push_gauge", "apply_gauge_to_checkpoint", "verify"]
# --- inner spaces / canonical / audit (issue 6) exports ---
from .inner import InnerMatch, find_full_gauge, match_inner  # noqa: E402
from .canonical import canonical_gauge, canonical_stability, canonicalize  # noqa: E402
from .audit import AuditReport, audit  # noqa: E402

__all__ += ["InnerMatch", "match_inner", "find_full_gauge", "canonical_gauge", "canonicalize", "canonical_stability",
            "AuditReport", "audit"]
