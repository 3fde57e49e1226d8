"""Verify a gauge straight from checkpoint files: move A's tensors through it one at a time and compare with B's.

For every tensor of checkpoint A (in storage order), the engine's moves for the gauge (``engine.moves_for``) are
applied on the fly (gathers and sign-bit flips as the engine does them, bit-exact) and the result is compared with
B's tensor of the same name. Both checkpoints are memory-mapped (``CheckpointFiles.mapped_blocks``: no copy, pages
released block by block): column-only moves (readers, embeddings) never mix rows, so A's row blocks are compared with
B's side by side; a tensor whose rows move (writers) is mapped whole from A while B's blocks stream; gains and other
small tensors are read whole. Float tensors are compared as integer bits by the engine's compiled kernel in one pass
(``engine.compare_rows``: moved rows are never written out; spans of rows on threads), or moved in cache-sized chunks
and compared. Memory: a block of B and a block (or one tensor) of A mapped at a time.

A gauge A -> B is right for a gauged copy when moved A equals B bit for bit. The report gives, per tensor group (the
tensor name with its layer index replaced by ``{i}``), the largest ``|moved A - B|`` and B's largest ``|value|``;
``ok`` when every group's largest difference is at most ``atol`` (default 0: bit-exact) and both checkpoints hold the
same tensors with the same shapes and dtypes.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from .engine import (Move, Scratch, check_gauge, compare_rows, move_rows, move_tensor, moves_for,
                     prepare_kernels, source_names)
from .errors import GaugeError
from .filefeatures import CheckpointFiles
from .gauge import Gauge
from .group import moves_as_bits
from .view import gain_fingerprint

__all__ = ["verify_files", "tensor_group", "max_abs"]

_LAYER = re.compile(r"\.\d+\.")


def tensor_group(name: str) -> str:
    """``'model.layers.7.mlp.up_proj.weight'`` -> ``'model.layers.{i}.mlp.up_proj.weight'``."""
    return _LAYER.sub(".{i}.", name)


CHUNK_BYTES = 1 << 20      # streamed blocks are moved and compared in row chunks of about this size (cache-resident)
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_INT[x.element_size()])


def _from_bits(top: int, dtype: torch.dtype) -> float:
    """The float whose bits (integer view of ``dtype``) are ``top``, as a Python float."""
    return float(torch.tensor([top], dtype=_INT[dtype.itemsize]).view(dtype).to(torch.float64)[0])


def max_abs(b: torch.Tensor) -> float:
    """``max |b|`` (NaN if ``b`` holds a NaN, 0 for an empty tensor). For IEEE floats the magnitude's order is the
    order of the bits without the sign bit, so one integer pass, no float temporary, no 16-bit float arithmetic."""
    if not b.numel():
        return 0.0
    if b.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        bits = _bits(b)
        return _from_bits(int(torch.bitwise_and(bits, torch.iinfo(bits.dtype).max).max()), b.dtype)  # no sign bit
    wide = torch.float64
    return max(float(b.max().to(wide)), -float(b.min().to(wide)))


class _Group:
    def __init__(self) -> None:
        self.tensors = self.bit_exact = 0
        self.max_abs_diff = 0.0
        self.max_abs_b = 0.0

    def add_top(self, top: float) -> None:
        self.max_abs_b = top if top != top else max(self.max_abs_b, top)             # NaN sticks

    def add(self, moved: torch.Tensor, b: torch.Tensor) -> bool:
        """Fold one block in (B's magnitudes and the difference); True when it is bit-identical."""
        self.add_top(max_abs(b))
        return self.add_diff(moved, b)

    def add_diff(self, moved: torch.Tensor, b: torch.Tensor) -> bool:
        """Fold one block's largest ``|moved - b|`` in; True when it is bit-identical."""
        same = torch.equal(_bits(moved), _bits(b))
        wide = torch.float64 if b.dtype == torch.float64 else torch.float32
        if not same:
            diff = (moved.to(wide) - b.to(wide)).abs().max()
            self.max_abs_diff = max(self.max_abs_diff, float(diff) if torch.isfinite(diff) else float("inf"))
        return same

    def report(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "bit_exact": self.bit_exact, "max_abs_diff": self.max_abs_diff,
                "max_abs_b": self.max_abs_b}


def _compare_2d(g: _Group, a: torch.Tensor, b: torch.Tensor, moves: tuple[Move, ...], r0: int, work: Scratch
                ) -> bool:
    """Rows ``r0:r0 + len(b)`` of ``move_tensor(a, moves)`` against ``b`` for a 2-D float ``a`` whose moves act on
    axes 0 / 1, folded into ``g``. The compiled kernel compares in one pass and takes B's magnitudes
    (``engine.compare_rows``); without it, or to measure a difference, cache-sized chunks of moved rows are made by
    the engine (``move_rows``) and compared."""
    n, w = b.shape
    fast = compare_rows(a, moves, r0, r0 + n, b)
    if fast is not None:
        g.add_top(_from_bits(fast[1], b.dtype))
        if fast[0]:
            return True
    step = max(1, CHUNK_BYTES // max(1, w * b.element_size()))
    buf = work.like(a, (min(step, n), w), key="chunk")
    same = True
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        y = move_rows(a, moves, r0 + c0, r0 + c1, buf[: c1 - c0], work)
        same &= g.add(y, b[c0:c1]) if fast is None else g.add_diff(y, b[c0:c1])    # the kernel took B's magnitudes
    return same


def _kind(shape: tuple[int, ...], dtype: torch.dtype, moves: tuple[Move, ...], final: bool) -> str:
    """How a tensor is checked: ``stream`` (2-D, columns move or nothing: row blocks of A and B side by side),
    ``rows`` (2-D float, rows move: A whole, B in row blocks), ``whole`` (both whole: gains, stacked, the rest)."""
    if len(shape) != 2 or not shape[0] or not shape[1] or final:
        return "whole"
    if all(m.axis == 1 and m.slices is None for m in moves):
        return "stream"
    if dtype.is_floating_point and dtype.itemsize in _INT and all(m.axis in (0, 1) and m.slices is None for m in moves):
        return "rows"
    return "whole"


def _pairs(fa: CheckpointFiles, fb: CheckpointFiles, jobs: list[tuple[str, str, tuple[Move, ...], str]]):
    """``(job, A part, B part, r0, last)`` for every job in turn: A's block (``stream``) or whole tensor, B's block of
    rows ``r0:`` (or whole); ``last`` marks a tensor's last item. Blocks are views of the memory-mapped shards
    (``CheckpointFiles.mapped_blocks``: no copy), valid until the next item; ``whole`` tensors are read."""
    for job in jobs:
        name, a_name, _, kind = job
        if kind == "whole":
            yield job, fa.read(a_name), fb.read(name), 0, True
            continue
        a_iter = fa.mapped_blocks(a_name, whole=kind == "rows")
        whole = next(a_iter) if kind == "rows" else None
        n, r0 = fb.shape(name)[0], 0
        try:
            for xb in fb.mapped_blocks(name):
                xa = whole if whole is not None else next(a_iter)
                yield job, xa, xb, r0, r0 + xb.shape[0] == n
                r0 += xb.shape[0]
        finally:
            a_iter.close()                                 # A's last pages leave the process


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
        src = source_names(fa.spec, gauge, names, files=True, config=ca)    # per-expert tensors under a permutation of experts
        plan = moves_for(fa.spec, ca, gauge, names, strict=True, files=True)
        missing_in_b = sorted(n for n in names if n not in fb.entries)
        missing_in_a = sorted(n for n in fb.entries if n not in fa.entries)
        mismatched: list[str] = []
        groups: dict[str, _Group] = {}
        final = fa.spec.final_norm_key(names)
        fp_moved = fp_b = None
        scratch = Scratch()
        prepare_kernels(sum(math.prod(fa.shape(n)) for n in names))
        jobs = []
        for name in names:
            if name in missing_in_b:
                continue
            if fa.shape(name) != fb.shape(name) or fa.dtype(name) != fb.dtype(name):
                mismatched.append(name)
                continue
            a_name = src.get(name, name)                     # B's tensor `name` is A's `a_name`, moved
            jobs.append((name, a_name, plan[a_name], _kind(fa.shape(name), fa.dtype(name), plan[a_name],
                                                           name == final)))
        n_bytes = 0
        same = True
        for (name, _, moves, kind), xa, xb, r0, last in _pairs(fa, fb, jobs):
            g = groups.setdefault(tensor_group(name), _Group())
            if kind != "whole" and moves_as_bits(xa) and xa.dtype.itemsize in _INT:
                same &= _compare_2d(g, xa, xb, moves, r0 if kind == "rows" else 0, scratch)
            else:
                y = move_tensor(xa, moves, out=scratch.like(xa, key="moved"), scratch=scratch) if moves else xa
                same &= g.add(y, xb)
                if name == final:
                    fp_moved, fp_b = gain_fingerprint(y), gain_fingerprint(xb)
            if last:
                g.tensors += 1
                g.bit_exact += int(same)
                n_bytes += fa.nbytes(name)
                same = True
    rep = {k: v.report() for k, v in sorted(groups.items())}
    max_diff = max((v["max_abs_diff"] for v in rep.values()), default=0.0)
    complete = not (missing_in_a or missing_in_b or mismatched)
    exact = complete and all(v["bit_exact"] == v["tensors"] for v in rep.values())
    return {"ok": complete and max_diff <= atol, "weights_bit_exact": exact,
            "fingerprint_match": fp_moved is not None and fp_moved == fp_b, "max_abs_diff": max_diff,
            "groups": rep, "missing_in_a": missing_in_a, "missing_in_b": missing_in_b, "mismatched": mismatched,
            "n_tensors": sum(v["tensors"] for v in rep.values()), "bytes": n_bytes, "atol": atol}
