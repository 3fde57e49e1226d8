"""Configs as the gauge engine reads them: a composite (vision-language) config is read through its text model.

Gemma 3's ``Gemma3Config`` keeps the decoder's dimensions in ``text_config``; the residual, MLP-unit and head spaces
are the text model's, while ``model_type`` (which selects the spec), the model name and its revision are the
composite's.
"""
from __future__ import annotations

from typing import Any

__all__ = ["TextConfigView", "gauge_config"]


class TextConfigView:
    """Read-only view of a composite config: dimensions from ``get_text_config()``, identity from the composite."""

    OUTER = frozenset({"model_type", "_name_or_path", "name_or_path", "_commit_hash", "architectures"})

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "outer", config)
        object.__setattr__(self, "text", config.get_text_config())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.outer if name in TextConfigView.OUTER else self.text, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("TextConfigView is read-only; change the model's own config")


def gauge_config(config: Any) -> Any:
    """``config`` itself, or a ``TextConfigView`` when it is a composite config without its own ``hidden_size``."""
    if isinstance(config, TextConfigView) or hasattr(config, "hidden_size") or not hasattr(config, "get_text_config"):
        return config
    return TextConfigView(config)
