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
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .atomic import atomic_path, atomic_write_bytes, folder_lock, fsync_dir, fsync_tree
from .errors import GaugeError
from .gauge import Gauge
from .gauge_config import FORMAT, FORMAT_VERSION, GaugeConfig, SpaceConfig
from .group import SignedPermutation
from .inputs import audit_folder
from .jsonio import read_bounded
from .readme import parse_root_readme
from .modelref import hub_model_id, is_hub_id, is_local_path
from .specs import get_spec
from .version import __version__

__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME", "save_gauge", "load_gauge", "push_gauge",
           "gauge_card", "write_gauge_card", "root_card", "list_gauges", "hub_model_id", "gauge_id", "template_path",
           "split_hub_path"]

WEIGHTS_NAME = "gauge.safetensors"
CONFIG_NAME = "gauge_config.json"
CARD_NAME = "README.md"
PENDING_NAME = ".hf_gauge-pending"      # a save's complete new pair, published before the files are replaced


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _version() -> str:
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


def group_name(gauge: Gauge) -> str:
    """The symmetry group recorded for a gauge (from its model type's spec)."""
    mt = gauge.source.get("model_type") or gauge.target.get("model_type")
    if mt:
        try:
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
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "group": group_name(gauge)}
    weights = save(tensors, metadata=meta)
    config = GaugeConfig(
        format=FORMAT, format_version=FORMAT_VERSION, library="hf_gauge", library_version=_version(),
        group=meta["group"], method=gauge.method,
        spaces={n: SpaceConfig(size=el.size, negative_signs=int((el.sign < 0).sum()))
                for n, el in gauge.spaces.items()},
        source=_jsonable(gauge.source), target=_jsonable(gauge.target), metrics=_jsonable(gauge.metrics),
        confidence=conf_json, confidence_arrays=conf_kinds, weights_sha256=hashlib.sha256(weights).hexdigest())
    return weights, config.to_json()


def save_gauge(gauge: Gauge, save_directory: str | os.PathLike) -> Path:
    """Write ``gauge`` to ``save_directory`` (``gauge.safetensors`` + ``gauge_config.json``); returns the folder.

    A new folder appears whole (written beside it, fsynced, then renamed). In an existing folder the two gauge files
    are replaced as one unit, under an exclusive lock on the folder that ``load_gauge`` takes shared: the new pair is
    first published whole as a hidden journal folder (``.hf_gauge-pending``, written as ``.hf_gauge-pending.new``),
    then each file is renamed from it onto the folder's (weights first; the config records the weights' sha256) and
    the journal is dropped. These three hidden names are reserved to hf_gauge inside a gauge folder. A process
    killed at any point leaves the old pair, or a journal from which ``load_gauge`` reads the new pair and the next
    save finishes the replacement. Other files (a model card, a checkpoint's ``config.json``) are never touched
    (``Gauge.save_pretrained`` writes its card in the same unit, after the pair).
    """
    return _save(gauge, Path(save_directory), {})


def _save(gauge: Gauge, target: Path, extra: Mapping[str, bytes]) -> Path:
    """``save_gauge``, with ``extra`` files (the card) written in the same unit, after the pair."""
    weights, config = _serialize(gauge)
    files = {WEIGHTS_NAME: weights, CONFIG_NAME: config, **extra}
    if target.exists() and not target.is_dir():
        raise GaugeError(f"{target} exists and is not a folder; choose a folder path such as gauges/<name>/")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(target, directory=True) as tmp:
                for name, data in files.items():
                    (tmp / name).write_bytes(data)
            return target
        except OSError:
            if not target.is_dir():
                raise
            # lost a race with another writer that created the folder: fall through to the locked replacement
    with folder_lock(target, exclusive=True):
        _finish_pending(target)                 # a save killed midway: complete it first
        pending, tmp = target / PENDING_NAME, target / (PENDING_NAME + ".new")
        for leftover in (tmp, target / (PENDING_NAME + ".old")):
            _remove(leftover)                   # reserved names: what a killed save left
        try:
            tmp.mkdir()
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            fsync_tree(tmp)
            os.rename(tmp, pending)             # the journal: from here on the new pair is complete on disk
        except BaseException:
            _remove(tmp)
            raise
        fsync_dir(target)
        _finish_pending(target, own=True)
    return target


def _regular(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _remove(p: Path) -> None:
    """Remove a leftover of hf_gauge's reserved journal names (a folder, a file or a link; never followed)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif os.path.lexists(p):
        p.unlink()


def _journal(folder: Path) -> Path | None:
    """``folder``'s pending journal (``PENDING_NAME``, a real folder), or None."""
    pending = folder / PENDING_NAME
    return pending if pending.is_dir() and not pending.is_symlink() else None


def _pending_pair(folder: Path) -> tuple[bytes, bytes] | None:
    """The new pair a journalled save was writing: the journal's config with the journal's weights, or the folder's
    when they were already moved into place; None without a journal or once its config was moved too."""
    pending = _journal(folder)
    if pending is None or not _regular(pending / CONFIG_NAME):
        return None
    w = pending / WEIGHTS_NAME if _regular(pending / WEIGHTS_NAME) else folder / WEIGHTS_NAME
    return w.read_bytes(), read_bounded(pending / CONFIG_NAME, f"{pending / CONFIG_NAME}", "re-save the gauge")


def _finish_pending(folder: Path, own: bool = False) -> None:
    """Roll a journalled save forward (caller holds the exclusive folder lock): rename the journal's weights, then its
    config (then its card, if any), onto the folder's (atomic renames, no temp files), then drop the journal (renamed
    to ``.old``, then removed). Every step is idempotent, so a kill at any point leaves a state this finishes. An error before the
    weights moved drops the caller's ``own`` journal (the save fails whole); after that the journal stays, and
    loads read the new pair until a save finishes it."""
    pending = _journal(folder)
    if pending is None:
        return
    try:
        if _regular(pending / WEIGHTS_NAME):
            os.replace(pending / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    except BaseException:
        if own:
            _drop(pending)
        raise
    if _regular(pending / CONFIG_NAME):
        os.replace(pending / CONFIG_NAME, folder / CONFIG_NAME)
    if _regular(pending / CARD_NAME):            # the card save_pretrained writes with the pair
        os.replace(pending / CARD_NAME, folder / CARD_NAME)
    fsync_dir(folder)
    _drop(pending)


def _drop(pending: Path) -> None:
    """Remove a journal atomically: rename it to ``PENDING_NAME.old`` (removed by the next save should this process
    die midway), then delete it."""
    trash = pending.with_name(PENDING_NAME + ".old")
    _remove(trash)
    os.rename(pending, trash)
    _remove(trash)


# ----------------------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------------------
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def download_snapshot(repo_id: str, what: str, **kwargs: Any) -> Path:
    """``huggingface_hub.snapshot_download(repo_id, **kwargs)`` (revision, cache, token, offline mode honoured); a
    failure is a one-line ``GaugeError`` naming ``what`` (the id as the user gave it)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import HFValidationError

    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except HFValidationError as e:
        raise GaugeError(f"{what!r} is neither a local folder nor a Hub repository id: {e}") from None
    except RepositoryNotFoundError:
        raise GaugeError(f"{what!r} is neither a local folder nor a Hub repository you can access (check the "
                         "name, or pass a token)") from None
    except LocalEntryNotFoundError:
        raise GaugeError(f"{what!r} is not in the local cache and the Hub cannot be reached (offline?)") from None
    except HfHubHTTPError as e:
        raise GaugeError(f"downloading {what!r} failed: {str(e).splitlines()[0]}") from None


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
            try:
                found = list_gauges(repo_id, revision=revision, token=token, endpoint=endpoint)
            except GaugeError:
                found = []
            hint = (f"the repository's gauges: {', '.join(found[:20])}" + (" ..." if len(found) > 20 else "")
                    if found else "the repository holds no gauge folder (gauge_config.json)")
            raise GaugeError(f"no {fname} in {where!r} (revision {revision or 'main'}); gauges live in subfolders: "
                             f"pass subfolder='gauges/<name>'; {hint}") from None
    return paths[0], paths[1]


def split_hub_path(spec: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """``("org/repo", "gauges/<name>")`` from ``"org/repo/gauges/<name>"`` (``subfolder`` appended); a spec of one or
    two parts is returned as is. Refuses empty, ``.`` and ``..`` parts in the subfolder."""
    parts = spec.split("/")
    if len(parts) <= 2 or spec.startswith((".", "/", "~")):
        return spec, subfolder
    rest = [*parts[2:], *(subfolder.strip("/").split("/") if subfolder else [])]
    if any(x in ("", ".", "..") for x in rest):
        raise GaugeError(f"{spec!r}: a gauge on the Hub is 'org/repo/gauges/<name>'; its subfolder parts may not be "
                         "empty, '.' or '..'")
    return "/".join(parts[:2]), "/".join(rest)


def load_gauge(path_or_repo_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
               token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
               local_files_only: bool = False, endpoint: str | None = None) -> Gauge:
    """Load a gauge from a local folder or a Hub repository (``subfolder`` such as ``"gauges/<name>"``).

    Hub downloads go through ``hf_hub_download`` (``revision``, ``cache_dir``, ``token``, offline mode and
    ``local_files_only`` honoured; ``endpoint`` for a private Hub). The CLI's and the card's spelling
    ``"org/repo/gauges/<name>"`` works too: the first two parts are the repository, the rest the subfolder (before
    ``subfolder``, when both are given). Raises ``GaugeError`` on anything invalid.
    """
    local = Path(path_or_repo_id)
    if isinstance(path_or_repo_id, str) and not local.exists() and not local.is_absolute() \
            and not Path(path_or_repo_id.split("/")[0]).is_dir():      # out/gauges/typo stays a local path
        path_or_repo_id, subfolder = split_hub_path(path_or_repo_id, subfolder)
        local = Path(path_or_repo_id)
    if subfolder:
        local = local / _check_subfolder(subfolder)
    if local.is_dir():
        weights_path, config_path = local / WEIGHTS_NAME, local / CONFIG_NAME
        where = str(local)
    elif local.exists():
        raise GaugeError(f"{local} is a file; pass the gauge folder (holding {WEIGHTS_NAME} and {CONFIG_NAME})")
    elif isinstance(path_or_repo_id, str) and REPO_ID.match(path_or_repo_id) and not Path(path_or_repo_id).is_absolute():
        weights_path, config_path = _download(path_or_repo_id, subfolder, revision, token, cache_dir,
                                              local_files_only, endpoint)
        where = f"{path_or_repo_id}/{subfolder}" if subfolder else str(path_or_repo_id)
    else:
        raise GaugeError(f"no gauge folder at {local} (and it is not a Hub repository id)")
    with folder_lock(weights_path.parent, exclusive=False):      # a concurrent save_gauge replaces both files
        if local.is_dir():
            audit_folder(local)                     # links and special files, before anything is read
        for p in (weights_path, config_path):
            if not p.is_file():
                raise GaugeError(f"{where} has no {p.name}; a gauge folder holds {WEIGHTS_NAME} and {CONFIG_NAME} "
                                 "(save one with Gauge.save_pretrained)")
        config = read_bounded(config_path, f"{where}/{CONFIG_NAME}", "the file is corrupt: re-save the gauge")
        weights = weights_path.read_bytes()
        pending = _pending_pair(local) if local.is_dir() else None
    try:
        return _parse(weights, config, where)
    except GaugeError:
        if pending is None:
            raise
        return _parse(*pending, f"{where}/{PENDING_NAME}")   # a save killed between its two renames: the new pair


def _parse(weights: bytes, config_bytes: bytes, where: str) -> Gauge:
    from safetensors.torch import load

    config = GaugeConfig.from_json(config_bytes, f"{where}/{CONFIG_NAME}")
    version = config.format_version
    digest = hashlib.sha256(weights).hexdigest()
    if config.weights_sha256 != digest:
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
    spaces: dict[str, SignedPermutation] = {}
    for name, space in config.spaces.items():
        size = space.size
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
    confidence: dict[str, Any] = dict(config.confidence)
    for key, kind in config.confidence_arrays.items():
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
        return Gauge(spaces=spaces, source=config.source, target=config.target, method=config.method,
                     metrics=config.metrics, confidence=confidence)
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


# one line per fit metric, shown next to its rounded value on the card
METRIC_HELP = {
    "mean_matched": "mean |correlation| of the matched coordinate pairs (1 = the two charts agree exactly)",
    "min_matched": "smallest |correlation| of a matched pair (the weakest coordinate)",
    "min_margin": "smallest gap between a matched pair and its best competitor (> 0: every match is unambiguous)",
    "mean_margin": "mean gap between matched pairs and their best competitors",
    "n_low_confidence": "coordinates whose margin is below the low-confidence threshold",
    "low_confidence_threshold": "the margin below which a coordinate counts as low-confidence",
    "positive_fraction": "fraction of residual coordinates kept with sign +1",
    "n_tokens": "tokens of data the fit saw (0: fitted from the weights alone)",
    "data_free": "true when the gauge was fitted from the weights, without data",
    "method": "matching method (signed: B_d; permutation: the S_d baseline)",
    "n_sites": "residual-stream sites (block outputs) whose activations were matched",
    "n_signed_features": "sign-carrying weight features used by the data-free fit",
    "n_invariant_features": "sign-invariant weight features used by the data-free fit",
}


def _pin(desc: Mapping[str, Any], model_id: str | None, api: Any) -> dict[str, Any]:
    """``desc`` with a Hub model id (``model_id`` if given, else the recorded one with cache paths mapped back to
    ids) and its revision pinned through ``HfApi.model_info`` (transformers 5 no longer records ``_commit_hash``)."""
    from huggingface_hub.errors import HfHubHTTPError

    out = dict(desc)
    mid, rev = hub_model_id(model_id or out.get("model_id"), None if model_id else out.get("revision"))
    if mid != (out.get("model_id") or ""):
        out["model_id"], out["revision"] = mid, rev
    if is_hub_id(mid) and not rev and api is not None:
        try:
            info = api.model_info(mid)
            out["revision"] = info.sha
            lic = (info.card_data or {}).get("license") if info.card_data is not None else None
            if lic:
                out.setdefault("license", lic)
        except (HfHubHTTPError, OSError, ValueError):
            pass                             # not on this Hub (a local model): leave the revision unknown
    return out


def cell(text: Any) -> str:
    """``text`` safe inside one cell of a GFM table: ``|`` escaped (GFM splits cells on every unescaped pipe, also
    inside code spans) and line breaks folded into spaces."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for k, v in _jsonable(metrics).items():
        if isinstance(v, (list, dict)):
            continue
        if isinstance(v, float) and not isinstance(v, bool):
            v = f"{v:.4g}"
        rows.append({"name": cell(k), "value": cell(v), "help": cell(METRIC_HELP.get(k, ""))})
    return rows


def _cells(desc: Mapping[str, Any]) -> dict[str, Any]:
    """A source/target description with its strings escaped for table cells (``cell``)."""
    return {k: cell(v) if isinstance(v, str) else v for k, v in desc.items()}


def gauge_card(gauge: Gauge, repo_id: str = "REPO_ID", path_in_repo: str = "gauges/NAME"):
    """The ``huggingface_hub.ModelCard`` describing ``gauge`` (rendered from the packaged template): metadata with
    ``base_model`` (the source) and license when known, rounded metrics with one line each, a runnable snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    src, tgt = _jsonable(gauge.source), _jsonable(gauge.target)
    base = src.get("model_id") or ""
    data = ModelCardData(library_name="hf_gauge", tags=["hf_gauge", "gauge", "signed-permutation"],
                         base_model=base if is_hub_id(base) else None, license=src.get("license"))
    spaces = [{"name": n, "size": el.size, "negative": int((el.sign < 0).sum())} for n, el in gauge.spaces.items()]
    return ModelCard.from_template(
        data, template_path=str(template_path()), source=src, target=tgt, source_cells=_cells(src),
        target_cells=_cells(tgt), source_name=src.get("model_id") or
        "source model", target_name=tgt.get("model_id") or "target model", group=group_name(gauge), method=gauge.method,
        metrics=_metric_rows(gauge.metrics), spaces=spaces, repo_id=repo_id, path_in_repo=path_in_repo,
        format_version=FORMAT_VERSION, library_version=_version())


def write_gauge_card(gauge: Gauge, folder: str | os.PathLike, repo_id: str = "REPO_ID",
                     path_in_repo: str = "gauges/NAME") -> Path:
    """Write the gauge's card as ``folder/README.md`` (atomic); returns its path."""
    p = Path(folder) / CARD_NAME
    atomic_write_bytes(p, str(gauge_card(gauge, repo_id=repo_id, path_in_repo=path_in_repo)).encode())
    return p


def _index_row(gauge: Gauge, repo_id: str, path_in_repo: str) -> str:
    src, tgt = gauge.source.get("model_id") or "unknown", gauge.target.get("model_id") or "unknown"
    return (f"| [`{path_in_repo}`]({path_in_repo}) | `{cell(src)}` → `{cell(tgt)}` | {cell(gauge.method)} | "
            f"{group_name(gauge)} | `hf_gauge.load_gauge(\"{repo_id}\", subfolder=\"{path_in_repo}\")` |")


def root_card(existing: bytes | str | None, gauge: Gauge, repo_id: str, path_in_repo: str) -> bytes:
    """The repository's root ``README.md`` (bytes) with its gauge index updated for ``path_in_repo``.

    The index is one marked section (``<!-- hf_gauge:gauges:start/end -->``, see ``hf_gauge.readme``); every byte of
    an existing README outside it is kept as it was, metadata included (it describes the repository's model, not the
    gauge). A README that is not UTF-8 or whose metadata header is not a YAML mapping is a ``GaugeError``. A
    repository without a card gets one with ``base_model`` (the gauge's source) and ``base_model_relation:
    adapter`` (a gauge is applied on top of its base, like an adapter).
    """
    from huggingface_hub import ModelCardData

    if existing is None:
        src = gauge.source.get("model_id") or ""
        data = ModelCardData(library_name="hf_gauge", base_model=src if is_hub_id(src) else None,
                             license=gauge.source.get("license"), tags=["hf_gauge"])
        if data.base_model:
            data.base_model_relation = "adapter"
        existing = (f"---\n{data.to_yaml()}\n---\n\n# Gauges for `{src or repo_id}`\n\nSigned-permutation gauges "
                    "made with [hf_gauge](https://pypi.org/project/hf-gauge/): exact changes of basis between the "
                    "residual streams of checkpoints.\n")
    readme = parse_root_readme(existing.encode("utf-8") if isinstance(existing, str) else existing,
                               f"the README.md of {repo_id}")
    rows = [ln for ln in readme.section_lines() if ln.startswith("| [`") and f"[`{path_in_repo}`]" not in ln]
    rows.append(_index_row(gauge, repo_id, path_in_repo))
    return readme.with_section(["## Gauges", "",
                                "Made with hf_gauge; each folder has its own card (provenance, fit metrics, usage).", "",
                                "| gauge | maps | method | group | load |", "|---|---|---|---|---|", *sorted(rows)])


def checkpoint_card(gauge: Gauge, source_id: str | None, source_card: str | None):
    """The card of a checkpoint written by ``apply_gauge_to_checkpoint``: what it is (the source moved into another
    chart, same function), ``base_model`` (the source's Hub id) with ``base_model_relation: finetune`` (of the Hub's
    relations, the one for a full checkpoint derived from its base), ``library_name: transformers`` and the source's
    license; the source's own card and gauges are not copied, since they describe the source's chart."""
    from huggingface_hub import ModelCard, ModelCardData

    lic = None
    if source_card:
        try:
            lic = getattr(ModelCard(source_card).data, "license", None)
        except ValueError:
            lic = None
    sid = source_id if source_id and is_hub_id(source_id) else None
    name = sid or gauge.source.get("model_id") or "the source checkpoint"
    data = ModelCardData(base_model=sid, license=lic, library_name="transformers", tags=["hf_gauge", "gauged"])
    if sid:
        data.base_model_relation = "finetune"    # the Hub's relation for a full checkpoint derived from its base
    text = (f"# `{name}` in another residual chart\n\nThis checkpoint is `{name}` with every weight moved through the "
            f"hf_gauge gauge `{gauge_id(gauge)}` ({gauge.method}; spaces {', '.join(gauge.spaces)}): index operations "
            "and sign flips only, so it computes exactly the same function; only the coordinates of its hidden "
            "states differ. Objects made for the source (steering vectors, SAEs, adapters) work here after "
            "`gauge.transport(...)`. The source's own model card and `gauges/` were not copied: they describe the "
            "source's chart.\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def list_gauges(repo_id: str, revision: str | None = None, token: str | bool | None = None,
                endpoint: str | None = None) -> list[str]:
    """The gauge folders of a Hub model repository (every folder holding a ``gauge_config.json``), sorted."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        files = HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id, revision=revision)
    except HFValidationError as e:
        raise GaugeError(f"{repo_id!r} is not a valid Hub repository id: {e}") from None
    except RevisionNotFoundError:
        raise GaugeError(f"revision {revision!r} of {repo_id!r} not found on the Hub") from None
    except RepositoryNotFoundError:
        raise GaugeError(f"{repo_id!r} is not a Hub repository you can access (check the name, or pass token=)") \
            from None
    except HfHubHTTPError as e:
        raise GaugeError(f"listing {repo_id!r} failed: {str(e).splitlines()[0]}") from None
    return sorted(f.rsplit("/", 1)[0] for f in files if f.endswith("/" + CONFIG_NAME))


def _control(text: str) -> bool:
    """Whether ``text`` holds a control character (C0, DEL, C1: newlines, NUL, escapes)."""
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


def _check_subfolder(subfolder: Any) -> str:
    """A gauge's folder inside a repository or folder: relative, without ``..`` or control characters."""
    parts = subfolder.replace("\\", "/").split("/") if isinstance(subfolder, str) else []
    if (not parts or subfolder.startswith(("/", "\\")) or ".." in parts or _control(subfolder)
            or re.match(r"^[A-Za-z]:", subfolder)):
        raise GaugeError(f"subfolder={subfolder!r} must be a relative folder inside the repository such as "
                         "'gauges/<name>' (no '..', no absolute path, no control characters)")
    return subfolder


def check_path_in_repo(path_in_repo: str) -> str:
    """``path_in_repo`` of a folder hf_gauge publishes (gauges, orthogonal maps), checked; ``GaugeError`` otherwise."""
    if not isinstance(path_in_repo, str) or _control(path_in_repo) or "\\" in path_in_repo:
        raise GaugeError(f"path_in_repo={path_in_repo!r} holds a control character or a backslash; name the gauge "
                         "folder with printable characters, e.g. 'gauges/<name>'")
    p = path_in_repo.strip("/")
    parts = p.split("/")
    if not p or p == "." or any(x in ("", ".", "..") for x in parts):
        raise GaugeError(f"path_in_repo={path_in_repo!r} must be a subfolder such as 'gauges/<name>' (at the root the "
                         "gauge's README.md would replace the repository's model card)")
    return p


def _root_readme(api: Any, repo_id: str, revision: str | None) -> bytes | None:
    """The root README's bytes at ``revision`` (a branch not created yet: at ``main``, which it will start from)."""
    from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError
    try:
        path = api.hf_hub_download(repo_id, CARD_NAME, revision=revision)
    except (EntryNotFoundError, RemoteEntryNotFoundError):
        return None
    except RevisionNotFoundError:
        if revision is None:
            raise
        return _root_readme(api, repo_id, None)
    return Path(path).read_bytes()


def _hub_call(repo_id: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a Hub API call; an HTTP error answer is a ``GaugeError`` naming the status and repo."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn(*args, **kwargs)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        detail = " ".join(str(e).split())[:200]
        hint = ("the Hub failed on its side: nothing was committed, retry later" if status and status >= 500
                else "check the repository id, your token's write access and the revision")
        raise GaugeError(f"{what} {repo_id!r} failed: the Hub answered HTTP {status or '?'} ({detail}); {hint}") \
            from None


def push_gauge(gauge: Gauge, repo_id: str, path_in_repo: str | None = None, commit_message: str | None = None,
               revision: str | None = None, token: str | bool | None = None, create_repo: bool = True,
               private: bool | None = None, endpoint: str | None = None, create_pr: bool = False,
               source_id: str | None = None, target_id: str | None = None, update_index: bool = True):
    """Upload ``gauge`` (with its card) to ``repo_id`` under ``path_in_repo`` and update the repository's root card
    index, in one commit (a pull request with ``create_pr=True``).

    Defaults to ``gauges/<gauge_id>``; a checkpoint in the same repository is untouched (only the gauge folder and the
    marked index section of the root ``README.md`` change; every other byte of that README is kept, and one that is
    not UTF-8 or has a metadata header that is not YAML is refused before anything is written). ``source_id`` /
    ``target_id`` name the models on the Hub (default: the recorded ids, local cache paths mapped back to ids); revisions are pinned through
    ``HfApi.model_info``. A side that would still be a local path (a model loaded from a folder) is refused with
    ``GaugeError``: nothing local is published. ``revision`` names a branch, created from ``main`` if missing.
    Returns the ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(gauge, Gauge):
        raise GaugeError(f"push_gauge expects a hf_gauge.Gauge, got {type(gauge).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise GaugeError(f"{repo_id!r} is not a valid Hub repository id: {e}") from None
    path_in_repo = check_path_in_repo(f"gauges/{gauge_id(gauge)}" if path_in_repo is None else path_in_repo)
    api = HfApi(endpoint=endpoint, token=token)
    gauge = Gauge(spaces=dict(gauge.spaces), source=_pin(gauge.source, source_id, api),
                  target=_pin(gauge.target, target_id, api), method=gauge.method, metrics=dict(gauge.metrics),
                  confidence=dict(gauge.confidence))
    for side, arg in (("source", "source_id"), ("target", "target_id")):
        mid = getattr(gauge, side).get("model_id")
        if is_local_path(mid):
            raise GaugeError(f"the gauge's {side} model is the local path {mid!r}, which the card and "
                             f"gauge_config.json would publish: name it on the Hub with {arg}='org/name' "
                             f"(CLI: --{arg.replace('_', '-')})")
    hops = gauge.metrics.get("hops")
    for hop in hops if isinstance(hops, list) else []:
        local = [v for k, v in (hop.items() if isinstance(hop, Mapping) else ()) if k in ("from", "to")
                 and isinstance(v, str) and is_local_path(v)]
        if local:
            raise GaugeError(f"gauge.metrics['hops'] names the local checkpoint {local[0]!r}, which gauge_config.json "
                             "would publish: compose the path from Hub ids, or drop metrics['hops'] before pushing")
    if create_repo:
        _hub_call(repo_id, "creating", api.create_repo, repo_id, private=private, exist_ok=True, repo_type="model")
    # the new root README (checked: UTF-8, a YAML mapping as metadata) before any branch or file is written
    readme = root_card(_root_readme(api, repo_id, revision), gauge, repo_id, path_in_repo) if update_index else None
    if revision is not None and not create_pr:
        _hub_call(repo_id, f"creating branch {revision!r} of", api.create_branch, repo_id, branch=revision,
                  exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="hf_gauge-push-") as tmp:
        folder = Path(tmp) / "gauge"
        save_gauge(gauge, folder)
        write_gauge_card(gauge, folder, repo_id=repo_id, path_in_repo=path_in_repo)
        ops = [CommitOperationAdd(path_in_repo=f"{path_in_repo}/{f.name}", path_or_fileobj=str(f))
               for f in sorted(folder.iterdir()) if f.is_file()]
        if readme is not None:
            ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=readme))
        return _hub_call(repo_id, "committing to", api.create_commit, repo_id, operations=ops, repo_type="model",
                         revision=revision, create_pr=create_pr,
                         commit_message=commit_message or f"Add hf_gauge gauge {path_in_repo}")


# ----------------------------------------------------------------------------------------------------------------
# Gauge's persistence methods: gauge.py holds no file I/O, so they are attached here
# ----------------------------------------------------------------------------------------------------------------
def _save_pretrained(self: Gauge, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """Save the gauge folder (``gauge.safetensors``, ``gauge_config.json``) with its card (``README.md``), the three
    as one unit (``save_gauge``'s journal carries the card)."""
    card = str(gauge_card(self)).encode()
    return _save(self, Path(save_directory), {CARD_NAME: card}, **kwargs)


def _from_pretrained(cls: type, path_or_repo_id: str | os.PathLike, **kwargs: Any) -> Gauge:
    """``load_gauge(path_or_repo_id)``."""
    return load_gauge(path_or_repo_id, **kwargs)


def _push_to_hub(self: Gauge, repo_id: str, **kwargs: Any) -> Any:
    """``push_gauge(self, repo_id)``."""
    return push_gauge(self, repo_id, **kwargs)


Gauge.save_pretrained = _save_pretrained
Gauge.from_pretrained = classmethod(_from_pretrained)
Gauge.push_to_hub = _push_to_hub
