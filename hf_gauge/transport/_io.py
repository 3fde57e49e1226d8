"""Shared helpers for transport handlers: gauge provenance records, element lookup, atomic writes, engine moves.

Convention (gauge-math.md): a gauge ``g`` maps the source chart to the target chart, ``x_B = g(x_A)``, with
``g(x)[j] = sign[j] * x[perm[j]]``. Every move here is a gather plus a ±1 multiply (bit-exact).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..atomic import atomic_path
from ..engine import Move, move_tensor, moves_for
from ..errors import GaugeError
from ..gauge import check_space_name
from ..group import SignedPermutation
from ..kinds import get_kind
from ..specs import SPECS, ArchSpec, get_spec
from ..view import ConfigView, spec_for, unwrap

GAUGE_RECORD_FILE = "hf_gauge_transport.json"


# ------------------------------------------------------------------------------------------------ provenance
def gauge_fingerprint(gauge) -> str:
    """A short sha256 of every space's (name, perm, sign): identifies the gauge an object went through."""
    h = hashlib.sha256()
    for name, el in gauge.spaces.items():
        h.update(name.encode())
        h.update(el.perm.numpy().tobytes())
        h.update(el.sign.numpy().tobytes())
    return h.hexdigest()[:16]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def gauge_record(gauge, **extra: Any) -> dict[str, Any]:
    """JSON-safe description of ``gauge`` (fingerprint, method, source/target charts, space sizes)."""
    return _jsonable({
        "fingerprint": gauge_fingerprint(gauge),
        "method": gauge.method,
        "source": gauge.source,
        "target": gauge.target,
        "spaces": {k: v.size for k, v in gauge.spaces.items()},
        "positive_fraction": {k: round(v.positive_fraction, 6) for k, v in gauge.spaces.items()},
        **extra,
    })


# ------------------------------------------------------------------------------------------------ elements
def element(gauge, space: str) -> SignedPermutation | None:
    """The gauge's element on ``space`` (None: the gauge is the identity there)."""
    check_space_name(space)
    return gauge.spaces.get(space)


def move_of(el: SignedPermutation | None, axis: int, signed: bool = True) -> tuple[Move, ...]:
    """The engine ``Move`` of ``el`` along ``axis`` (signs only when ``signed``)."""
    if el is None or el.is_identity:
        return ()
    sign = el.sign if (signed and not el.is_permutation) else None
    return (Move(axis, el.perm, sign),)


# ------------------------------------------------------------------------------------------------ engine moves
def moves_for_names(spec: ArchSpec, config, gauge, names: Iterable[str]) -> dict[str, tuple[Move, ...]]:
    """Engine moves of every name (strict: an uncovered name raises ``GaugeError`` naming it)."""
    return moves_for(spec, config, gauge, list(names), strict=True)


def moves_heads(gauge, spec: ArchSpec | None = None) -> bool:
    """True when a space of ``gauge`` is of a grouped kind (attention heads: moving it needs the head geometry),
    in ``spec`` or, without one, in any registered spec that declares the space."""
    specs = [spec] if spec is not None else list({id(s): s for s in SPECS.values()}.values())
    for name in gauge.spaces:
        for sp in specs:
            try:
                tmpl, _ = sp.parse_space(name)
            except GaugeError:
                continue
            if get_kind(sp.spaces[tmpl].kind).grouped:
                return True
    return False


def spec_and_config(gauge, *, model=None, config=None, model_type: str | None = None,
                    spec: ArchSpec | None = None, what: str = "object") -> tuple[ArchSpec, ConfigView]:
    """Resolve the architecture spec and a config view (for head geometry) from kwargs or the gauge's provenance."""
    if model is not None:
        config = config or unwrap(model).config
    if config is not None and hasattr(config, "config") and not hasattr(config, "hidden_size"):
        config = config.config
    if config is not None:
        config = ConfigView.of(config)      # a composite (vision-language) config: the text model's dimensions
    if spec is None:
        mt = model_type or (getattr(config, "model_type", None) if config is not None else None) \
            or gauge.source.get("model_type")
        if mt is None:
            raise GaugeError(
                f"cannot tell which architecture this {what} belongs to: pass model_type='llama' (or spec=, config=, "
                "model=), or use a gauge whose source records model_type"
            )
        spec = get_spec(mt)
    # the object's own architecture (given, or from its model's config) must be the one the gauge was fitted on:
    # llama / mistral / qwen2 / qwen3 share one spec and one key layout, so the keys alone cannot tell them apart
    own = model_type or (getattr(config, "model_type", None) if config is not None else None)
    if own is not None and gauge.source.get("model_type") not in (None, own):
        raise GaugeError(f"the gauge was fitted for model_type={gauge.source['model_type']!r} but the {what} is for "
                         f"{own!r}: an object of another architecture cannot be transported through it")
    if config is None:
        if moves_heads(gauge, spec):
            article = "an" if what[:1].lower() in "aeiou" else "a"
            raise GaugeError(f"this gauge moves attention heads; transporting {article} {what} through it needs the "
                             "model's head geometry: pass config= (the base model's config) or model= (on the command "
                             "line: --config BASE_FOLDER_OR_CONFIG_JSON)")
        return spec, ConfigView(None, model_type=spec.model_types[0])
    return spec_for(config, spec), ConfigView.of(config)


def move_named(moves: dict[str, tuple[Move, ...]], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply resolved moves to every tensor (new tensors; width mismatches name the key)."""
    out = {}
    for k, t in tensors.items():
        try:
            out[k] = move_tensor(t.detach(), moves[k])
        except GaugeError as e:
            raise GaugeError(f"{k}: {e}") from None
    return out


# ------------------------------------------------------------------------------------------------ atomic writes
def read_safetensors(path: Path, hint: str = "re-save or re-download it") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, __metadata__)`` of a safetensors file; a corrupt or truncated file is a ``GaugeError``
    naming it (``hint`` says what to do instead)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise GaugeError(f"{path} is not a valid safetensors file ({e}); {hint}") from None


def check_out(src: Path | None, out: Path) -> Path:
    """Refuse writing onto the input or into an existing non-empty path."""
    out = Path(out)
    if src is not None and out.resolve() == Path(src).resolve():
        raise GaugeError(f"refusing to overwrite the input {src}: choose another output path")
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            return out
        raise GaugeError(f"output {out} already exists and is not empty; remove it or choose another path")
    return out


@contextmanager
def atomic_dir(out: Path, src: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success fsync it and rename it to ``out`` (never a half-written ``out``)."""
    out = check_out(src, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, directory=True) as tmp:
        yield tmp


@contextmanager
def atomic_file(out: Path, src: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling file path; on success fsync it and rename it onto ``out``."""
    out = check_out(src, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        yield tmp


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".gguf")


def copy_other_files(src: Path, files: Mapping[str, Path], dst: Path, skip: Iterable[str],
                     chart_free: Iterable[str] = ()) -> list[str]:
    """Copy every other top-level file of ``src`` (READMEs, configs) into ``dst`` as a new regular file; ``files`` is
    ``inputs.audit_folder(src)`` (links and special files already checked). Weight-like files must be listed in
    ``chart_free``: a weight file or subfolder this handler does not understand is refused rather than copied unmoved.
    """
    skip, chart_free = set(skip), set(chart_free)
    copied = []
    for rel, path in files.items():
        name = rel.split("/")[0]
        if name in skip or name == GAUGE_RECORD_FILE:
            continue
        if name != rel:
            raise GaugeError(f"{src} contains a subfolder {name!r} that hf_gauge does not know how to transport; "
                             "transport it separately")
        if Path(name).suffix in _WEIGHT_SUFFIXES and name not in chart_free:
            raise GaugeError(f"{src} contains {name!r}, a weight file hf_gauge does not know how to transport; "
                             "refusing to copy it unmoved into the target chart")
        shutil.copyfile(path, dst / name)
        copied.append(name)
    return copied


def write_record(dst: Path, gauge, **extra: Any) -> None:
    """Write the gauge provenance sidecar (``hf_gauge_transport.json``) into an output folder."""
    (dst / GAUGE_RECORD_FILE).write_text(json.dumps(gauge_record(gauge, **extra), indent=2) + "\n")
