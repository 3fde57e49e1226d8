"""Model references as gauges record them and shared files carry them: a Hub id wherever one can be known.

A model loaded from the Hub records its repo id; one loaded from the Hugging Face cache
(``.../models--org--name/snapshots/<sha>/``) records ``org/name`` pinned at ``<sha>``; any other local folder is
recorded as an absolute path (valid from any working directory on this machine, and recognisably local, so that
``push_gauge`` refuses to publish it). Nothing here touches the network.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

__all__ = ["hub_model_id", "is_hub_id", "is_local_path", "model_ref", "local_base", "shareable"]

_CACHE_PATH = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<sha>[0-9a-f]{40})")


def hub_model_id(model_id: str | None, revision: str | None = None) -> tuple[str, str | None]:
    """``(id, revision)`` with a Hugging Face cache path (``.../models--org--name/snapshots/<sha>``) turned into
    ``org/name`` pinned at ``<sha>``; anything else unchanged."""
    m = _CACHE_PATH.search(str(model_id or ""))
    if m:
        return f"{m['org']}/{m['name']}", revision or m["sha"]
    return str(model_id or ""), revision


def is_hub_id(model_id: str) -> bool:
    """``namespace/name`` that ``huggingface_hub.validate_repo_id`` accepts and that is not an existing local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if not model_id or "/" not in model_id or Path(model_id).is_absolute() or model_id.startswith((".", "~")):
        return False
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    return not Path(model_id).exists()


def is_local_path(ref: str | None) -> bool:
    """True for a reference that names this machine's files: an existing path, an absolute or ``.``/``~`` path, or
    any name with a path separator that is not a Hub id (``work/u2/A``). A bare name (``gpt2``) is not local unless
    such a folder exists."""
    if not ref:
        return False
    if is_hub_id(ref):
        return False
    return (Path(ref).exists() or Path(ref).is_absolute() or ref.startswith((".", "~")) or "/" in ref
            or "\\" in ref)


def model_ref(name_or_path: str | None, revision: str | None = None) -> tuple[str, str | None]:
    """``(model_id, revision)`` to record for a model loaded from ``name_or_path`` (a config's ``_name_or_path``):
    the Hub id with the cache's revision for a cache path, a Hub id as is, a local folder as an absolute path."""
    mid, rev = hub_model_id(name_or_path, revision)
    if mid != str(name_or_path or "") or not is_local_path(mid):
        return mid, rev
    return str(Path(mid).expanduser().resolve()), rev


def local_base(base: str, what: str = "adapter_config.json") -> str:
    """``base`` to store where a model must be named (a PEFT adapter's base): a Hub id or cache path as its Hub id,
    a local folder as an absolute path with a warning (it resolves only on this machine)."""
    mid, _ = model_ref(base)
    if is_local_path(mid):
        warnings.warn(f"{what} names the local base model {mid} (absolute, so it loads from any working directory); "
                      "it resolves only on this machine: pass the base's Hub id to share the adapter", stacklevel=3)
    return mid


def shareable(desc: dict) -> dict:
    """A recorded ``source`` / ``target`` description without a local ``model_id`` (the chart's fingerprint, width
    and type still identify it): for files that travel with the object, such as a transported SAE's ``cfg.json``."""
    return {k: v for k, v in desc.items() if not (k == "model_id" and is_local_path(v))}
