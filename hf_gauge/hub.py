"""Gauge files on disk and on the Hub: ``gauge.safetensors`` + ``gauge_config.json`` (format in docs/format.md).

A gauge folder is saved beside checkpoints (``gauges/<name>/``), never into a checkpoint's own folder, and never
touches a ``config.json``. Writes are atomic; loads validate everything and refuse (``GaugeError``) a corrupt,
half-written, mismatched or unknown-version folder. Only safetensors and JSON are read: never pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .atomic import atomic_path, atomic_write_bytes, folder_lock
from .errors import GaugeError
from .gauge import Gauge
from .group import SignedPermutation
from .transport._io import read_json

__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME", "save_gauge", "load_gauge", "push_gauge",
           "gauge_card", "gauge_id", "template_path"]

FORMAT = "hf_gauge.gauge"
FORMAT_VERSION = 1
WEIGHTS_NAME = "gauge.safetensors"
CONFIG_NAME = "gauge_config.json"
CARD_NAME = "README.md"


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _version() -> str:
    from . import __version__
    return __version__


def _jsonable(x: Any) -> Any:
    """Metrics/provenance as plain JSON (numpy scalars and small arrays become Python numbers/lists)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().cpu().numpy())
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    raise GaugeError(f"cannot store a value of type {type(x).__name__} in gauge_config.json; use numbers, strings, "
                     "lists or dicts")


def _is_array(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (isinstance(v, np.ndarray) and v.dtype.kind in "fiub")


def _group(gauge: Gauge) -> str:
    mt = gauge.source.get("model_type") or gauge.target.get("model_type")
    if mt:
        try:
            from .specs import get_spec
            return get_spec(mt).group
        except GaugeError:
            pass
    return "B_d" if not gauge.is_permutation else "S_d"


def gauge_id(gauge: Gauge) -> str:
    """A short content hash of the gauge's elements (12 hex digits): the default folder name on the Hub."""
    h = hashlib.sha256()
    for name, el in gauge.spaces.items():
        h.update(name.encode())
        h.update(el.perm.numpy().tobytes())
        h.update(el.sign.numpy().tobytes())
    return h.hexdigest()[:12]


def _tensors_and_meta(gauge: Gauge) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for name, el in gauge.spaces.items():
        tensors[f"{name}.perm"] = el.perm.contiguous()
        tensors[f"{name}.sign"] = el.sign.contiguous()
    conf_json: dict[str, Any] = {}
    conf_kinds: dict[str, str] = {}
    for key, val in gauge.confidence.items():
        if _is_array(val):
            t = val.detach().cpu() if isinstance(val, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(val))
            tname = f"{key}.margin" if key in gauge.spaces else f"confidence.{key}"
            if tname in tensors:
                raise GaugeError(f"confidence entry {key!r} collides with tensor {tname!r}")
            tensors[tname] = t.contiguous()
            conf_kinds[key] = "torch" if isinstance(val, torch.Tensor) else "numpy"
        else:
            conf_json[key] = _jsonable(val)
    return tensors, conf_json, conf_kinds


# ----------------------------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------------------------
def _serialize(gauge: Gauge) -> tuple[bytes, bytes]:
    from safetensors.torch import save

    if not isinstance(gauge, Gauge):
        raise GaugeError(f"save_gauge expects a hf_gauge.Gauge, got {type(gauge).__name__}")
    tensors, conf_json, conf_kinds = _tensors_and_meta(gauge)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "group": _group(gauge)}
    weights = save(tensors, metadata=meta)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library": "hf_gauge",
        "library_version": _version(),
        "group": meta["group"],
        "method": gauge.method,
        "spaces": {n: {"size": el.size, "negative_signs": int((el.sign < 0).sum())} for n, el in gauge.spaces.items()},
        "source": _jsonable(gauge.source),
        "target": _jsonable(gauge.target),
        "metrics": _jsonable(gauge.metrics),
        "confidence": conf_json,
        "confidence_arrays": conf_kinds,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    return weights, (json.dumps(config, indent=2, sort_keys=False, allow_nan=True) + "\n").encode()


def save_gauge(gauge: Gauge, save_directory: str | os.PathLike) -> Path:
    """Write ``gauge`` to ``save_directory`` (``gauge.safetensors`` + ``gauge_config.json``); returns the folder.

    A new folder appears whole (written beside it, fsynced, then renamed). In an existing folder the two gauge files
    are replaced as one unit: each atomically (weights first; the config records the weights' sha256), under an
    exclusive lock on the folder that ``load_gauge`` takes shared, so concurrent saves never leave a mixed pair
    and a concurrent load sees the old pair or the new one. Other files (a model card, a checkpoint's
    ``config.json``) are never touched.
    """
    weights, config = _serialize(gauge)
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise GaugeError(f"{target} exists and is not a folder; choose a folder path such as gauges/<name>/")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(target, directory=True) as tmp:
                (tmp / WEIGHTS_NAME).write_bytes(weights)
                (tmp / CONFIG_NAME).write_bytes(config)
            return target
        except OSError:
            if not target.is_dir():
                raise
            # lost a race with another writer that created the folder: fall through to the locked replacement
    with folder_lock(target, exclusive=True):
        atomic_write_bytes(target / WEIGHTS_NAME, weights)
        atomic_write_bytes(target / CONFIG_NAME, config)
    return target


# ----------------------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------------------
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _download(repo_id: str, subfolder: str | None, revision: str | None, token: str | bool | None,
              cache_dir: str | os.PathLike | None, local_files_only: bool, endpoint: str | None) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    paths = []
    for fname in (WEIGHTS_NAME, CONFIG_NAME):
        try:
            paths.append(Path(hf_hub_download(repo_id, fname, subfolder=subfolder, revision=revision, token=token,
                                              cache_dir=cache_dir, local_files_only=local_files_only,
                                              endpoint=endpoint)))
        except RevisionNotFoundError:
            raise GaugeError(f"revision {revision!r} of {repo_id!r} not found on the Hub") from None
        except RepositoryNotFoundError:
            raise GaugeError(f"{repo_id!r} is neither a local folder nor a Hub repository you can access "
                             "(check the name, or pass token=)") from None
        except LocalEntryNotFoundError:     # (a subclass of EntryNotFoundError: catch it first)
            raise GaugeError(f"{fname} of {repo_id!r} is not in the local cache and the Hub cannot be reached "
                             "(offline mode or local_files_only=True); download it once while online") from None
        except EntryNotFoundError:
            where = f"{repo_id}/{subfolder}" if subfolder else repo_id
            raise GaugeError(f"no {fname} in {where!r} (revision {revision or 'main'}); gauges live in subfolders: "
                             "pass subfolder='gauges/<name>'") from None
    return paths[0], paths[1]


def load_gauge(path_or_repo_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
               token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
               local_files_only: bool = False, endpoint: str | None = None) -> Gauge:
    """Load a gauge from a local folder or a Hub repository (``subfolder`` such as ``"gauges/<name>"``).

    Hub downloads go through ``hf_hub_download`` (``revision``, ``cache_dir``, ``token``, offline mode and
    ``local_files_only`` honoured; ``endpoint`` for a private Hub). Raises ``GaugeError`` on anything invalid.
    """
    local = Path(path_or_repo_id)
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        weights_path, config_path = local / WEIGHTS_NAME, local / CONFIG_NAME
        where = str(local)
    elif local.exists():
        raise GaugeError(f"{local} is a file; pass the gauge folder (holding {WEIGHTS_NAME} and {CONFIG_NAME})")
    elif isinstance(path_or_repo_id, str) and _REPO_ID.match(path_or_repo_id) and not Path(path_or_repo_id).is_absolute():
        weights_path, config_path = _download(path_or_repo_id, subfolder, revision, token, cache_dir,
                                              local_files_only, endpoint)
        where = f"{path_or_repo_id}/{subfolder}" if subfolder else str(path_or_repo_id)
    else:
        raise GaugeError(f"no gauge folder at {local} (and it is not a Hub repository id)")
    with folder_lock(weights_path.parent, exclusive=False):      # a concurrent save_gauge replaces both files
        for p in (weights_path, config_path):
            if not p.is_file():
                raise GaugeError(f"{where} has no {p.name}; a gauge folder holds {WEIGHTS_NAME} and {CONFIG_NAME} "
                                 "(save one with Gauge.save_pretrained)")
        weights, config = weights_path.read_bytes(), config_path.read_bytes()
    return _parse(weights, config, where)


# the JSON type of every gauge_config.json field the loader reads (None: the field may be null or absent)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "spaces": (dict,), "source": (dict, type(None)), "target": (dict, type(None)), "method": (str, type(None)),
    "metrics": (dict, type(None)), "confidence": (dict, type(None)), "confidence_arrays": (dict, type(None)),
}


def _check_config_types(config: dict, where: str) -> None:
    """Refuse fields of the wrong JSON type (the checksum only proves the two files belong together)."""
    for key, types in _FIELD_TYPES.items():
        if key in config and not isinstance(config[key], types):
            raise GaugeError(f"{where}: field {key!r} is a {type(config[key]).__name__}, expected "
                             f"{' or '.join('null' if t is type(None) else _JSON_NAMES[t] for t in types)}; "
                             "the file is corrupt or hostile: re-save the gauge")
    for name, info in (config.get("spaces") or {}).items():
        size = info.get("size") if isinstance(info, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 40:
            raise GaugeError(f"{where}: space {name!r} has size {size!r}; expected a positive integer")
    for key, kind in (config.get("confidence_arrays") or {}).items():
        if kind not in ("torch", "numpy"):
            raise GaugeError(f"{where}: confidence array {key!r} has kind {kind!r}; expected 'torch' or 'numpy'")


_JSON_NAMES = {dict: "object", str: "string", list: "array"}


def _parse(weights: bytes, config_bytes: bytes, where: str) -> Gauge:
    from safetensors.torch import load

    config = read_json(config_bytes, f"{where}/{CONFIG_NAME}", "the file is corrupt: re-save the gauge")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise GaugeError(f"{where}/{CONFIG_NAME} is not an hf_gauge gauge config (format != {FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise GaugeError(f"{where}: unknown gauge format version {version!r}; this hf_gauge {_version()} reads "
                         f"versions 1..{FORMAT_VERSION}. Upgrade hf_gauge to load it.")
    digest = hashlib.sha256(weights).hexdigest()
    if config.get("weights_sha256") != digest:
        raise GaugeError(f"{where}/{WEIGHTS_NAME} does not match {CONFIG_NAME} (sha256 differs): the folder is "
                         "corrupt or half-written. Re-save or re-download the gauge.")
    try:
        tensors = load(weights)
    except Exception as e:  # safetensors raises its own SafetensorError / ValueError on a bad header
        raise GaugeError(f"{where}/{WEIGHTS_NAME} is not a valid safetensors file ({e}); re-save the gauge") from None
    n = int.from_bytes(weights[:8], "little")          # load() succeeded, so the header is valid JSON
    meta = json.loads(weights[8:8 + n]).get("__metadata__") or {}
    if meta.get("format") != FORMAT or meta.get("format_version") != str(version):
        raise GaugeError(f"{where}/{WEIGHTS_NAME} metadata says format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}, but {CONFIG_NAME} says {FORMAT!r} version {version}")
    _check_config_types(config, f"{where}/{CONFIG_NAME}")
    spaces_cfg = config.get("spaces")
    if not spaces_cfg:
        raise GaugeError(f"{where}/{CONFIG_NAME} lists no gauge spaces")
    spaces: dict[str, SignedPermutation] = {}
    for name, info in spaces_cfg.items():
        size = info.get("size") if isinstance(info, dict) else None
        perm, sign = tensors.pop(f"{name}.perm", None), tensors.pop(f"{name}.sign", None)
        if perm is None or sign is None:
            raise GaugeError(f"{where}: space {name!r} is missing its {'perm' if perm is None else 'sign'} tensor")
        if perm.dtype != torch.int64 or sign.dtype != torch.int8:
            raise GaugeError(f"{where}: space {name!r} has perm dtype {perm.dtype} and sign dtype {sign.dtype}; "
                             "the format stores perm as int64 and sign as int8")
        if perm.dim() != 1 or sign.dim() != 1 or perm.numel() != size or sign.numel() != size:
            raise GaugeError(f"{where}: space {name!r} has perm shape {tuple(perm.shape)} and sign shape "
                             f"{tuple(sign.shape)}, but {CONFIG_NAME} says size {size}; the files do not match")
        try:
            spaces[name] = SignedPermutation(perm, sign)
        except GaugeError as e:
            raise GaugeError(f"{where}: space {name!r}: {e}") from None
    kinds = config.get("confidence_arrays") or {}
    confidence: dict[str, Any] = dict(config.get("confidence") or {})
    for key, kind in kinds.items():
        t = tensors.pop(f"{key}.margin" if key in spaces else f"confidence.{key}", None)
        if t is None:
            raise GaugeError(f"{where}: confidence array {key!r} is listed in {CONFIG_NAME} but missing")
        try:
            confidence[key] = t if kind == "torch" else t.numpy()
        except TypeError:                    # e.g. bfloat16 has no numpy dtype
            raise GaugeError(f"{where}: confidence array {key!r} has dtype {t.dtype}, which numpy cannot hold") from None
    if tensors:
        raise GaugeError(f"{where}/{WEIGHTS_NAME} holds unexpected tensors {sorted(tensors)[:5]} that "
                         f"{CONFIG_NAME} does not list; the files do not belong together")
    try:
        return Gauge(spaces=spaces, source=config.get("source"), target=config.get("target"),
                     method=config.get("method"), metrics=config.get("metrics"), confidence=confidence)
    except GaugeError as e:
        raise GaugeError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# model card and push
# ----------------------------------------------------------------------------------------------------------------
def template_path() -> Path:
    """The packaged Jinja template of the gauge model card (``hf_gauge/templates/gauge_card.md``)."""
    p = resources.files("hf_gauge").joinpath("templates", "gauge_card.md")
    if not p.is_file():
        raise GaugeError("the gauge card template hf_gauge/templates/gauge_card.md is missing from this install; "
                         "reinstall hf_gauge")
    return Path(str(p))


def _name(desc: Mapping[str, Any], default: str) -> str:
    mid = str(desc.get("model_id") or "")
    return mid if mid else default


def gauge_card(gauge: Gauge, repo_id: str = "REPO_ID", path_in_repo: str = "gauges/NAME"):
    """The ``huggingface_hub.ModelCard`` describing ``gauge`` (rendered from the packaged template)."""
    from huggingface_hub import ModelCard, ModelCardData

    src, tgt = _jsonable(gauge.source), _jsonable(gauge.target)
    base = src.get("model_id") or ""
    data = ModelCardData(library_name="hf_gauge", tags=["hf_gauge", "gauge", "signed-permutation"],
                         base_model=base if _REPO_ID.match(base) and "/" in base else None)
    spaces = [{"name": n, "size": el.size, "negative": int((el.sign < 0).sum())} for n, el in gauge.spaces.items()]
    metrics = {k: v for k, v in _jsonable(gauge.metrics).items() if not isinstance(v, (list, dict))}
    return ModelCard.from_template(
        data, template_path=str(template_path()), source=src, target=tgt, source_name=_name(src, "source model"),
        target_name=_name(tgt, "target model"), group=_group(gauge), method=gauge.method, metrics=metrics,
        spaces=spaces, repo_id=repo_id, path_in_repo=path_in_repo, format_version=FORMAT_VERSION,
        library_version=_version())


def _check_path_in_repo(path_in_repo: str) -> str:
    p = path_in_repo.strip("/")
    parts = p.split("/")
    if not p or p == "." or any(x in ("", ".", "..") for x in parts):
        raise GaugeError(f"path_in_repo={path_in_repo!r} must be a subfolder such as 'gauges/<name>' (at the root the "
                         "gauge's README.md would replace the repository's model card)")
    return p


def push_gauge(gauge: Gauge, repo_id: str, path_in_repo: str | None = None, commit_message: str | None = None,
               revision: str | None = None, token: str | bool | None = None, create_repo: bool = True,
               private: bool | None = None, endpoint: str | None = None):
    """Upload ``gauge`` (and a model card) to ``repo_id`` under ``path_in_repo`` in one commit.

    Defaults to ``gauges/<gauge_id>``; a checkpoint in the same repository is untouched (only the three files of
    the gauge folder are added). ``revision`` names a branch, created from ``main`` if missing. Returns the
    ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    if not isinstance(gauge, Gauge):
        raise GaugeError(f"push_gauge expects a hf_gauge.Gauge, got {type(gauge).__name__}")
    path_in_repo = _check_path_in_repo(f"gauges/{gauge_id(gauge)}" if path_in_repo is None else path_in_repo)
    api = HfApi(endpoint=endpoint, token=token)
    if create_repo:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="hf_gauge-push-") as tmp:
        folder = Path(tmp) / "gauge"
        save_gauge(gauge, folder)
        gauge_card(gauge, repo_id=repo_id, path_in_repo=path_in_repo).save(folder / CARD_NAME)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo=path_in_repo,
                                 commit_message=commit_message or f"Add hf_gauge gauge {path_in_repo}",
                                 revision=revision, repo_type="model")
