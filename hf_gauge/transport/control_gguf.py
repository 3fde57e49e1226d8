"""repeng control-vector ``.gguf`` files (``ControlVector.export_gguf``): read with the ``gguf`` package, moved,
written back as ``.gguf`` (the same layout) or ``.safetensors`` (``direction.<L>`` tensors).

Layout (repeng 0.4): ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model_type),
``controlvector.layer_count``, one tensor ``direction.<L>`` ``[d]`` per layer, added to the output of block L. Each
direction is a residual-stream vector: ``v_B = g(v_A)`` (``v_B[j] = sign[j] * v_A[perm[j]]``). Other GGUF files
(model weights) are refused.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import GaugeError
from ._io import atomic_file, gauge_record
from .vectors import move_vector

ARCH = "controlvector"
_DIRECTION = re.compile(r"^direction\.(\d{1,6})$")


def _string_field(reader, key: str) -> str | None:
    f = reader.get_field(key)
    if f is None or not len(f.parts):
        return None
    return bytes(f.parts[-1]).decode("utf-8", errors="replace")


def is_control_gguf(path: Path) -> bool:
    """A ``.gguf`` file (by name; the content is checked when read)."""
    return Path(path).suffix == ".gguf" and Path(path).is_file()


def read_control_gguf(path: str | Path) -> tuple[str, dict[int, np.ndarray]]:
    """``(model_hint, {layer: direction [d]})`` of a repeng control-vector ``.gguf`` file; ``GaugeError`` otherwise."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GaugeError("reading .gguf control vectors needs the gguf package: pip install gguf") from None
    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise GaugeError(f"{path} is not a readable GGUF file: {' '.join(str(e).split())[:200]}") from None
    arch = _string_field(reader, "general.architecture")
    if arch != ARCH:
        raise GaugeError(f"{path} is a GGUF file of architecture {arch!r}, not a repeng control vector "
                         f"({ARCH!r}); model weights in GGUF are not transported (load them with transformers and "
                         "apply_gauge)")
    hint = _string_field(reader, f"{ARCH}.model_hint")
    if hint is None:
        raise GaugeError(f"{path} has no {ARCH}.model_hint field; re-export it with ControlVector.export_gguf")
    dirs: dict[int, np.ndarray] = {}
    names: dict[int, str] = {}
    for t in reader.tensors:
        m = _DIRECTION.match(t.name)
        if m is None:
            raise GaugeError(f"{path}: unexpected tensor {t.name!r} (a control vector holds direction.<layer>)")
        layer = int(m.group(1))
        if layer in names:
            raise GaugeError(f"{path}: tensors {names[layer]!r} and {t.name!r} both give layer {layer}; one would "
                             "silently replace the other. Re-export the control vector with one direction per layer")
        names[layer] = t.name
        arr = np.array(t.data)
        if arr.ndim != 1 or arr.dtype.kind != "f":
            raise GaugeError(f"{path}: {t.name} must be a 1-D float vector, got shape {arr.shape} {arr.dtype}")
        dirs[layer] = arr
    if not dirs:
        raise GaugeError(f"{path} holds no direction.<layer> tensor")
    return hint, dirs


def write_control_gguf(path: Path, model_hint: str, directions: dict[int, np.ndarray]) -> None:
    """Write the repeng layout (what ``ControlVector.export_gguf`` writes) to ``path``."""
    from gguf import GGUFWriter
    writer = GGUFWriter(str(path), ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(directions))
    for layer, v in directions.items():
        writer.add_tensor(f"direction.{layer}", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transport_control_gguf(gauge, src: str | Path, out: str | Path) -> Path:
    """Move every direction of a control-vector ``.gguf`` into the target chart; ``out`` ending in ``.gguf`` keeps
    the format, ``.safetensors`` writes ``direction.<L>`` tensors with the gauge record in the metadata."""
    src, out = Path(src), Path(out)
    if out.suffix not in (".gguf", ".safetensors"):
        raise GaugeError(f"write a transported control vector as .gguf or .safetensors, not {out.name!r}")
    hint, dirs = read_control_gguf(src)
    moved = {}
    for layer, v in dirs.items():
        try:
            t = move_vector(gauge, torch.from_numpy(np.ascontiguousarray(v)), what=f"direction.{layer}")
        except GaugeError as e:
            raise GaugeError(f"{src} direction.{layer}: {e}") from None
        moved[layer] = t.numpy().copy()
    with atomic_file(out, src) as tmp:
        if out.suffix == ".gguf":
            write_control_gguf(tmp, hint, moved)
        else:
            from safetensors.numpy import save_file
            save_file({f"direction.{k}": v for k, v in moved.items()}, str(tmp),
                      metadata={"model_hint": hint, "hf_gauge": json.dumps(gauge_record(gauge))})
    return out
