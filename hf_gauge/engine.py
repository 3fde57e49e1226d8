"""The generic engine: read an ArchSpec, resolve each tensor's moves under a Gauge, and move tensors exactly.

Every move is an index operation (gather along an axis, then multiply by ±1), so it is bit-exact in every
float dtype and never builds a d×d matrix. One engine serves live models (in place), safetensors shards on
disk, PEFT adapters (a LoRA factor inherits the axis of the module it wraps) and optimizer state.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Iterable

import torch

from .errors import GaugeError
from .gauge import Gauge
from .group import as_bits, flip_, moves_as_bits, sign_operand
from .kinds import get_kind
from .specs import ArchSpec
from .specs.base import Axis, fill, range_values
from .view import ConfigView, resolve_name

__all__ = ["Move", "resolve_name", "axes_for", "moves_for", "move_tensor", "move_tensor_", "move_tensors_",
           "move_rows", "row_mover", "compare_rows", "Scratch", "kernel_mode", "loaded_kernels", "prepare_kernels",
           "check_moves", "check_gauge", "segment_positions", "segment_spans", "source_names", "stack_count",
           "space_sizes"]

def axes_for(spec: ArchSpec, name: str, files: bool = False) -> tuple[Axis, ...] | None:
    """Axes of any tensor name (plain, PEFT-wrapped, LoRA factor, DoRA magnitude); None if the spec lacks it.
    ``files=True``: a name as checkpoint files store it (``ArchSpec.file_rules`` first)."""
    memo = spec._axes_memo
    key = (name, files)
    if key not in memo:
        memo[key] = _resolve_axes(spec, name, files)
    return memo[key]


def _unsigned(a: Axis) -> Axis:
    return dataclasses.replace(a, signed=False, segments=tuple(_unsigned(p) for p in a.segments))


def _stacked_factor(axes: tuple[Axis, ...], role: str, transposed: bool = False) -> tuple[Axis, ...] | None:
    """LoRA factors of a stacked parameter ``W [E, out, in]`` (``transposed``: ``[E, in, out]``, experts that declare
    ``is_transposed`` as gpt-oss's) (PEFT's ``ParamWrapper`` on fused experts), seen as ``lora_A [E, r, in]`` (its
    ``[E * r, in]`` reshaped) and ``lora_B [out, r, E]`` (its ``[out, r * E]``): each expert's slice moves by the
    parameter's own axes, and the experts move as the stacked axis does."""
    st = next(a for a in axes if a.stack)
    if st.axis != 0 or role not in ("lora_A", "lora_B"):
        return None
    inp, out = (1, 2) if transposed else (2, 1)
    if role == "lora_A":
        return (st,) + tuple(a.on(2) for a in axes if a.axis == inp)
    return tuple(a.on(0) for a in axes if a.axis == out) + (st.on(2),)


def _resolve_axes(spec: ArchSpec, name: str, files: bool) -> tuple[Axis, ...] | None:
    base, role = resolve_name(name)
    if files:                     # a base model's or QA head's checkpoint names its body differently
        old, new = spec.file_alias(base)
        base = new + base[len(old):]
    hit = spec.rule_for(base, files)
    axes = None if hit is None else tuple(a.filled(hit[1]) for a in hit[0].axes)
    inp, out = (0, 1) if hit is not None and hit[0].transposed else (1, 0)     # Conv1D weights are [in, out]
    if axes is None and role != "weight" and base.endswith(".weight"):
        bare = spec.rule_for(base[: -len(".weight")], files=files)      # a bare parameter (fused experts)
        if bare is not None and any(a.stack for a in bare[0].axes):
            return _stacked_factor(tuple(a.filled(bare[1]) for a in bare[0].axes), role, bare[0].transposed)
    if axes is None and role == "weight" and base.endswith(".bias"):
        return None
    if axes is None or role == "weight":
        return axes
    if role == "lora_A":          # [r, in]: inherits the wrapped module's input axis
        return tuple(a.on(1) for a in axes if a.axis == inp)
    if role in ("lora_B", "lora_B_bias"):   # [out, r] / [out]: inherits the output axis
        return tuple(a.on(0) for a in axes if a.axis == out)
    if role == "lora_emb_A":      # [r, vocab]: the vocab axis never moves
        return ()
    if role == "lora_emb_B":      # [d, r]: the embedding's residual column axis becomes rows
        return tuple(a.on(0) for a in axes if a.axis == 1)
    if role == "magnitude":       # DoRA norms: permuted with what they normalise, never signed
        # nn.Linear [out, in]: one norm per output row (axis 0; Conv1D [in, out]: axis 1). nn.Embedding [vocab, d]:
        # PEFT normalises per residual column, so the [d] magnitude follows the embedding's axis 1.
        src = 1 if base == spec.sites.embed + ".weight" and all(a.axis == 1 for a in axes) else out
        return tuple(_unsigned(a).on(0) for a in axes if a.axis == src)
    raise AssertionError(role)


# ----------------------------------------------------------------------------------------------------------------
# Resolved moves
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Move:
    """Gather ``axis`` by ``index`` (int64), then multiply by ``sign`` (int8, or None for +1 everywhere).

    A stacked move (``slices`` given) applies ``slices[k]`` to slice ``k`` of ``axis`` (``t.select(axis, k)``; their
    axes are numbered in the slice), then, when ``permutes``, re-indexes the slices by ``index`` (output slice ``j``
    is moved source slice ``index[j]``): per-expert moves of fused expert tensors and the permutation of experts."""

    axis: int
    index: torch.Tensor
    sign: torch.Tensor | None
    _memo: dict = field(default_factory=dict, compare=False, repr=False)
    slices: tuple | None = None
    permutes: bool = False

    def index_on(self, device: torch.device) -> torch.Tensor:
        """``index`` on ``device`` (cached: a move is applied to many tensors)."""
        return self.cached(("index", str(device)), lambda: self.index.to(device))

    def signer(self, like: torch.Tensor, float_bits: bool) -> torch.Tensor | None:
        """What applies ``sign`` to ``like``, cached: an XOR mask of sign bits when ``like`` is a float tensor's
        integer view (``float_bits``, see ``as_bits``), otherwise ±1 to multiply by."""
        if self.sign is None:
            return None
        return self.cached(("sign", like.dtype, str(like.device), float_bits),
                           lambda: sign_operand(self.sign, like, float_bits))

    def cached(self, key: object, make):
        """``make()``, computed once per move (a move is applied to many tensors)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def without_signs(self) -> "Move":
        """The same re-indexing with every sign +1 (second moments of optimizers)."""
        if self.slices is not None:
            return Move(self.axis, self.index, None, slices=tuple(tuple(m.without_signs() for m in s)
                                                                   for s in self.slices), permutes=self.permutes)
        return Move(self.axis, self.index, None)


def segment_spans(spec: ArchSpec, config, axis: Axis, sizes: dict[str, int] | None = None
                  ) -> list[tuple[int, int, Axis]]:
    """``(start, length, part)`` of each part of a (possibly fused) axis along the tensor axis."""
    cfg = ConfigView.of(config)
    dims = spec.dims(cfg)
    out, start = [], 0
    for part in axis.parts():
        if part.space:
            if sizes is None:
                sizes = spec.space_sizes(cfg)
            # a space absent from this config (``Space.when``) still spans its entries: its size from its template
            n = sizes[part.space] if part.space in sizes else int(spec.space(part.space).size(cfg))
            if part.kv:
                n = get_kind(spec.space(part.space).kind).reduced_size(n, cfg)
            n *= dims[part.block] if part.block else 1
        else:
            n = dims[part.block]
        out.append((start, n, part))
        start += n
    return out


def _interleaving(spec: ArchSpec, config, axis: Axis, spans: list[tuple[int, int, Axis]]) -> torch.Tensor | None:
    """For a fused axis interleaved over groups (``Axis.groups``; ``Axis.interleave``: one group per entry): position
    along the tensor axis of each entry of the part-major layout ``[part0 | part1 | ...]`` of ``spans``; None for a
    plain fused axis."""
    lengths = [n for _, n, _ in spans]
    if axis.interleave:
        if len(set(lengths)) != 1:
            raise GaugeError(f"spec {spec.name!r}: interleaved parts must have one length, these have "
                             f"{', '.join(map(str, lengths))} entries")
        n_groups = lengths[0]
    elif axis.groups:
        n_groups = int(spec.dims(ConfigView.of(config))[axis.groups])
        if n_groups < 1 or any(n % n_groups for n in lengths):
            raise GaugeError(f"spec {spec.name!r}: the fused parts ({', '.join(map(str, lengths))} entries) do "
                             f"not split into {n_groups} groups ({axis.groups!r})")
    else:
        return None
    chunks = [n // n_groups for _, n, _ in spans]
    width, off = sum(chunks), 0
    where = torch.empty(sum(n for _, n, _ in spans), dtype=torch.int64)
    for (start, n, _), c in zip(spans, chunks):
        x = torch.arange(n)
        where[start:start + n] = (x // c) * width + off + x % c
        off += c
    return where


def segment_positions(spec: ArchSpec, config, axis: Axis, part: Axis) -> torch.Tensor:
    """Positions along the tensor axis of the entries of ``part`` of a fused axis, in the part's own order."""
    spans = segment_spans(spec, config, axis)
    start, n = next((s0, n0) for s0, n0, p0 in spans if p0 is part)
    where = _interleaving(spec, config, axis, spans)
    return torch.arange(start, start + n) if where is None else where[start:start + n]


class _Expander:
    """Turns (Axis, SignedPermutation) into index/sign vectors, with block, group-reduction and segment expansion
    (cached)."""

    def __init__(self, spec: ArchSpec, config, gauge: Gauge) -> None:
        self.spec, self.config, self.gauge = spec, ConfigView.of(config), gauge
        self._dims: dict[str, int] | None = None
        self._sizes: dict[str, int] | None = None
        self._cache: dict[Axis, Move | None] = {}

    def _part(self, a: Axis) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        el = self.gauge.spaces.get(a.space) if a.space else None
        if el is None or el.is_identity:
            return None
        perm, sign = el.perm, el.sign if (a.signed and not el.is_permutation) else None
        if a.kv:
            perm = get_kind(self.spec.space(a.space).kind).reduce(el, self.config)
            sign = None
        if a.block:
            if self._dims is None:
                self._dims = self.spec.dims(self.config)
            b = self._dims[a.block]
            perm = (perm[:, None] * b + torch.arange(b)).reshape(-1)
            sign = sign.repeat_interleave(b) if sign is not None else None
        return perm, sign

    def __call__(self, a: Axis) -> Move | None:
        if a in self._cache:
            return self._cache[a]
        if not a.segments:
            got = self._part(a)
            mv = None if got is None else Move(a.axis, got[0], got[1])
        else:
            if self._sizes is None:
                self._sizes = self.spec.space_sizes(self.config)
            idx, sgn, moved, signed = [], [], False, False
            spans = segment_spans(self.spec, self.config, a, self._sizes)
            for start, n, part in spans:
                got = self._part(part)
                moved |= got is not None
                p, s = got if got is not None else (torch.arange(n), None)
                if p.numel() != n:
                    raise GaugeError(f"segment {part.space or part.block!r} spans {n} entries but its element "
                                     f"moves {p.numel()}")
                idx.append(p + start)
                sgn.append(s)
                signed |= s is not None
            mv = None
            if moved:
                sign = (torch.cat([s if s is not None else torch.ones(t.numel(), dtype=torch.int8)
                                   for s, t in zip(sgn, idx)]) if signed else None)
                index = torch.cat(idx)
                where = _interleaving(self.spec, self.config, a, spans)
                if where is not None:          # the same move, written in the interleaved layout
                    index[where] = where[index].clone()
                    if sign is not None:
                        sign[where] = sign.clone()
                mv = Move(a.axis, index, sign)
        self._cache[a] = mv
        return mv

    def stacked(self, axes: tuple[Axis, ...]) -> tuple[Move, ...] | None:
        """Moves of a tensor with a stacked axis (``Axis(stack="e")``), or None if it has none. Slice ``k`` of the
        source moves by its own axes (``{e}`` = k, the source chart), then the slices are re-indexed by the stacked
        axis' space (the permutation of the experts), if the gauge has it."""
        st = next((a for a in axes if a.stack), None)
        if st is None:
            return None
        n = stack_count(self.spec, self.config, st.stack)
        others = [b for b in axes if b is not st]
        slices = tuple(
            tuple(m for m in (self(b.filled({st.stack: k}).on(b.axis - (b.axis > st.axis))) for b in others)
                  if m is not None)
            for k in range(n))
        order = self(dataclasses.replace(st, stack=None)) if st.space else None
        if not any(slices) and order is None:
            return ()
        return (Move(st.axis, order.index if order is not None else torch.arange(n), None, slices=slices,
                     permutes=order is not None),)


def stack_count(spec: ArchSpec, config, placeholder: str) -> int:
    """The range of a stacked axis' placeholder (from the spaces that use it)."""
    cfg = ConfigView.of(config)
    for sp in spec.spaces.values():
        if placeholder in sp.ranges:
            values = range_values(sp.ranges[placeholder], cfg)
            if values != tuple(range(len(values))):
                raise GaugeError(f"spec {spec.name!r}: the stacked placeholder {{{placeholder}}} ranges over "
                                 f"{values[:8]}; a stacked axis indexes 0 .. n-1")
            return len(values)
    raise GaugeError(f"spec {spec.name!r}: no space gives a range for the stacked placeholder {{{placeholder}}}")


def source_names(spec: ArchSpec, gauge: Gauge, names: Iterable[str], files: bool = False, config=None
                 ) -> dict[str, str]:
    """``{name: source name}`` of the tensors a gauge renames: names with a carried placeholder (``{e}`` of
    ``experts.{i}.{e}.up_proj.weight`` in checkpoint files under a carrier permutation ``sigma`` (``moe.{i}``); ``{h}``
    of a rule's ``carried`` axis) hold, at ``e = k``, the moved tensor of ``e = sigma.perm[k]``. Names kept are
    absent. ``config`` is needed where a carried axis is ``kv`` (its space's reduction)."""
    carriers = {ph: Axis(0, tmpl) for ph, tmpl in spec.carriers.items()}
    out: dict[str, str] = {}
    if not carriers and not any(r.carried for _, r in spec.compiled(files)):
        return out
    for n in names:
        old, new = spec.file_alias(n) if files else ("", "")
        hit = spec.rule_for(new + n[len(old):], files)
        if hit is None:
            continue
        rule, values = hit
        src_values = dict(values)
        for ph, a in {**carriers, **rule.carried}.items():
            space = fill(a.space, values) if ph in values else None
            el = gauge.spaces.get(space) if space else None
            if el is None or el.is_identity:
                continue
            perm = el.perm
            if a.kv:
                if config is None:
                    raise GaugeError(f"renaming {n!r} by a KV-head permutation needs the model's config")
                perm = get_kind(spec.space(space).kind).reduce(el, ConfigView.of(config))
            src_values[ph] = str(int(perm[int(values[ph])]))
        src = old + fill(rule.pattern, src_values)[len(new):]
        if src != n:
            out[n] = src
    return out


def moves_for(spec: ArchSpec, config, gauge: Gauge, names: Iterable[str], *, strict: bool = True,
              expander: _Expander | None = None, files: bool = False) -> dict[str, tuple[Move, ...]]:
    """Resolved moves of each name (empty tuple: untouched). Unknown names raise when ``strict``.
    ``files=True``: names as checkpoint files store them (``ArchSpec.file_rules`` first)."""
    ex = expander or _Expander(spec, config, gauge)
    out: dict[str, tuple[Move, ...]] = {}
    for n in names:
        axes = axes_for(spec, n, files)
        if axes is None:
            if strict:
                raise GaugeError(
                    f"parameter {n!r} is not covered by the {spec.name!r} architecture spec; refusing to guess how "
                    "it moves. Add a Rule for it in hf_gauge/specs/."
                )
            out[n] = ()
            continue
        st = ex.stacked(axes)
        out[n] = st if st is not None else tuple(m for m in (ex(a) for a in axes) if m is not None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------------------
_BLOCK_BYTES = 4 << 20   # CPU: rows are gathered and signed in blocks that stay in cache (4 MiB measured best)


def check_moves(src: torch.Tensor, moves: tuple[Move, ...]) -> None:
    """Refuse (``GaugeError``) moves that do not fit ``src``: wrong width on an axis, signs on an unsigned dtype."""
    for m in moves:
        if m.axis >= src.dim() or src.shape[m.axis] != m.index.numel():
            raise GaugeError(
                f"width mismatch: tensor of shape {tuple(src.shape)} has {src.shape[m.axis] if m.axis < src.dim() else 'no'}"
                f" entries on axis {m.axis}, but the gauge space there has {m.index.numel()}"
            )
        if m.slices is not None:
            for k, sub in enumerate(m.slices):
                check_moves(src.select(m.axis, k), sub)
    signed_ok = src.is_floating_point() or src.is_complex() or src.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    if any(m.sign is not None for m in moves) and not signed_ok:
        raise GaugeError(f"cannot apply signs to a tensor of dtype {src.dtype}")


def _stack(moves: tuple[Move, ...]) -> Move | None:
    return next((m for m in moves if m.slices is not None), None)


class _RowKernel:
    """Rows ``r0:r1`` of a moved 2-D tensor: gather rows (``index_select``) and/or columns (``gather`` with a
    broadcast index), then flip signs while the block is still in cache. Floats move as integer bits."""

    def __init__(self, src: torch.Tensor, moves: tuple[Move, ...], scratch: Scratch | None = None) -> None:
        self.float_bits = moves_as_bits(src)
        self.src = as_bits(src)
        n, w = src.shape
        rows = next((m for m in moves if m.axis == 0), None)
        cols = next((m for m in moves if m.axis == 1), None)
        # CUDA, and tensors up to two blocks: one call per tensor; CPU: blocks stay in cache between the gather and
        # the sign flip (fewer, larger calls also spend less on thread fork/join)
        row_bytes = max(1, w * src.element_size())
        self.step = n if src.device.type != "cpu" or n * row_bytes <= 2 * _BLOCK_BYTES else max(1, _BLOCK_BYTES // row_bytes)
        dev = src.device
        self.ridx = rows.index_on(dev) if rows else None
        self.rsgn = rows.signer(self.src, self.float_bits) if rows else None
        self.rsgn = self.rsgn[:, None] if self.rsgn is not None else None
        self.cidx = cols.index_on(dev).expand(min(self.step, n), w) if cols else None
        self.csgn = cols.signer(self.src, self.float_bits) if cols else None
        # rows and columns: the block's rows are gathered into a reused buffer first (no allocation per block)
        self.tmp = (None if rows is None or cols is None else
                    (scratch or Scratch()).like(self.src, (min(self.step, n), w), key="rows"))

    def block(self, r0: int, r1: int, out: torch.Tensor, signs: bool = True) -> None:
        """``out`` (``[r1 - r0, w]``, the source's dtype) := rows ``r0:r1`` of the moved tensor; ``r1 - r0 <= step``.
        With ``signs=False`` only the gathers are done (``finish`` applies the signs while copying)."""
        src, blk = self.src, as_bits(out)
        if self.ridx is not None and self.cidx is not None:
            part = torch.index_select(src, 0, self.ridx[r0:r1], out=self.tmp[: r1 - r0])
            torch.gather(part, 1, self.cidx[: r1 - r0], out=blk)
        elif self.ridx is not None:
            torch.index_select(src, 0, self.ridx[r0:r1], out=blk)
        else:
            torch.gather(src[r0:r1], 1, self.cidx[: r1 - r0], out=blk)
        if signs:
            if self.rsgn is not None:
                flip_(blk, self.rsgn[r0:r1], self.float_bits)
            if self.csgn is not None:
                flip_(blk, self.csgn, self.float_bits)

    def finish(self, r0: int, gathered: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst`` := ``gathered`` (rows ``r0:`` gathered by ``block(signs=False)``) with the signs applied: the copy
        and the sign flip in one pass."""
        src, d = as_bits(gathered), as_bits(dst)
        r1 = r0 + src.shape[0]
        first = self.rsgn[r0:r1] if self.rsgn is not None else self.csgn
        if first is None:
            d.copy_(src)
            return
        (torch.bitwise_xor if self.float_bits else torch.mul)(src, first, out=d)
        if self.rsgn is not None and self.csgn is not None:
            flip_(d, self.csgn, self.float_bits)

    def rows(self, r0: int, r1: int, out: torch.Tensor, signs: bool = True) -> torch.Tensor:
        for b0 in range(r0, r1, self.step):
            b1 = min(r1, b0 + self.step)
            self.block(b0, b1, out[b0 - r0:b1 - r0], signs)
        return out


def _is_rows_cols(src: torch.Tensor, moves: tuple[Move, ...]) -> bool:
    return src.dim() == 2 and all(m.axis in (0, 1) and m.slices is None for m in moves)


@functools.cache
def _compiled() -> ModuleType | None:
    try:
        from . import kernels            # imports numba (compiles on first call, cached on disk)
    except ImportError:                  # no numba for this platform: torch gathers do the same moves
        return None
    return kernels


_KERNEL_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# Below KERNEL_MIN_ELEMENTS torch's gathers are as fast as a kernel call. Loading numba costs a fresh process 0.2-0.5 s
# (import, then the first call loads the cached machine code), which a job wins back only when it is large: the
# streaming apply of a 1.8 GB bf16 checkpoint (890 M elements, full gauge) took 2.75 s with torch's gathers and 2.96 s
# with the kernels (medians of 5 interleaved fresh processes, quiet 2-core machine), one of 7.6 GB (3.8 G elements)
# 10.3-11.7 s of CPU with the kernels against 11.8-15.1 s. So with HF_GAUGE_KERNELS=auto (the default) a job loads
# them when its work, the elements it moves, reaches KERNEL_IMPORT_ELEMENTS (``prepare_kernels``); once loaded,
# every tensor of KERNEL_MIN_ELEMENTS or more uses them.
KERNEL_MIN_ELEMENTS = 1 << 16
KERNEL_IMPORT_ELEMENTS = 1 << 30
KERNEL_MODES = ("auto", "numba", "torch")


def kernel_mode() -> str:
    """``HF_GAUGE_KERNELS``: ``auto`` (default), ``numba`` (compiled kernels wherever they apply) or ``torch``."""
    mode = os.environ.get("HF_GAUGE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise GaugeError(f"HF_GAUGE_KERNELS={mode!r} is not one of {', '.join(KERNEL_MODES)}; unset it for the default "
                         "(auto)")
    return mode


def _compiled_fits(src: torch.Tensor, moves: tuple[Move, ...], out: torch.Tensor | None = None) -> bool:
    """Whether the compiled kernel (``kernels.take``) moves ``src`` into ``out``: numba present and wanted
    (``kernel_mode``), contiguous CPU 2-D tensors of ``KERNEL_MIN_ELEMENTS`` or more moved on axes 0/1, no signs on
    an integer tensor. Otherwise torch gathers make the same moves."""
    if (src.device.type != "cpu" or src.numel() < KERNEL_MIN_ELEMENTS or not src.is_contiguous()
            or not _is_rows_cols(src, moves)
            or as_bits(src).dtype not in _KERNEL_DTYPES or (out is not None and (
                out.device.type != "cpu" or not out.is_contiguous() or out.dtype != src.dtype))
            or (not moves_as_bits(src) and any(m.sign is not None for m in moves))):
        return False
    return loaded_kernels() is not None


def loaded_kernels() -> ModuleType | None:
    """``hf_gauge.kernels`` when the compiled kernels are in use (``HF_GAUGE_KERNELS=numba``, or ``auto`` once a job
    loaded them: ``prepare_kernels``), else ``None``: callers then take their torch / numpy paths."""
    mode = kernel_mode()
    if mode == "torch" or (mode == "auto" and _compiled.cache_info().currsize == 0):
        return None
    return _compiled()


def prepare_kernels(n_elements: int) -> bool:
    """Before a job that moves (or reads) ``n_elements`` tensor elements: load the compiled kernels if it is worth
    it (``auto``: ``n_elements >= KERNEL_IMPORT_ELEMENTS``; ``numba``: always); returns whether they are in use."""
    mode = kernel_mode()
    if mode == "numba" or (mode == "auto" and n_elements >= KERNEL_IMPORT_ELEMENTS):
        return _compiled() is not None
    return mode == "auto" and _compiled.cache_info().currsize > 0 and _compiled() is not None


def _operands(bits: torch.Tensor, moves: tuple[Move, ...]) -> tuple:
    """The rows' and columns' ``kernels.Operand`` (``None`` where an axis stays), made once per move and dtype."""
    k = _compiled()

    def make(m: Move):
        mask = m.signer(bits, True)              # the sign-bit XOR mask, as the torch path uses it
        return k.Operand(m.index.numpy(), None if mask is None else mask.numpy())
    rows = next((m for m in moves if m.axis == 0), None)
    cols = next((m for m in moves if m.axis == 1), None)
    return tuple(None if m is None else m.cached(("operand", bits.dtype), lambda m=m: make(m)) for m in (rows, cols))


def _take(src: torch.Tensor, moves: tuple[Move, ...], out: torch.Tensor, r0: int = 0, r1: int | None = None
          ) -> torch.Tensor:
    """Rows ``r0:r1`` of the moved 2-D ``src`` into ``out`` with ``kernels.take`` (see ``_compiled_fits``)."""
    bits = as_bits(src)
    _compiled().take(bits, as_bits(out), *_operands(bits, moves), r0, r1)
    return out


def _take_(t: torch.Tensor, moves: tuple[Move, ...]) -> torch.Tensor:
    """The moved 2-D ``t`` in place with ``kernels.take_`` (rows follow their cycles: one read, one write)."""
    bits = as_bits(t)
    _compiled().take_(bits, *_operands(bits, moves))
    return t


def move_rows(src: torch.Tensor, moves: tuple[Move, ...], r0: int, r1: int, out: torch.Tensor,
              scratch: Scratch | None = None) -> torch.Tensor:
    """Rows ``r0:r1`` of ``move_tensor(src, moves)`` into ``out`` (a 2-D ``src`` whose moves act on axes 0/1)."""
    if not moves:
        return out.copy_(src[r0:r1])
    check_moves(src, moves)
    if _compiled_fits(src, moves, out):
        return _take(src, moves, out, r0, r1)
    return _RowKernel(src, moves, scratch).rows(r0, r1, out)


def row_mover(src: torch.Tensor, moves: tuple[Move, ...]
              ) -> Callable[[int, int, torch.Tensor, Scratch | None], torch.Tensor]:
    """``f(r0, r1, out, scratch)`` = ``move_rows(src, moves, r0, r1, out, scratch)`` with the checks and the kernel
    operands made once: for a tensor moved in many row chunks (``out``: contiguous, ``src``'s dtype and device)."""
    if not moves:
        return lambda r0, r1, out, scratch=None: out.copy_(src[r0:r1])
    check_moves(src, moves)
    if _compiled_fits(src, moves):
        take, bits = _compiled().take, as_bits(src)
        rows, cols = _operands(bits, moves)

        def compiled(r0: int, r1: int, out: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
            take(bits, as_bits(out), rows, cols, r0, r1)
            return out
        return compiled
    return lambda r0, r1, out, scratch=None: _RowKernel(src, moves, scratch).rows(r0, r1, out)


def compare_rows(src: torch.Tensor, moves: tuple[Move, ...], r0: int, r1: int, other: torch.Tensor
                 ) -> tuple[bool, int] | None:
    """``(rows r0:r1 of move_tensor(src, moves) equal other bit for bit, the largest of other's integer view with
    the sign bit cleared)`` in one pass by the compiled kernel (``kernels.take_equal``), nothing written; ``None``
    where the kernel does not apply (``_compiled_fits``)."""
    check_moves(src, moves)
    if not _compiled_fits(src, moves, other) or tuple(other.shape) != (r1 - r0, src.shape[1]):
        return None
    bits = as_bits(src)
    return _compiled().take_equal(bits, as_bits(other), *_operands(bits, moves), r0, r1)


def move_tensor(src: torch.Tensor, moves: tuple[Move, ...], out: torch.Tensor | None = None,
                scratch: Scratch | None = None) -> torch.Tensor:
    """Return ``src`` with every move applied (a new tensor, or ``out``); ``src`` is left unchanged.

    2-D tensors are processed in cache-sized row blocks (see ``_RowKernel``): one read and one write of the
    tensor. Every move is a gather plus, where signs apply, a sign-bit flip: bit-exact in every dtype.
    """
    if out is None:
        out = torch.empty_like(src, memory_format=torch.contiguous_format)
    if not moves:
        return out.copy_(src)
    check_moves(src, moves)
    if _compiled_fits(src, moves, out):
        return _take(src, moves, out)
    if _is_rows_cols(src, moves):
        return _RowKernel(src, moves, scratch).rows(0, src.shape[0], out)
    st = _stack(moves)
    if st is not None:                # fused per-expert tensors: each slice moves on its own, to its new place
        for j in range(len(st.slices)):
            k = int(st.index[j]) if st.permutes else j
            move_tensor(src.select(st.axis, k), st.slices[k], out=out.select(st.axis, j), scratch=scratch)
        return out
    # general N-d path (1-D gains and biases, rare higher-rank tensors); index_select always returns a new tensor
    float_bits = moves_as_bits(src)
    y = as_bits(src)
    for m in moves:
        y = y.index_select(m.axis, m.index_on(src.device))
        s = m.signer(y, float_bits)
        if s is not None:
            shape = [1] * y.dim()
            shape[m.axis] = -1
            flip_(y, s.view(shape), float_bits)
    as_bits(out).copy_(y)
    return out


class Scratch:
    """Reusable byte buffers keyed by (device, name), grown on demand. Fresh memory is page-faulted on first
    touch, which costs about as much as a copy, so buffers kept for a whole model or checkpoint are faulted once."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, object], torch.Tensor] = {}

    def bytes(self, n: int, key: object = 0, device: torch.device | str = "cpu") -> torch.Tensor:
        """A uint8 buffer of ``n`` bytes (its contents are whatever was left there)."""
        k = (str(device), key)
        b = self._bufs.get(k)
        if b is None or b.numel() < n:
            self._bufs.pop(k, None)                     # free before growing
            b = self._bufs[k] = torch.empty(max(n, 1), dtype=torch.uint8, device=device)
        return b[:n]

    def like(self, t: torch.Tensor, shape: tuple[int, ...] | None = None, key: object = 0) -> torch.Tensor:
        """A buffer of ``t``'s dtype and device, of ``shape`` (default ``t.shape``)."""
        shape = tuple(t.shape if shape is None else shape)
        n = int(torch.Size(shape).numel())
        return self.bytes(n * t.element_size(), key, t.device).view(t.dtype).view(shape)


def move_tensor_(t: torch.Tensor, moves: tuple[Move, ...], scratch: Scratch | None = None) -> torch.Tensor:
    """Apply ``moves`` to ``t`` in place (its storage is kept) and return it.

    The compiled kernel (``kernels.take_``) reads and writes each row once with no scratch tensor: rows are visited
    along the cycles of the row gather, each buffered before its column gather. Torch fallback: column-only moves
    go through cache-sized row blocks, a move of rows through a tensor-sized scratch buffer, copied back.
    """
    if not moves:
        return t
    check_moves(t, moves)
    scratch = scratch if scratch is not None else Scratch()
    st = _stack(moves)
    if st is not None:                # fused per-expert tensors: each slice (a view) moves in place
        for k, sub in enumerate(st.slices):
            move_tensor_(t.select(st.axis, k), sub, scratch)
        if st.permutes:               # then whole slices change places (one gather through a scratch copy)
            bits = as_bits(t)
            tmp = scratch.like(bits, key="whole")
            torch.index_select(bits, st.axis, st.index_on(t.device), out=tmp)
            bits.copy_(tmp)
        return t
    if not _is_rows_cols(t, moves):
        as_bits(t).copy_(as_bits(move_tensor(t, moves, out=scratch.like(t, key="whole"))))
        return t
    if _compiled_fits(t, moves):
        return _take_(t, moves)
    k, n = _RowKernel(t, moves, scratch), t.shape[0]
    if all(m.axis == 1 for m in moves):
        buf = scratch.like(t, (min(k.step, n), t.shape[1]), key="block")
        for r0 in range(0, n, k.step):
            r1 = min(n, r0 + k.step)
            k.block(r0, r1, buf[: r1 - r0], signs=False)
            k.finish(r0, buf[: r1 - r0], t[r0:r1])
        return t
    k.finish(0, k.rows(0, n, scratch.like(t, key="whole"), signs=False), t)
    return t


def move_tensors_(items: Iterable[tuple[torch.Tensor, tuple[Move, ...]]], scratch: Scratch | None = None) -> None:
    """``move_tensor_`` on every ``(tensor, moves)`` (distinct storages). Tensors the compiled kernels move on one
    thread (below ``kernels.MIN_PARALLEL`` elements) are spread whole over the threads, one hand-off in all; the
    others run one by one, each split over the threads itself."""
    scratch = scratch if scratch is not None else Scratch()
    spread: list[tuple[torch.Tensor, tuple[Move, ...]]] = []
    for t, moves in items:
        if moves and _compiled_fits(t, moves) and t.numel() < _compiled().MIN_PARALLEL:
            check_moves(t, moves)
            spread.append((t, moves))
        else:
            move_tensor_(t, moves, scratch)
    if spread:
        _compiled().spread([functools.partial(_take_, t, m) for t, m in spread], [t.numel() for t, _ in spread])


# ----------------------------------------------------------------------------------------------------------------
# Checking a gauge against an architecture
# ----------------------------------------------------------------------------------------------------------------
def space_sizes(spec: ArchSpec, config) -> dict[str, int]:
    """Every concrete space of a model and its size."""
    return spec.space_sizes(ConfigView.of(config))


def check_gauge(spec: ArchSpec, config, gauge: Gauge) -> None:
    """Refuse (``GaugeError``) a gauge the model cannot absorb: unknown space, wrong width, inadmissible signs."""
    cfg = ConfigView.of(config)
    sizes = spec.space_sizes(cfg)
    for name, el in gauge.spaces.items():
        if name not in sizes:
            have = ", ".join(list(sizes)[:3] + (["..."] if len(sizes) > 3 else []))
            raise GaugeError(f"the gauge has a space {name!r} that this {cfg.model_type} model lacks (it has {have}; "
                             f"templates {', '.join(spec.spaces)})")
        if el.size != sizes[name]:
            raise GaugeError(
                f"width mismatch in space {name!r}: the gauge acts on {el.size} coordinates but this "
                f"{cfg.model_type} model has {sizes[name]}; was the gauge fitted for another model?"
            )
        sp = spec.space(name)
        get_kind(sp.kind).check(name, el, sp.signs, cfg)
