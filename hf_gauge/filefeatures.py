"""Data-free matching features read straight from safetensors checkpoint files: no model is built.

``CheckpointFiles`` maps tensor names to their bytes in a checkpoint folder's shards (names, dtypes, shapes and
offsets from the validated headers; shard names from an index file validated by ``checkpoint.shard_name``) and reads
rows of one tensor at a time, in the stored dtype: with positional reads into reused buffers (``read``,
``row_blocks``), or as views of a private memory map of the shard (``mapped_blocks``: no copy; each block's pages are
released once the next one is asked for). Either way the process holds a few blocks per model, not the pages of the
files it has read.

``residual_correlation`` builds the same similarity ``C [d, d]`` as ``features.feature_correlation(
*features.paired_weight_features(a, b))`` (the in-memory data-free matcher; see ``hf_gauge.features`` for the
convention), from the same tensors and the same vocabulary rows, with the signed part accumulated as a Gram matrix:
``sum_t (X_A,t^T X_B,t) / scale_t^2`` over the signed tensors ``t`` (rows of ``X``: vocabulary entries etc., columns:
residual coordinates; ``scale_t = (||X_A,t|| + ||X_B,t||) / 2``), so memory is ``O(d^2 + one block)`` whatever the
vocabulary or depth. Block products run in float32 for 16-bit weights (every product of two bf16/fp16 numbers is
exact in float32) and float64 otherwise (also when the two checkpoints store different dtypes, fp32 against bf16:
both are compared, widened exactly to float64); block results are summed in float64. Invariant features (norm gains, and
slice norms of readers' columns / writers' rows) are squared sums accumulated in float64 across memory-mapped row
blocks, one tensor of one checkpoint per job, jobs shared over threads; the sums are made in one pass by the compiled
kernels (``kernels.square_sums``) when they are loaded, else in cache-sized chunks with numpy. The vocabulary rows of
capped signed tensors are ranked by norms made the same way.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from .checkpoint import INDEX_NAME, open_shard, read_header, resolve_checkpoint, shard_name, shard_size
from .engine import Scratch, axes_for, loaded_kernels, prepare_kernels, resolve_name
from .errors import GaugeError
from .features import invariant_agreement, rows_cap, signed_cosine_
from .fileconfig import checkpoint_config
from .inputs import audit_folder
from .jsonio import read_json
from .specs import ArchSpec
from .specs.base import fill

__all__ = ["AHEAD", "BLOCK_BYTES", "CheckpointFiles", "layer_tensors", "prefetched", "residual_correlation"]

BLOCK_BYTES = 32 << 20          # rows are read and reduced in blocks of about this many bytes
CHUNK_BYTES = 1 << 20           # a block's rows are widened, squared and summed in chunks that stay in cache
AHEAD = 1                       # blocks read ahead of the computation by ``prefetched``
_SINGLE = "model.safetensors"
_DTYPES: dict[str, torch.dtype] = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                                   "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                                   "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointFiles:
    """Tensor locations of one checkpoint folder (or Hub id) and block reads of them; see the module docstring."""

    def __init__(self, src: str | os.PathLike, *, revision: str | None = None, label: str = "",
                 block_bytes: int | None = None, **hub: Any) -> None:
        """``hub``: ``token``, ``cache_dir``, ``local_files_only``, ``endpoint`` for a Hub id (``resolve_checkpoint``)."""
        if sys.byteorder != "little":
            raise GaugeError("reading safetensors from files needs a little-endian machine")
        self.folder = resolve_checkpoint(src, revision=revision, **hub)
        audit_folder(self.folder)   # links and special files, before anything is read
        self.label = label or str(src)
        self.block_bytes = block_bytes or BLOCK_BYTES
        self.entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        self._sizes: dict[Path, int] = {}
        for shard in self._shards():
            path = self.folder / shard
            _, header, start = read_header(path)
            self._sizes[path] = shard_size(header, start)
            for name, info in header.items():
                if name in self.entries:
                    raise GaugeError(f"tensor {name!r} appears in two shards of {self.folder}; the checkpoint is corrupt")
                self.entries[name] = (path, start, info)
        self.config, self.spec = checkpoint_config(self.folder, {n: e[2] for n, e in self.entries.items()})
        self._scratch = Scratch()
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()                   # fds and maps are opened once, from any thread

    def _shards(self) -> list[str]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            doc = read_json(index, str(index), "re-download the checkpoint")
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict):
                raise GaugeError(f"{index} is corrupt (no weight_map object); re-download the checkpoint")
            values = list(weight_map.values())
            shards = sorted({shard_name(v, str(index)) for v in values})
            missing = [s for s in shards if not (self.folder / s).is_file()]
            if missing:
                raise GaugeError(f"{self.folder} lacks shard(s) {missing[:3]} listed in {INDEX_NAME}; the download "
                                 "is incomplete")
            return shards
        if (self.folder / _SINGLE).is_file():
            return [_SINGLE]
        raise GaugeError(f"{self.folder} holds no {_SINGLE} or {INDEX_NAME} (hf_gauge reads safetensors only); is it "
                         "a transformers checkpoint folder?")

    # -- tensor metadata -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every tensor name, in storage order (shard, then offset): reading in this order is sequential I/O."""
        return sorted(self.entries, key=lambda n: (str(self.entries[n][0]), self.entries[n][2]["data_offsets"][0]))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in self.entries[name][2]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name][2]["dtype"]
        if code not in _DTYPES:
            raise GaugeError(f"{self.label}: tensor {name!r} has dtype {code}, which hf_gauge does not read from "
                             f"files ({', '.join(_DTYPES)})")
        return _DTYPES[code]

    def nbytes(self, name: str) -> int:
        b, e = self.entries[name][2]["data_offsets"]
        return int(e) - int(b)

    def _checked(self, name: str) -> tuple[int, torch.dtype, tuple[int, ...], int]:
        path, start, info = self.entries[name]
        dtype, shape = self.dtype(name), self.shape(name)
        if math.prod(shape) * dtype.itemsize != self.nbytes(name):
            raise GaugeError(f"{path}: tensor {name!r} has {self.nbytes(name)} bytes but shape {list(shape)} of "
                             f"{info['dtype']} needs {math.prod(shape) * dtype.itemsize}; the shard is corrupt")
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = open_shard(path, self._sizes[path])
        return fd, dtype, shape, start + int(info["data_offsets"][0])

    def _by_rows(self, name: str) -> tuple[int, torch.dtype, int, int, list[int], int, int]:
        """``(fd, dtype, rows, bytes per row, shape of a row, offset, rows per block)`` of a tensor read in row
        blocks of about ``block_bytes`` (a 0-d tensor is one row)."""
        fd, dtype, shape, off = self._checked(name)
        row = math.prod(shape[1:]) * dtype.itemsize
        return fd, dtype, shape[0] if shape else 1, row, list(shape[1:]), off, max(1, self.block_bytes // max(1, row))

    # -- reads -----------------------------------------------------------------------------------------------------
    def _pread(self, fd: int, buf: torch.Tensor, offset: int) -> None:
        view, got = memoryview(buf.numpy()), 0
        while got < len(view):
            try:
                n = os.preadv(fd, [view[got:]], offset + got)
            except OSError as e:
                path = next((p for p, f in self._fds.items() if f == fd), self.folder)
                raise GaugeError(f"{self.label}: reading {path} failed: {e.strerror or e}; re-download the "
                                 "checkpoint") from None
            if n <= 0:
                path = next((p for p, f in self._fds.items() if f == fd), self.folder)
                raise GaugeError(f"{self.label}: {path} ended early: the shard was truncated after it was "
                                 "validated; re-download the checkpoint")
            got += n

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype, as a new tensor."""
        fd, dtype, shape, off = self._checked(name)
        n = self.nbytes(name)
        buf = torch.empty(n, dtype=torch.uint8)
        self._pread(fd, buf, off)
        return buf.view(dtype).reshape(shape)

    def row_blocks(self, name: str, rows: torch.Tensor | None = None, slots: int = 1) -> Iterator[torch.Tensor]:
        """Blocks ``[k, ...]`` of the tensor's rows (all rows, or the sorted row indices ``rows``), in the stored dtype.

        Blocks live in ``slots`` reused buffers, taken in turn: a block is valid until ``slots`` more are requested.
        """
        fd, dtype, n, row, tail, off, step = self._by_rows(name)
        if rows is None:
            for j, r0 in enumerate(range(0, n, step)):
                k = min(n, r0 + step) - r0
                buf = self._scratch.bytes(k * row, ("block", j % slots))
                self._pread(fd, buf, off + r0 * row)
                yield buf.view(dtype).reshape([k] + tail)
            return
        rows = rows.tolist()
        for i, i0 in enumerate(range(0, len(rows), step)):
            part = rows[i0:i0 + step]
            buf = self._scratch.bytes(len(part) * row, ("block", i % slots))
            j = 0
            while j < len(part):                      # one read per run of consecutive rows
                k = j + 1
                while k < len(part) and part[k] == part[k - 1] + 1:
                    k += 1
                self._pread(fd, buf[j * row:k * row], off + part[j] * row)
                j = k
            yield buf.view(dtype).reshape([len(part)] + tail)

    def mapped_blocks(self, name: str, whole: bool = False) -> Iterator[torch.Tensor]:
        """Blocks ``[k, ...]`` of the tensor's rows (about ``block_bytes`` each, or one block with ``whole``) as views
        of the memory-mapped shard: no copy, and a private mapping, so nothing reaches the file. A block's pages leave
        this process (``MADV_DONTNEED``; the page cache keeps them) when the next block is asked for or the iterator
        is closed: one block mapped at a time. A view is valid only until then. The shard's size was validated when
        it was opened; a shard truncated afterwards, while mapped, ends the process (SIGBUS), as with safetensors' own
        memory-mapped loading."""
        fd, dtype, n, row, tail, off, step = self._by_rows(name)
        if not n or not row:
            yield torch.empty([n] + tail, dtype=dtype)
            return
        path = self.entries[name][0]
        with self._lock:
            mm = self._maps.get(path)
            if mm is None:
                if os.fstat(fd).st_size != self._sizes[path]:        # mapping a shorter file: SIGBUS on access
                    raise GaugeError(f"{self.label}: {path} has {os.fstat(fd).st_size} bytes but was validated for "
                                     f"{self._sizes[path]}: the shard changed after it was validated; re-download "
                                     "the checkpoint")
                mm = self._maps[path] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        step = n if whole else step
        for r0 in range(0, n, step):
            k = min(n, r0 + step) - r0
            start = off + r0 * row
            try:
                yield torch.frombuffer(mm, dtype=dtype, count=k * row // dtype.itemsize, offset=start).view([k] + tail)
            finally:
                if hasattr(mmap, "MADV_DONTNEED"):
                    page = start - start % mmap.PAGESIZE
                    mm.madvise(mmap.MADV_DONTNEED, page, start + k * row - page)

    def close(self) -> None:
        self._maps.clear()                       # unmapped when the last view made from it is freed, not before
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "CheckpointFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_T = TypeVar("_T")
_DONE = object()


def prefetched(items: Iterator[_T], ahead: int = AHEAD) -> Iterator[_T]:
    """``items``, produced by a background thread up to ``ahead`` items before the consumer asks for them, so file
    reads overlap the computation (``os.preadv`` and torch kernels release the GIL). Items held in reused buffers must
    stay valid for ``ahead + 2`` items (``row_blocks(..., slots=ahead + 2)``). The producer has stopped when this
    generator ends or is closed, so the caller may use the files again."""
    q: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)

    worker = threading.Thread(target=produce, name="hf_gauge-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        worker.join()


def _tied_copy(files: CheckpointFiles, name: str) -> bool:
    """A stored output embedding that the config ties to the input embedding (one parameter in a live model)."""
    if not getattr(files.config, "tie_word_embeddings", False):
        return False
    embed = files.spec.sites.embed + ".weight"
    return (name != embed and embed in files.entries and not any(c.isdigit() for c in name)
            and files.shape(name) == files.shape(embed))


def _feature_tensors(fa: CheckpointFiles, fb: CheckpointFiles) -> list[str]:
    """A's tensors that carry a residual axis (as ``paired_weight_features`` selects them), checked against B's."""
    out = []
    for name in fa.names():
        if resolve_name(name)[1] != "weight" or _tied_copy(fa, name):
            continue
        axes = axes_for(fa.spec, name, files=True)
        if not axes or not any(a.space == "residual" for a in axes):
            continue
        if name not in fb.entries or fb.shape(name) != fa.shape(name):
            have = "is missing" if name not in fb.entries else str(fb.shape(name))
            raise GaugeError(f"tensor {name!r} has shape {fa.shape(name)} in checkpoint A but {have} in checkpoint "
                             "B; the two checkpoints do not share an architecture")
        out.append(name)
    return out


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Block arithmetic: float32 is exact for products of 16-bit floats; wider inputs keep float64."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64


def _widen(x: torch.Tensor, work: Scratch, key: str, acc: torch.dtype | None = None) -> torch.Tensor:
    """``x`` converted to its block arithmetic dtype (or ``acc``) in ``work``'s buffer ``key`` (reused block after
    block: fresh memory costs a page fault per page), valid until the next call with ``key``."""
    acc = acc or _acc(x.dtype)
    buf = work.bytes(x.numel() * acc.itemsize, key).view(acc).view(x.shape)
    return buf.copy_(x)


def _widen_into(part: np.ndarray, dtype: torch.dtype, y: np.ndarray) -> None:
    """``y`` (float32 / float64) := ``part``, the raw elements of a ``dtype`` block; bf16 is widened by moving its 16
    bits into the high half of a 32-bit word, which is exactly its float32 value."""
    if dtype == torch.bfloat16:
        yi = y.view(np.int32)
        np.copyto(yi, part)                         # int16 -> int32 (sign-extended) ...
        np.left_shift(yi, 16, out=yi)               # ... then the bf16 bits become the float32's high half
    else:
        np.copyto(y, part)


def _add_squares(x: torch.Tensor, dim: int, out: torch.Tensor, work: Scratch) -> None:
    """``out += (x * x).sum(dim)`` for a 2-D block ``x`` (stored dtype), ``out`` float64: cache-sized chunks of rows
    are widened to the block arithmetic dtype (``_acc``), squared and summed there (float32 for 16-bit weights, whose
    squares are exact in float32), then added in float64, so each element crosses memory once. numpy runs these
    element-wise passes on the calling thread: small multi-threaded torch kernels stall when the cores are busy."""
    kernels = loaded_kernels()
    if kernels is not None and kernels.square_sums(x, dim, out):     # one compiled pass, float64 sums
        return
    acc = _acc(x.dtype)
    npacc = np.float32 if acc == torch.float32 else np.float64
    w = x.shape[1]
    step = max(1, CHUNK_BYTES // max(1, w * acc.itemsize))
    raw = x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    buf = work.bytes(min(step, x.shape[0]) * w * acc.itemsize, "chunk").numpy().view(npacc).reshape(-1, w)
    o = out.numpy()
    for r0 in range(0, x.shape[0], step):
        part = raw[r0:r0 + step]
        y = buf[:part.shape[0]]
        if part.dtype == npacc:
            np.multiply(part, part, out=y)
        else:
            _widen_into(part, x.dtype, y)
            np.multiply(y, y, out=y)
        if dim == 0:
            o += y.sum(0)
        else:
            o[r0:r0 + part.shape[0]] += y.sum(1)


@contextlib.contextmanager
def _bf16_operands(stored: torch.dtype | None) -> Iterator[None]:
    """Within: float32 matmuls may take bf16 operands (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``)
    when the blocks were widened from bf16 and the CPU has bf16 dot products (AVX512-BF16, AMX). Such a block
    converts back to bf16 exactly, every product is exact and the sums stay float32: the same arithmetic as an IEEE
    float32 matmul, in 0.21 s instead of 0.44 s for a d=4096 Gram of 4096 rows (measured on an AMX Xeon). The
    setting is global to the process and restored on exit."""
    mm = torch.backends.mkldnn.matmul
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    if stored != torch.bfloat16 or not torch.backends.mkldnn.is_available() or not has_bf16():
        yield
        return
    before = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = before


class _Signed:
    """Running signed Gram ``sum_t X_A,t^T X_B,t / scale_t^2`` and per-coordinate squared norms (float64)."""

    def __init__(self, d: int, work: Scratch) -> None:
        self.d, self.n, self.work = d, 0, work
        self.cross: torch.Tensor | None = None          # made from the first Gram: zeros + add_ costs 12x a copy
        self.sqa = torch.zeros(d, dtype=torch.float64)
        self.sqb = torch.zeros(d, dtype=torch.float64)

    def add(self, blocks: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fold one signed tensor in (its row blocks of A and B). A one-block tensor's Gram (the ``d`` vocabulary rows
        ``features.DEFAULT_MAX_ROWS`` keeps fill one 32 MB block at d=8192 in 16-bit weights) is added straight from
        the block product; several blocks' products are first summed in a reused float64 buffer. No fresh d×d memory
        per tensor."""
        d, w = self.d, self.work
        acc = prod = None
        sqa = torch.zeros(d, dtype=torch.float64)
        sqb = torch.zeros(d, dtype=torch.float64)
        for xa, xb in blocks:                               # [k, d] each
            stored = xa.dtype if xa.dtype == xb.dtype else None
            acc_dtype = torch.promote_types(_acc(xa.dtype), _acc(xb.dtype))   # fp32 against bf16: float64
            xa, xb = _widen(xa, w, "a", acc_dtype), _widen(xb, w, "b", acc_dtype)
            if prod is not None and acc is None:            # a second block: sum the products in float64
                acc = w.bytes(d * d * 8, "gram").view(torch.float64).view(d, d).copy_(prod)
            prod = w.bytes(d * d * xa.element_size(), "cross").view(xa.dtype).view(d, d)
            with _bf16_operands(stored):
                torch.mm(xa.T, xb, out=prod)
            if acc is not None:
                acc += prod
            _add_squares(xa, 0, sqa, w)
            _add_squares(xb, 0, sqb, w)
        gram = acc if acc is not None else prod
        scale = 0.5 * (sqa.sum().sqrt() + sqb.sum().sqrt())
        if gram is not None and scale > 0:
            s2 = float(scale * scale)
            # torch's mixed-dtype add_ is slow (0.84 s at d=8192 for float32 into float64): the first Gram is copied
            # into a fresh float64 buffer, the others are widened and added a cache-sized band of rows at a time
            if self.cross is None:
                self.cross = torch.empty(d, d, dtype=torch.float64).copy_(gram).mul_(1.0 / s2)
            else:
                step = max(1, CHUNK_BYTES // (8 * d))
                for r0 in range(0, d, step):
                    self.cross[r0:r0 + step].add_(gram[r0:r0 + step].to(torch.float64), alpha=1.0 / s2)
            self.sqa += sqa / s2
            self.sqb += sqb / s2
            self.n += 1

    def cosine_(self) -> torch.Tensor:
        """``cos(s_A[i], s_B[j])`` as ``feature_correlation`` forms it (``features.signed_cosine_``), in the Gram's
        memory (the Gram is consumed)."""
        cos, self.cross = signed_cosine_(self.cross, self.sqa.sqrt(), self.sqb.sqrt()), None
        return cos


def _paired_blocks(fa: CheckpointFiles, fb: CheckpointFiles, name: str, rows: torch.Tensor | None = None):
    """Both checkpoints' blocks of ``name``, read ahead of the computation."""
    slots = AHEAD + 2
    return prefetched(zip(fa.row_blocks(name, rows, slots), fb.row_blocks(name, rows, slots)))


def _moved(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.movedim(axis, -1)


def residual_correlation(fa: CheckpointFiles, fb: CheckpointFiles, max_rows: int | None = None
                         ) -> tuple[torch.Tensor, dict[str, int]]:
    """``(C [d, d] float64, counts)`` for A's residual coordinates (rows) against B's (columns); see the module
    docstring. ``max_rows`` caps the vocabulary rows per signed tensor as in ``paired_weight_features``."""
    d = int(fa.config.hidden_size)
    cap = rows_cap(max_rows)
    names = _feature_tensors(fa, fb)
    prepare_kernels(sum(math.prod(fa.shape(n)) + math.prod(fb.shape(n)) for n in names))
    work = Scratch()
    signed = _Signed(d, work)
    ua: list[torch.Tensor] = []
    ub: list[torch.Tensor] = []
    norms: list[tuple[int, str, int]] = []               # (feature position, tensor, residual axis)
    plan: list[tuple[str, Any, bool]] = []              # (tensor, residual axis, has other axes)
    for name in names:
        axes = axes_for(fa.spec, name, files=True)
        res = next(a for a in axes if a.space == "residual")
        if fa.shape(name)[res.axis] != d:
            raise GaugeError(f"tensor {name!r} has {fa.shape(name)[res.axis]} entries on its residual axis but "
                             f"hidden_size is {d}")
        plan.append((name, res, len(axes) > 1))
    # The slice norms (memory-bound passes over every layer tensor) run on a thread beside the signed Grams
    # (compute-bound): each job writes only its own result, so the numbers do not depend on the overlap.
    with ThreadPoolExecutor(1, thread_name_prefix="hf_gauge-norms") as side:
        pending = side.submit(_slice_norms, fa, fb, [(name, res.axis) for name, res, other in plan if other])
        for name, res, other in plan:
            shape = fa.shape(name)
            if not other and res.signed:
                if len(shape) == 2 and res.axis == 1:    # [free, d]: embedding, lm_head
                    rows = None
                    if shape[0] > cap:                   # the rows with the largest ||A_v|| + ||B_v||, in both
                        sa, sb = _parallel(lambda f: _slice_squares(f, name, 0), [fa, fb])
                        rows = torch.topk(sa.sqrt_() + sb.sqrt_(), cap).indices.sort().values
                    signed.add(_paired_blocks(fa, fb, name, rows))
                else:                                    # biases and other small tensors: whole
                    xa = _moved(fa.read(name), res.axis).reshape(-1, d)
                    xb = _moved(fb.read(name), res.axis).reshape(-1, d)
                    if xa.shape[0] > cap:
                        score = _row_squares(xa, work).sqrt_() + _row_squares(xb, work).sqrt_()
                        rows = torch.topk(score, cap).indices.sort().values
                        xa, xb = xa[rows], xb[rows]
                    signed.add(iter([(xa, xb)]))
            elif not other:                              # norm gains: the values themselves
                ua.append(_moved(fa.read(name), res.axis).reshape(-1, d).T.to(torch.float64))
                ub.append(_moved(fb.read(name), res.axis).reshape(-1, d).T.to(torch.float64))
            else:                                        # slice norms: blind to inner gauges and signs
                norms.append((len(ua), name, res.axis))
                ua.append(torch.empty(0))
                ub.append(torch.empty(0))
        slice_norms = pending.result()
    carried: dict[str, list[torch.Tensor]] = {}        # per-expert tensors: one feature per expert family
    for (k, name, _), (na, nb) in zip(norms, slice_norms):
        key = _expert_family(fa.spec, name)
        if key is None:
            ua[k], ub[k] = na[:, None], nb[:, None]
        else:                                            # A's expert e may be B's expert k: pool the experts
            acc = carried.setdefault(key, [torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)])
            acc[0] += na.to(torch.float64) ** 2
            acc[1] += nb.to(torch.float64) ** 2
    ua, ub = [u for u in ua if u.dim() == 2], [u for u in ub if u.dim() == 2]
    for sq_a, sq_b in carried.values():
        ua.append(sq_a.sqrt()[:, None])
        ub.append(sq_b.sqrt()[:, None])
    del work
    n_signed = signed.n
    cos = signed.cosine_() if n_signed else None
    del signed
    counts = {"n_signed": n_signed, "n_invariant": sum(int(u.shape[1]) for u in ua)}
    if ua:                                               # as feature_correlation combines the two parts
        return invariant_agreement(torch.cat(ua, 1), torch.cat(ub, 1), into=cos), counts
    return (cos if cos is not None else torch.ones(d, d, dtype=torch.float64)), counts


def _expert_family(spec: ArchSpec, name: str) -> str | None:
    """For a tensor stored once per expert (a name with a carried placeholder, ``experts.{e}.w1``): the name with
    that placeholder left open, so that one feature pools every expert (their order differs between charts)."""
    hit = spec.rule_for(name, files=True)
    if hit is None:
        return None
    rule, values = hit
    open_ = [ph for ph in spec.carriers if ph in values]
    return fill(rule.pattern, {k: v for k, v in values.items() if k not in open_}) if open_ else None


def _row_squares(x: torch.Tensor, work: Scratch) -> torch.Tensor:
    """``[n]`` float64 sums of squares of the rows of ``x`` (any shape ``[n, ...]``), as ``_add_squares`` forms them."""
    x = x.reshape(x.shape[0], -1).contiguous()
    sq = torch.zeros(x.shape[0], dtype=torch.float64)
    _add_squares(x, 1, sq, work)
    return sq


def _slice_squares(f: CheckpointFiles, name: str, axis: int) -> torch.Tensor:
    """float64 sums of squares of every slice along ``axis`` (0: rows, 1: columns) of a 2-D tensor, from its
    memory-mapped row blocks (``CheckpointFiles.mapped_blocks``)."""
    sq = torch.zeros(f.shape(name)[axis], dtype=torch.float64)
    work, r0 = Scratch(), 0
    for x in f.mapped_blocks(name):
        _add_squares(x, 1 - axis, sq if axis == 1 else sq[r0:r0 + x.shape[0]], work)
        r0 += x.shape[0]
    return sq


_J = TypeVar("_J")


def _parallel(fn: Callable[[_J], _T], jobs: list[_J]) -> list[_T]:
    """``[fn(job) for job in jobs]`` on ``torch.get_num_threads()`` threads (the compiled kernels and numpy's
    reductions release the GIL; page faults on mapped files overlap the arithmetic). Each job writes only its own
    result, so the results do not depend on the scheduling."""
    nt = min(torch.get_num_threads(), len(jobs))
    if nt <= 1:
        return [fn(j) for j in jobs]
    with ThreadPoolExecutor(nt, thread_name_prefix="hf_gauge-features") as pool:
        return list(pool.map(fn, jobs))


def _slice_norms(fa: CheckpointFiles, fb: CheckpointFiles, jobs: list[tuple[str, int]]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[d]`` L2 norms of every slice along the residual axis of each ``(name, axis)``, in A and in B: squared sums
    in float64 over memory-mapped row blocks, one tensor of one checkpoint per job, jobs shared over threads."""
    tasks = [(f, name, axis) for name, axis in jobs for f in (fa, fb)]

    def one(task: tuple[CheckpointFiles, str, int]) -> torch.Tensor:
        f, name, axis = task
        if len(f.shape(name)) == 2:
            return _slice_squares(f, name, axis)
        x = f.read(name).movedim(axis, 0)
        x = x.reshape(x.shape[0], -1).to(_acc(x.dtype))
        return (x * x).sum(1, dtype=torch.float64)
    sq = _parallel(one, tasks)
    return [(sq[2 * k].sqrt(), sq[2 * k + 1].sqrt()) for k in range(len(jobs))]


def layer_tensors(files: CheckpointFiles, spaces: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor with an axis in one of ``spaces`` (e.g. ``{"mlp.3", "attn.3"}``), read whole, stored dtype."""
    out = {}
    for name in sorted(files.entries):                   # one order for both checkpoints, whatever their sharding
        axes = axes_for(files.spec, name, files=True)
        if axes and any(sp in spaces for a in axes for sp in (a.space, *a.spaces)):
            out[name] = files.read(name)
    return out
