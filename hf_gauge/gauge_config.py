"""``GaugeConfig``: the typed contents of a gauge folder's ``gauge_config.json`` (layout in docs/format.md).

The config describes the tensors in ``gauge.safetensors`` (one signed permutation ``y[j] = sign[j] * x[perm[j]]``
per space, mapping the source chart to the target chart) and ties the two files together with a sha256. Reading
treats the file as hostile: every field's JSON type is checked here, so later code only sees typed values.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import GaugeError
from .jsonio import read_json
from .version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "GaugeConfig", "SpaceConfig"]

FORMAT = "hf_gauge.gauge"
FORMAT_VERSION = 1

_HINT = "the file is corrupt or hostile: re-save the gauge"
_JSON_NAMES = {dict: "object", str: "string", list: "array", int: "integer", float: "number", bool: "boolean",
               type(None): "null"}


def _library_version() -> str:
    return __version__


def _json_type(v: Any) -> str:
    """``v``'s JSON type with its article: ``an object``, ``a string``, ``null``."""
    name = _JSON_NAMES.get(type(v), type(v).__name__)
    return name if v is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _count(v: Any) -> bool:
    """A JSON integer that is not a boolean."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SpaceConfig:
    """One gauge space as the config records it: its dimension ``size`` and how many signs are ``-1``."""

    size: int
    negative_signs: int | None = None


@dataclass(frozen=True, kw_only=True)
class GaugeConfig:
    """The typed ``gauge_config.json`` of a saved gauge; fields in file order.

    ``to_json()`` writes the version-1 layout; ``GaugeConfig.from_json(data, where)`` validates a possibly hostile
    file (format, version range, the JSON type of every field, space sizes, confidence array kinds) and refuses
    anything else with a one-line ``GaugeError`` naming ``where``. Absent or null ``source`` / ``target`` /
    ``metrics`` / ``confidence`` / ``confidence_arrays`` read as empty; unknown extra keys are ignored (additive keys
    do not bump the version).
    """

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    library: str | None = "hf_gauge"
    library_version: str | None = None
    group: str | None = None
    method: str | None = None
    spaces: dict[str, SpaceConfig]
    source: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    confidence: dict[str, Any] = field(default_factory=dict)
    confidence_arrays: dict[str, Literal["torch", "numpy"]] = field(default_factory=dict)
    weights_sha256: str

    def to_json(self) -> bytes:
        """The file's bytes: indented JSON, keys in field order, a final newline (NaN metrics allowed)."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        doc["spaces"] = {n: {"size": s.size, "negative_signs": s.negative_signs} for n, s in self.spaces.items()}
        return (json.dumps(doc, indent=2, sort_keys=False, allow_nan=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str | os.PathLike, where: str) -> GaugeConfig:
        """Parse and validate ``gauge_config.json`` (its bytes or its path); ``where`` names it in messages.

        The checksum only proves that the config and the weights belong together, so every field is checked here.
        """
        src = bytes(data) if isinstance(data, (bytes, bytearray)) else Path(data)
        doc = read_json(src, where, "the file is corrupt: re-save the gauge")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise GaugeError(f"{where} is not an hf_gauge gauge config (format != {FORMAT!r})")
        version = doc.get("format_version")
        if not _count(version) or not 1 <= version <= FORMAT_VERSION:
            raise GaugeError(f"{where}: unknown gauge format version {version!r}; this hf_gauge "
                             f"{_library_version()} reads versions 1..{FORMAT_VERSION}. Upgrade hf_gauge to load it.")

        def typed(key: str, kind: type, optional: bool = True) -> Any:
            v = doc.get(key)
            if isinstance(v, kind) or (optional and v is None):
                return v
            want = _JSON_NAMES[kind] + (" or null" if optional else "")
            got = "missing" if key not in doc else _json_type(v)
            raise GaugeError(f"{where}: field {key!r} is {got}, expected {want}; {_HINT}")

        spaces: dict[str, SpaceConfig] = {}
        for name, info in typed("spaces", dict, optional=False).items():
            size = info.get("size") if isinstance(info, dict) else None
            if not _count(size) or not 0 < size < 1 << 40:
                raise GaugeError(f"{where}: space {name!r} has size {size!r}; expected a positive integer")
            neg = info.get("negative_signs")
            if neg is not None and (not _count(neg) or not 0 <= neg <= size):
                raise GaugeError(f"{where}: space {name!r} has negative_signs {neg!r}; expected an integer in "
                                 f"0..{size}; {_HINT}")
            spaces[name] = SpaceConfig(size=size, negative_signs=neg)
        if not spaces:
            raise GaugeError(f"{where} lists no gauge spaces")
        kinds: dict[str, Any] = dict(typed("confidence_arrays", dict) or {})
        for key, kind in kinds.items():
            if kind not in ("torch", "numpy"):
                raise GaugeError(f"{where}: confidence array {key!r} has kind {kind!r}; expected 'torch' or 'numpy'")
        return cls(format=FORMAT, format_version=version, library=typed("library", str),
                   library_version=typed("library_version", str), group=typed("group", str),
                   method=typed("method", str), spaces=spaces, source=dict(typed("source", dict) or {}),
                   target=dict(typed("target", dict) or {}), metrics=dict(typed("metrics", dict) or {}),
                   confidence=dict(typed("confidence", dict) or {}), confidence_arrays=kinds,
                   weights_sha256=typed("weights_sha256", str, optional=False))
