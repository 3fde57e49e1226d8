"""Compiled CPU kernels for the engine's 2-D moves (numba, GIL released, row spans run on a thread pool).

Convention, on the integer view of a row-major ``[n, m]`` tensor (``group.as_bits``), for output rows ``r0:r1``:

    dst[i - r0, j] = src[r[i], c[j]] ^ rmask[i] ^ cmask[j]

``r``/``c`` are uint32 gathers (``None``: identity) and the masks hold the sign bit where the sign is -1 (``None``:
no flip), so a move stays a pure index operation: bit-exact in every dtype. Each output row is made in three
passes over a cache-resident row: copy the source row into a buffer, gather from it (so ``dst`` may be ``src``),
XOR the signs (the column mask, pre-flipped for rows whose sign is -1). The copy and the XOR vectorise; the gather
is three scalar memory operations per element. Indices are unsigned throughout, so numba emits neither
negative-index wraparound nor bounds checks. Spans of rows run on Python threads (the kernels release the GIL), not
on numba's OpenMP layer: a second OpenMP runtime beside torch's spins after each region and slowed torch's own
kernels in the same process (a torch-path apply 170 ms instead of 99 ms; measured). Importing this module imports
numba; the engine falls back to torch gathers when it is missing.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit, uint64

__all__ = ["Operand", "take", "take_", "take_equal", "square_sums", "spread", "cycles", "MIN_PARALLEL"]

MIN_PARALLEL = 1 << 20          # elements below which a tensor is moved on one thread (``spread`` shares them)


@njit(nogil=True, boundscheck=False, cache=True, inline="always")
def _row(src, sb, dst, db, c, cm, m, buf):   # pragma: no cover (compiled)
    """dst[db:db+m] := src[sb:sb+m] gathered by c (empty: as is), XOR cm (empty: no flip). Inlined into its
    callers: called, its bf16 column gather ran at 2.7 G elements/s on one thread instead of 4.1 (measured)."""
    if c.size:
        for j in range(m):
            buf[j] = src[sb + j]
        for j in range(m):
            dst[db + j] = buf[c[j]]
        if cm.size:
            for j in range(m):
                dst[db + j] ^= cm[j]
    elif cm.size:
        for j in range(m):
            dst[db + j] = src[sb + j] ^ cm[j]
    else:
        for j in range(m):
            dst[db + j] = src[sb + j]


@njit(nogil=True, boundscheck=False, cache=True)
def _take_span(src, r, c, rneg, cm0, cm1, dst, m, r0, r1, buf):   # pragma: no cover (compiled)
    m = uint64(m)
    r0 = uint64(r0)
    for i in range(r0, uint64(r1)):
        _row(src, uint64(r[i]) * m, dst, (i - r0) * m, c, cm1 if rneg[i] else cm0, m, buf)


@njit(nogil=True, boundscheck=False, cache=True)
def _equal_span(src, r, c, rneg, cm0, cm1, other, m, r0, r1, buf, row, acc, top, mag):   # pragma: no cover (compiled)
    """Per column ``j`` over rows ``r0:r1``: ``acc[j] |= moved[i, j] ^ other[i, j]`` and ``top[j] = max(top[j],
    other[i, j] & mag)`` (``other`` holds rows ``r0:r1``). Each moved row exists only in the cache-resident ``row``."""
    m = uint64(m)
    r0 = uint64(r0)
    for i in range(r0, uint64(r1)):
        _row(src, uint64(r[i]) * m, row, uint64(0), c, cm1 if rneg[i] else cm0, m, buf)
        ob = (i - r0) * m
        for j in range(m):
            x = other[ob + j]
            acc[j] |= row[j] ^ x
            top[j] = max(top[j], x & mag)


@njit(nogil=True, boundscheck=False, cache=True, fastmath={"reassoc", "contract"})
def _fold_squares(row, rb, m, axis, out, i):   # pragma: no cover (compiled)
    """Squares of ``row[rb:rb+m]`` (row ``i``) in float64: added per column (``axis`` 0) or summed into ``out[i]``."""
    m = uint64(m)
    if axis == 0:
        for j in range(m):
            v = np.float64(row[rb + j])
            out[j] += v * v
    else:
        s = np.float64(0.0)
        for j in range(m):
            v = np.float64(row[rb + j])
            s += v * v
        out[i] += s


@njit(nogil=True, boundscheck=False, cache=True)
def _squares_float(x, n, m, axis, out):   # pragma: no cover (compiled)
    m = uint64(m)
    for i in range(uint64(n)):
        _fold_squares(x, i * m, m, axis, out, i)


@njit(nogil=True, boundscheck=False, cache=True)
def _squares_bf16(x, n, m, axis, out, wi, wf):   # pragma: no cover (compiled)
    """bf16 rows (int16 bits) widened exactly into ``wf`` (``wi``: its int32 view): the 16 bits are a float32's high half."""
    m = uint64(m)
    for i in range(uint64(n)):
        b = i * m
        for j in range(m):
            wi[j] = np.int32(x[b + j]) << 16
        _fold_squares(wf, uint64(0), m, axis, out, i)


@njit(nogil=True, boundscheck=False, cache=True)
def cycles(r):   # pragma: no cover (compiled)
    """The cycles of the row gather ``r`` laid end to end: ``order[p]`` is the row written at step ``p`` (its source
    ``r[order[p]]`` is ``order[p + 1]``, or the cycle's first row at its last step), ``head[p]`` the step where
    ``p``'s cycle starts, ``last[p]`` whether ``p`` ends it."""
    n = r.size
    seen = np.zeros(n, np.bool_)
    order = np.empty(n, np.uint32)
    head = np.empty(n, np.uint32)
    last = np.zeros(n, np.bool_)
    p = 0
    for s in range(n):
        if seen[s]:
            continue
        h = p
        i = s
        while not seen[i]:
            seen[i] = True
            order[p] = i
            head[p] = h
            p += 1
            i = r[i]
        last[p - 1] = True
    return order, head, last


@njit(nogil=True, boundscheck=False, cache=True)
def _cycle_span(w, order, head, last, c, rneg, cm0, cm1, m, a, b, saved, t, buf, hb):   # pragma: no cover (compiled)
    """Steps ``a:b`` of the in-place row gather: each row is read once, then written once. A cycle's first row is
    kept in ``hb`` for its last step. Rows that another span writes first come from ``saved``: row ``2t``, the head
    of the cycle this span starts in the middle of; row ``2t + 3``, the next span's first row."""
    for p in range(a, b):
        d = uint64(order[p])
        h = uint64(head[p])
        db = d * m
        if h == p:
            for j in range(m):
                hb[j] = w[db + j]
        if last[p]:
            src, sb = (hb, uint64(0)) if h >= a else (saved, uint64(2 * t) * m)
        elif p + 1 == b:
            src, sb = saved, uint64(2 * t + 3) * m
        else:
            src, sb = w, uint64(order[p + 1]) * m
        _row(src, sb, w, db, c, cm1 if rneg[d] else cm0, m, buf)


@njit(nogil=True, boundscheck=False, cache=True)
def _cycles_save(w, order, head, m, bounds, saved):   # pragma: no cover (compiled)
    """Before any write: for each span ``t`` (steps ``bounds[t]:bounds[t+1]``) that starts in the middle of a cycle,
    keep that cycle's head (row ``2t`` of ``saved``) and the span's first row (row ``2t + 1``)."""
    m = uint64(m)
    for t in range(1, bounds.size - 1):
        a = uint64(bounds[t])
        if head[a] != a:
            hs = uint64(order[head[a]]) * m
            fs = uint64(order[a]) * m
            for j in range(m):
                saved[uint64(2 * t) * m + j] = w[hs + j]
                saved[uint64(2 * t + 1) * m + j] = w[fs + j]


class Operand:
    """One axis's move, ready for the kernels: a uint32 ``index``, the sign-bit XOR ``mask`` (``None``: no flips)
    in the integer dtype of the tensors it moves; derived arrays are made once (a move serves many tensors)."""

    def __init__(self, index: np.ndarray, mask: np.ndarray | None) -> None:
        self.index = np.ascontiguousarray(index, dtype=np.uint32)
        self.mask = mask
        self.neg = None if mask is None else mask != 0
        self._flipped: np.ndarray | None = None
        self._cycles: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def flipped(self) -> np.ndarray:
        """``mask`` XOR the sign bit: the column mask of a row whose own sign is -1."""
        if self._flipped is None:
            self._flipped = self.mask ^ np.array(np.iinfo(self.mask.dtype).min, dtype=self.mask.dtype)
        return self._flipped

    def cycles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``cycles(index)``: the visiting order of an in-place row gather."""
        if self._cycles is None:
            self._cycles = cycles(self.index)
        return self._cycles


_CONST: dict[tuple, np.ndarray] = {}


def _const(kind: str, n: int, dtype: np.dtype) -> np.ndarray:
    """Cached operands (never written): ``arange`` (identity gather), ``false`` (no row flips), ``sign`` (all -1)."""
    key = (kind, n, dtype)
    a = _CONST.get(key)
    if a is None:
        a = (np.arange(n, dtype=dtype) if kind == "arange" else np.zeros(n, dtype=dtype) if kind == "false"
             else np.full(n, np.iinfo(dtype).min, dtype=dtype))
        _CONST[key] = a
    return a


def _operands(n: int, m: int, dt: np.dtype, rows: Operand | None, cols: Operand | None) -> tuple[np.ndarray, ...]:
    """(c, rneg, cm0, cm1) for the compiled kernels: empty arrays stand for "none"; ``cm1`` is the column mask of
    rows whose sign is -1."""
    c = cols.index if cols is not None else _const("arange", 0, np.dtype(np.uint32))
    cm0 = cols.mask if cols is not None and cols.mask is not None else _const("false", 0, dt)
    if rows is None or rows.neg is None:
        return c, _const("false", n, np.dtype(np.bool_)), cm0, cm0
    cm1 = cols.flipped() if cols is not None and cols.mask is not None else _const("sign", m, dt)
    return c, rows.neg, cm0, cm1


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _threads(rows: int, m: int) -> int:
    nt = min(torch.get_num_threads(), rows)
    return nt if nt > 1 and rows * m >= MIN_PARALLEL else 1


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf_gauge-kernels"), workers
        return _POOL


def _on_threads(run, bounds: list[int]) -> None:
    """``run(bounds[t], bounds[t + 1], t)`` for every ``t``: ``t = 0`` on this thread, the others on the pool."""
    nt = len(bounds) - 1
    futures = [_pool(nt - 1).submit(run, bounds[t], bounds[t + 1], t) for t in range(1, nt)]
    run(bounds[0], bounds[1], 0)
    for f in futures:
        f.result()


def _spans(run, n: int, nt: int) -> None:
    """``run(a, b, t)`` for ``nt`` equal spans of ``range(n)`` (``nt == 1``: once, on this thread)."""
    _on_threads(run, [t * n // nt for t in range(nt + 1)])


def spread(jobs: list, weights: list[int]) -> None:
    """Run ``jobs`` (calls of kernels that stay on one thread) on ``torch.get_num_threads()`` threads, in
    contiguous groups of about equal total ``weights``: many small tensors share the cores with one hand-off."""
    nt = min(torch.get_num_threads(), len(jobs))
    if nt <= 1:
        for job in jobs:
            job()
        return
    cum = np.cumsum([0] + list(weights))
    bounds = [0] + [int(np.searchsorted(cum, cum[-1] * t / nt)) for t in range(1, nt)] + [len(jobs)]
    bounds = sorted(set(bounds))

    def run(a: int, b: int, t: int) -> None:
        for job in jobs[a:b]:
            job()
    _on_threads(run, bounds)


def take(src: torch.Tensor, dst: torch.Tensor, rows: Operand | None, cols: Operand | None,
         r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """``dst`` := rows ``r0:r1`` of the moved ``src`` (module docstring). ``src``/``dst``: contiguous CPU integer
    tensors of one dtype (``dst`` of shape ``[r1 - r0, m]``), the operands' masks in that dtype. ``dst`` may be
    ``src`` only when ``rows`` is ``None``. The caller checks widths (``engine.check_moves``)."""
    s, m, r1, ops = _gather_operands(src, rows, cols, r1)
    d = dst.numpy().reshape(-1)
    _spans(lambda a, b, t: _take_span(s, *ops, d[a * m:], m, r0 + a, r0 + b,
                                      np.empty(m if ops[1].size else 0, s.dtype)), r1 - r0, _threads(r1 - r0, m))
    return dst


def _gather_operands(src: torch.Tensor, rows: Operand | None, cols: Operand | None, r1: int | None
                     ) -> tuple[np.ndarray, int, int, tuple[np.ndarray, ...]]:
    """``(flat src, m, r1, (r, c, rneg, cm0, cm1))`` for the row kernels: ``r`` the row gather (identity when
    ``rows`` is ``None``), ``r1`` defaulted to the row count."""
    n, m = src.shape
    s = src.numpy().reshape(-1)
    c, rneg, cm0, cm1 = _operands(n, m, s.dtype, rows, cols)
    r = rows.index if rows is not None else _const("arange", n, np.dtype(np.uint32))
    return s, m, n if r1 is None else r1, (r, c, rneg, cm0, cm1)


def take_equal(src: torch.Tensor, other: torch.Tensor, rows: Operand | None, cols: Operand | None,
               r0: int = 0, r1: int | None = None) -> tuple[bool, int]:
    """``(moved src rows r0:r1 == other bit for bit, max of other & ~sign bit)`` in one pass, the moved rows never
    written out (for IEEE floats the second is the bits of ``max |other|``). Operands as for ``take``; ``other``:
    ``[r1 - r0, m]``, contiguous, ``src``'s dtype."""
    s, m, r1, ops = _gather_operands(src, rows, cols, r1)
    o = other.numpy().reshape(-1)
    mag = np.iinfo(s.dtype).max
    found: list[tuple[np.ndarray, np.ndarray]] = []

    def run(a: int, b: int, t: int) -> None:
        acc, top = np.zeros(m, s.dtype), np.zeros(m, s.dtype)
        _equal_span(s, *ops, o[a * m:], m, r0 + a, r0 + b, np.empty(m if ops[1].size else 0, s.dtype),
                    np.empty(m, s.dtype), acc, top, mag)
        found.append((acc, top))
    _spans(run, r1 - r0, _threads(r1 - r0, m))
    return (not any(acc.any() for acc, _ in found), int(max(top.max(initial=0) for _, top in found)))


def square_sums(x: torch.Tensor, axis: int, out: torch.Tensor) -> bool:
    """``out += (x * x).sum(axis)`` for a contiguous 2-D CPU ``x`` of bf16, float32 or float64, squares and sums in
    float64 (``out``: float64, ``[m]`` for ``axis`` 0, ``[n]`` for 1), one pass on this thread; False (nothing done)
    for other dtypes."""
    if x.dtype not in (torch.bfloat16, torch.float32, torch.float64) or x.dim() != 2 or not x.is_contiguous():
        return False
    n, m = x.shape
    o = out.numpy()
    if x.dtype == torch.bfloat16:
        wi = np.empty(m, np.int32)
        _squares_bf16(x.view(torch.int16).numpy().reshape(-1), n, m, axis, o, wi, wi.view(np.float32))
    else:
        _squares_float(x.numpy().reshape(-1), n, m, axis, o)
    return True


def take_(t: torch.Tensor, rows: Operand | None, cols: Operand | None) -> torch.Tensor:
    """``t`` := the moved ``t``, in place, each row read once and written once (rows follow the cycles of their
    gather). ``t``: a contiguous CPU integer tensor; operands as for ``take``."""
    if rows is None:
        return take(t, t, None, cols)
    n, m = t.shape
    w = t.numpy().reshape(-1)
    c, rneg, cm0, cm1 = _operands(n, m, w.dtype, rows, cols)
    order, head, last = rows.cycles()
    nt = _threads(n, m)
    bounds = [k * n // nt for k in range(nt + 1)]
    saved = np.empty(2 * nt * m, w.dtype)
    if nt > 1:
        _cycles_save(w, order, head, m, np.array(bounds, dtype=np.uint64), saved)
    mm = np.uint64(m)

    def run(a: int, b: int, k: int) -> None:
        _cycle_span(w, order, head, last, c, rneg, cm0, cm1, mm, np.uint64(a), np.uint64(b), saved, k,
                    np.empty(m, w.dtype), np.empty(m, w.dtype))
    _on_threads(run, bounds)
    return t
