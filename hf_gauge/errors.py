"""The one exception hf_gauge raises for refused input."""
from __future__ import annotations


class GaugeError(ValueError):
    """Raised for every input hf_gauge refuses; the message says what is wrong and what to do."""
