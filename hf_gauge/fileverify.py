"""Verify a gauge straight from checkpoint files: move A's tensors through it one at a time and compare with B's.

For every tensor of checkpoint A (in storage order), the engine's moves for the gauge (``engine.moves_for``) are
applied on the fly (gathers and sign-bit flips as the engine does them, bit-exact) and the result is compared with
B's tensor of the same name. Column-only moves (readers, embeddings) never mix rows, so those tensors stream in row
blocks, read ahead by a thread; a tensor whose rows move (writers, gains) is read whole. Float tensors are moved (by the
engine's kernels) and compared as integer bits in cache-sized chunks. Memory: one block (or one tensor)
per checkpoint.

A gauge A -> B is right for a gauged copy when moved A equals B bit for bit. The report gives, per tensor group (the
tensor name with its layer index replaced by ``{i}``), the largest ``|moved A - B|`` and B's largest ``|value|``;
``ok`` when every group's largest difference is at most ``atol`` (default 0: bit-exact) and both checkpoints hold the
same tensors with the same shapes and dtypes.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch

from .engine import (Move, Scratch, check_gauge, check_moves, move_rows, move_tensor, moves_for, prepare_kernels,
                     source_names)
from .errors import GaugeError
from .filefeatures import AHEAD, CheckpointFiles, prefetched
from .gauge import Gauge
from .group import moves_as_bits
from .models import gain_fingerprint

__all__ = ["verify_files", "tensor_group", "max_abs"]

_LAYER = re.compile(r"\.\d+\.")


def tensor_group(name: str) -> str:
    """``'model.layers.7.mlp.up_proj.weight'`` -> ``'model.layers.{i}.mlp.up_proj.weight'``."""
    return _LAYER.sub(".{i}.", name)


CHUNK_BYTES = 1 << 20      # streamed blocks are moved and compared in row chunks of about this size (cache-resident)
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_INT[x.element_size()])


def max_abs(b: torch.Tensor) -> float:
    """``max |b|`` (NaN if ``b`` holds a NaN, 0 for an empty tensor). For IEEE floats the magnitude's order is the
    order of the bits without the sign bit, so one integer pass, no float temporary, no 16-bit float arithmetic."""
    if not b.numel():
        return 0.0
    if b.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        bits = _bits(b)
        top = int(torch.bitwise_and(bits, torch.iinfo(bits.dtype).max).max())      # clear the sign bit
        return float(torch.tensor([top], dtype=bits.dtype).view(b.dtype)[0].to(torch.float64))
    wide = torch.float64
    return max(float(b.max().to(wide)), -float(b.min().to(wide)))


class _Group:
    def __init__(self) -> None:
        self.tensors = self.bit_exact = 0
        self.max_abs_diff = 0.0
        self.max_abs_b = 0.0

    def add(self, moved: torch.Tensor, b: torch.Tensor) -> bool:
        """Fold one block in; True when it is bit-identical."""
        same = torch.equal(_bits(moved), _bits(b))
        wide = torch.float64 if b.dtype == torch.float64 else torch.float32
        top = max_abs(b)
        self.max_abs_b = top if top != top else max(self.max_abs_b, top)             # NaN sticks
        if not same:
            diff = (moved.to(wide) - b.to(wide)).abs().max()
            self.max_abs_diff = max(self.max_abs_diff, float(diff) if torch.isfinite(diff) else float("inf"))
        return same

    def fold_chunk(self, y: np.ndarray, pb: np.ndarray, dtype: torch.dtype) -> bool:
        """Fold one chunk of float bits in (``y``: moved A, a scratch this clobbers; ``pb``: B); True when equal."""
        same = bool(np.array_equal(y, pb))
        if not same:
            self.add(torch.from_numpy(y).view(dtype), torch.from_numpy(pb).view(dtype))
            return False
        np.bitwise_and(pb, np.iinfo(pb.dtype).max, out=y)                            # |b| as bits
        top = y.reshape(-1)[y.argmax():][:1]                                        # keeps the integer dtype
        top = float(torch.from_numpy(top).view(dtype).to(torch.float64)[0])
        self.max_abs_b = top if top != top else max(self.max_abs_b, top)
        return True

    def report(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "bit_exact": self.bit_exact, "max_abs_diff": self.max_abs_diff,
                "max_abs_b": self.max_abs_b}


def _compare_2d(g: _Group, a: torch.Tensor, b: torch.Tensor, moves: tuple[Move, ...], work: Scratch) -> bool:
    """``move_tensor(a, moves) == b`` for a 2-D float ``a`` whose moves act on axes 0 / 1, in cache-sized chunks of
    output rows, folded into ``g``: each chunk is moved by the engine (``move_rows``: gathers and sign-bit flips in
    one pass), compared, and B's magnitudes taken while it is in cache."""
    check_moves(a, moves)
    n, w = b.shape
    step = max(1, CHUNK_BYTES // max(1, w * b.element_size()))
    buf = work.like(a, (min(step, n), w), key="chunk")
    pb = _bits(b).numpy()
    same = True
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        y = move_rows(a, moves, r0, r1, buf[: r1 - r0], work)
        same &= g.fold_chunk(_bits(y).numpy(), pb[r0:r1], b.dtype)
    return same


def _chunked(x: torch.Tensor, moves: tuple[Move, ...]) -> bool:
    """Moves ``_compare_2d`` handles: a 2-D float tensor, moves on axes 0 / 1 (no stacked slices)."""
    return (x.dim() == 2 and moves_as_bits(x) and x.shape[1] > 0
            and all(m.axis in (0, 1) and m.slices is None for m in moves))


def verify_files(a: str | os.PathLike, b: str | os.PathLike, gauge: Gauge, *, atol: float = 0.0,
                 revision_a: str | None = None, revision_b: str | None = None) -> dict[str, Any]:
    """Stream checkpoints ``a`` and ``b`` (folders or Hub ids) and check ``gauge`` (A -> B) tensor by tensor.

    Returns ``ok``, ``weights_bit_exact``, ``fingerprint_match`` (moved A's final-norm fingerprint equals B's),
    ``max_abs_diff`` (over all tensors), ``groups`` (``{group: {tensors, bit_exact, max_abs_diff, max_abs_b}}``),
    ``missing_in_a`` / ``missing_in_b`` / ``mismatched`` (names), ``n_tensors``, ``bytes`` (read per checkpoint) and
    ``atol``.
    """
    if not isinstance(gauge, Gauge):
        raise GaugeError(f"verify expects a hf_gauge.Gauge, got {type(gauge).__name__}")
    if atol < 0:
        raise GaugeError(f"atol must be >= 0, got {atol}")
    with CheckpointFiles(a, revision=revision_a, label="checkpoint A") as fa, \
            CheckpointFiles(b, revision=revision_b, label="checkpoint B") as fb:
        ca, cb = fa.config, fb.config
        if ca.model_type != cb.model_type or ca.hidden_size != cb.hidden_size:
            raise GaugeError(f"checkpoints differ in architecture: {ca.model_type}/{ca.hidden_size} vs "
                             f"{cb.model_type}/{cb.hidden_size}; a gauge relates two models of one shape")
        if gauge.source.get("model_type") not in (None, ca.model_type):
            raise GaugeError(f"the gauge was fitted for model_type={gauge.source['model_type']!r} but checkpoint A is "
                             f"{ca.model_type!r}")
        check_gauge(fa.spec, ca, gauge)
        names = fa.names()
        src = source_names(fa.spec, gauge, names, files=True)    # per-expert tensors under a permutation of experts
        plan = moves_for(fa.spec, ca, gauge, names, strict=True, files=True)
        missing_in_b = sorted(n for n in names if n not in fb.entries)
        missing_in_a = sorted(n for n in fb.entries if n not in fa.entries)
        mismatched: list[str] = []
        groups: dict[str, _Group] = {}
        final = fa.spec.sites.final_norm + ".weight"
        fp_moved = fp_b = None
        scratch = Scratch()
        prepare_kernels(sum(fa.nbytes(n) for n in names))
        n_bytes = 0
        for name in names:
            if name in missing_in_b:
                continue
            if fa.shape(name) != fb.shape(name) or fa.dtype(name) != fb.dtype(name):
                mismatched.append(name)
                continue
            g = groups.setdefault(tensor_group(name), _Group())
            a_name = src.get(name, name)                     # B's tensor `name` is A's `a_name`, moved
            moves = plan[a_name]
            same = True
            streams = len(fa.shape(name)) == 2 and all(m.axis == 1 and m.slices is None for m in moves)
            if streams and fa.dtype(name).is_floating_point and fa.dtype(name).itemsize in _INT:
                slots = AHEAD + 2                                              # rows stay put: stream blocks,
                for xa, xb in prefetched(zip(fa.row_blocks(a_name, slots=slots),  # read ahead in a thread
                                             fb.row_blocks(name, slots=slots))):
                    same &= _compare_2d(g, xa, xb, moves, scratch)
            elif streams:
                for xa, xb in zip(fa.row_blocks(a_name), fb.row_blocks(name)):
                    y = move_tensor(xa, moves, out=scratch.like(xa, key="moved"), scratch=scratch) if moves else xa
                    same &= g.add(y, xb)
            else:
                xa, xb = fa.read(a_name, reuse="t"), fb.read(name, reuse="t")
                if _chunked(xa, moves) and name != final:
                    same = _compare_2d(g, xa, xb, moves, scratch)
                else:
                    y = move_tensor(xa, moves, out=scratch.like(xa, key="moved"), scratch=scratch) if moves else xa
                    same = g.add(y, xb)
                if name == final:
                    fp_moved, fp_b = gain_fingerprint(y), gain_fingerprint(xb)
            g.tensors += 1
            g.bit_exact += int(same)
            n_bytes += fa.nbytes(name)
    rep = {k: v.report() for k, v in sorted(groups.items())}
    max_diff = max((v["max_abs_diff"] for v in rep.values()), default=0.0)
    complete = not (missing_in_a or missing_in_b or mismatched)
    exact = complete and all(v["bit_exact"] == v["tensors"] for v in rep.values())
    return {"ok": complete and max_diff <= atol, "weights_bit_exact": exact,
            "fingerprint_match": fp_moved is not None and fp_moved == fp_b, "max_abs_diff": max_diff,
            "groups": rep, "missing_in_a": missing_in_a, "missing_in_b": missing_in_b, "mismatched": mismatched,
            "n_tensors": sum(v["tensors"] for v in rep.values()), "bytes": n_bytes, "atol": atol}
