"""Orthogonal maps on disk and on the Hub: ``orthogonal_map.safetensors`` (``R``, float64 ``[d, d]``) and
``orthogonal_map.json`` (``"convention": "x_B = x_A @ R"``, ``source``, ``target``, ``metrics``).

``find --method procrustes`` writes such a folder; ``load_orthogonal_map`` validates one (R square, finite,
orthogonal to 1e-6; JSON fields typed), ``push_orthogonal_map`` publishes it with a card in one commit, refusing local
model paths as ``push_gauge`` does. Only safetensors and JSON are read.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import GaugeError
from .jsonio import read_json
from .modelref import hub_model_id, is_hub_id, is_local_path
from .orthogonal import OrthogonalMap

__all__ = ["WEIGHTS_NAME", "META_NAME", "CONVENTION", "is_map_folder", "save_orthogonal_map", "load_orthogonal_map",
           "map_card", "map_id", "push_orthogonal_map", "describe_map"]

WEIGHTS_NAME = "orthogonal_map.safetensors"
META_NAME = "orthogonal_map.json"
CONVENTION = "x_B = x_A @ R"


def is_map_folder(path: str | os.PathLike) -> bool:
    """A local folder holding ``orthogonal_map.json``."""
    return (Path(path) / META_NAME).is_file()


def save_orthogonal_map(omap: OrthogonalMap, out: str | os.PathLike) -> Path:
    """``R`` as ``orthogonal_map.safetensors`` (float64) and its provenance as ``orthogonal_map.json``; a new folder
    that appears whole (atomic)."""
    from safetensors.torch import save_file

    from .transport._io import atomic_dir
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file({"R": omap.R.contiguous()}, str(tmp / WEIGHTS_NAME))
        meta = {"convention": CONVENTION, "source": omap.source, "target": omap.target, "metrics": omap.metrics}
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out


def load_orthogonal_map(folder: str | os.PathLike) -> OrthogonalMap:
    """The ``OrthogonalMap`` saved in ``folder``; ``GaugeError`` naming the file for anything invalid."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_json(folder / META_NAME, str(folder / META_NAME), "re-save it with hf-gauge find --method procrustes")
    if not isinstance(meta, dict) or meta.get("convention") != CONVENTION:
        raise GaugeError(f"{folder / META_NAME} is not an orthogonal map (its convention must be {CONVENTION!r})")
    for key in ("source", "target", "metrics"):
        if not isinstance(meta.get(key, {}), dict):
            raise GaugeError(f"{folder / META_NAME}: {key} must be a JSON object; re-save the map")
    try:
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except FileNotFoundError:
        raise GaugeError(f"{folder} has no {WEIGHTS_NAME}") from None
    except Exception as e:                      # safetensors raises its own errors on a bad header
        raise GaugeError(f"{folder / WEIGHTS_NAME} is not a valid safetensors file ({e})") from None
    R = tensors.get("R")
    if set(tensors) != {"R"} or R is None or not R.dtype.is_floating_point or not bool(R.isfinite().all()):
        raise GaugeError(f"{folder / WEIGHTS_NAME} must hold one finite float tensor 'R' (got {sorted(tensors)[:5]})")
    try:
        return OrthogonalMap(R, source=meta.get("source"), target=meta.get("target"), metrics=meta.get("metrics"))
    except GaugeError as e:
        raise GaugeError(f"{folder / WEIGHTS_NAME}: {e}") from None


def map_id(omap: OrthogonalMap) -> str:
    """12 hex digits of ``R``'s sha256: the default folder name on the Hub."""
    return hashlib.sha256(omap.R.numpy().tobytes()).hexdigest()[:12]


def map_card(omap: OrthogonalMap, repo_id: str, path_in_repo: str):
    """The ``ModelCard`` of a published orthogonal map: what it is (not a gauge: it transports activation-level
    objects and cannot be applied to weights), provenance, and a snippet that loads it."""
    from huggingface_hub import ModelCard, ModelCardData

    src, tgt = omap.source.get("model_id") or "the source model", omap.target.get("model_id") or "the target model"
    base = omap.source.get("model_id") or ""
    data = ModelCardData(library_name="hf_gauge", tags=["hf_gauge", "orthogonal-map"],
                         base_model=base if is_hub_id(base) else None)
    text = (f"# Orthogonal map: `{src}` → `{tgt}`\n\nAn orthogonal map `R` ({omap.width}×{omap.width}, float64) "
            f"fitted by orthogonal Procrustes on the two models' residual activations, with `{CONVENTION}`. Unlike a "
            "gauge it is approximate: it transports activation-level objects (steering vectors, SAEs) but cannot be "
            "applied to the model's weights.\n\n```python\nfrom huggingface_hub import snapshot_download\n"
            "from hf_gauge.omapio import load_orthogonal_map\n\n"
            f"folder = snapshot_download(\"{repo_id}\", allow_patterns=[\"{path_in_repo}/*\"])\n"
            f"omap = load_orthogonal_map(f\"{{folder}}/{path_in_repo}\")\nprint(omap)\n```\n\n"
            f"Files: `{WEIGHTS_NAME}` (`R`) and `{META_NAME}` (convention, provenance, fit metrics).\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def push_orthogonal_map(omap: OrthogonalMap, repo_id: str, path_in_repo: str | None = None,
                        commit_message: str | None = None, revision: str | None = None,
                        token: str | bool | None = None, private: bool | None = None, endpoint: str | None = None,
                        create_pr: bool = False, source_id: str | None = None, target_id: str | None = None):
    """Upload ``omap`` (its two files and a card) to ``repo_id`` under ``path_in_repo`` (default
    ``orthogonal_maps/<map id>``) in one commit; ``source_id``/``target_id`` name the models on the Hub. A side that
    would be published as a local path is refused (``GaugeError``). Returns the ``CommitInfo``."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .hub import check_path_in_repo
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise GaugeError(f"{repo_id!r} is not a valid Hub repository id: {e}") from None
    path_in_repo = check_path_in_repo(f"orthogonal_maps/{map_id(omap)}" if path_in_repo is None else path_in_repo)
    sides = {}
    for side, given, arg in (("source", source_id, "source_id"), ("target", target_id, "target_id")):
        desc = dict(getattr(omap, side))
        mid, rev = hub_model_id(given or desc.get("model_id"), None if given else desc.get("revision"))
        if is_local_path(mid):
            raise GaugeError(f"the map's {side} model is the local path {mid!r}, which the card and {META_NAME} would "
                             f"publish: name it on the Hub with {arg}='org/name' (CLI: --{arg.replace('_', '-')})")
        if mid:
            desc["model_id"], desc["revision"] = mid, rev
        sides[side] = desc
    omap = OrthogonalMap(omap.R, source=sides["source"], target=sides["target"], metrics=omap.metrics, check=False)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="hf_gauge-push-") as tmp:
        folder = save_orthogonal_map(omap, Path(tmp) / "map")
        map_card(omap, repo_id, path_in_repo).save(str(folder / "README.md"))
        ops = [CommitOperationAdd(path_in_repo=f"{path_in_repo}/{f.name}", path_or_fileobj=str(f))
               for f in sorted(folder.iterdir()) if f.is_file()]
        return api.create_commit(repo_id, operations=ops, repo_type="model", revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Add hf_gauge orthogonal map {path_in_repo}")


def describe_map(omap: OrthogonalMap) -> str:
    """A human-readable summary (``hf-gauge show``)."""
    d = omap.diagnostics()
    lines = [f"orthogonal map {map_id(omap)}  method=procrustes  d={omap.width}  ({CONVENTION})"]
    for side in ("source", "target"):
        desc = getattr(omap, side)
        lines.append(f"{side}: " + (", ".join(f"{k}={v}" for k, v in desc.items() if v not in (None, ""))
                                    or "unknown"))
    lines.append(f"||R - I|| {d['dist_identity']:.3g} (random rotation {d['dist_identity_random']:.3g}), distance to "
                 f"the nearest signed permutation {d['dist_signed_permutation']:.3g}, det {d['det']:+.0f}")
    if omap.metrics:
        lines.append("metrics: " + ", ".join(f"{k}={v}" for k, v in omap.metrics.items()
                                             if not isinstance(v, (list, dict))))
    lines.append("not a gauge: it transports vectors and SAEs (omap.transport), and is never applied to weights")
    return "\n".join(lines)
