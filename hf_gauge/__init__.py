"""hf_gauge: find, apply and transport residual-stream gauges between checkpoints of transformers models.

Importing this package attaches ``apply_gauge``, ``gauge_to``, ``transport`` and ``symmetry_group`` to
``transformers.PreTrainedModel``: every model class of a supported model_type (``supported_model_types()``) uses
them; on any other model they raise ``GaugeError``.
"""
from __future__ import annotations

from ._attach import attach
from .audit import AuditReport, audit
from .canonical import canonical_gauge, canonical_stability, canonicalize
from .checkpoint import apply_gauge_to_checkpoint
from .errors import GaugeError
from .gauge import Gauge
from .group import SignedPermutation
from .hub import load_gauge, push_gauge, save_gauge
from .inner import InnerMatch, match_inner
from .match import find_full_gauge, find_gauge, match_correlation
from .merge import merge
from .models import apply_gauge, describe, fingerprint, gauge_spaces, random_gauge, symmetry_group, unwrap
from .objects import Attribution, IndexSet
from .orthogonal import OrthogonalMap
from .path import compose_path
from .specs import get_spec, supported_model_types
from .stats import PairStats, collect_pair_stats
from .transport.files import transport_path
from .transport.peft_adapters import transport_peft_model
from .verify import verify
from .version import __version__

attach()

__all__ = [
    # the group and gauges
    "GaugeError", "Gauge", "SignedPermutation", "get_spec", "supported_model_types", "__version__",
    # live models
    "apply_gauge", "random_gauge", "symmetry_group", "describe", "fingerprint", "gauge_spaces", "unwrap",
    # matching
    "find_gauge", "find_full_gauge", "match_correlation", "match_inner", "InnerMatch", "OrthogonalMap",
    "compose_path", "PairStats", "collect_pair_stats",
    # transport
    "merge", "IndexSet", "Attribution", "transport_path", "transport_peft_model",
    # files and the Hub
    "save_gauge", "load_gauge", "push_gauge", "apply_gauge_to_checkpoint", "verify",
    # canonical chart and audits
    "canonical_gauge", "canonicalize", "canonical_stability", "AuditReport", "audit",
]
