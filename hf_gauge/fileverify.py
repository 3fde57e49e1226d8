"""Verify a gauge straight from checkpoint files: move A's tensors through it one at a time and compare with B's.

For every tensor of checkpoint A (in storage order), the engine's moves for the gauge (``engine.moves_for``) are
applied on the fly (``engine.move_tensor``: gathers and sign flips, bit-exact) and the result is compared with B's
tensor of the same name. Column-only moves (readers, embeddings) never mix rows, so those tensors stream in row
blocks; a tensor whose rows move (writers, gains) is read whole. Memory: one block (or one tensor) per checkpoint.

A gauge A -> B is right for a gauged copy when moved A equals B bit for bit. The report gives, per tensor group (the
tensor name with its layer index replaced by ``{i}``), the largest ``|moved A - B|`` and B's largest ``|value|``;
``ok`` when every group's largest difference is at most ``atol`` (default 0: bit-exact) and both checkpoints hold the
same tensors with the same shapes and dtypes.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch

from .engine import Scratch, check_gauge, move_tensor, moves_for, source_names
from .errors import GaugeError
from .filefeatures import CheckpointFiles
from .gauge import Gauge
from .models import gain_fingerprint

__all__ = ["verify_files", "tensor_group"]

_LAYER = re.compile(r"\.\d+\.")


def tensor_group(name: str) -> str:
    """``'model.layers.7.mlp.up_proj.weight'`` -> ``'model.layers.{i}.mlp.up_proj.weight'``."""
    return _LAYER.sub(".{i}.", name)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


class _Group:
    def __init__(self) -> None:
        self.tensors = self.bit_exact = 0
        self.max_abs_diff = 0.0
        self.max_abs_b = 0.0

    def add(self, moved: torch.Tensor, b: torch.Tensor) -> bool:
        """Fold one block in; True when it is bit-identical."""
        same = torch.equal(_bits(moved), _bits(b))
        wide = torch.float64 if b.dtype == torch.float64 else torch.float32
        if b.numel():                                   # max |b| without a |b| temporary
            self.max_abs_b = max(self.max_abs_b, float(b.max().to(wide)), -float(b.min().to(wide)))
        if not same:
            diff = (moved.to(wide) - b.to(wide)).abs().max()
            self.max_abs_diff = max(self.max_abs_diff, float(diff) if torch.isfinite(diff) else float("inf"))
        return same

    def report(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "bit_exact": self.bit_exact, "max_abs_diff": self.max_abs_diff,
                "max_abs_b": self.max_abs_b}


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
            if len(fa.shape(name)) == 2 and all(m.axis == 1 for m in moves):
                for xa, xb in zip(fa.row_blocks(a_name), fb.row_blocks(name)):   # rows stay put: stream blocks
                    y = move_tensor(xa, moves, out=scratch.like(xa, key="moved"), scratch=scratch) if moves else xa
                    same &= g.add(y, xb)
            else:
                xa, xb = fa.read(a_name, reuse="t"), fb.read(name, reuse="t")
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
