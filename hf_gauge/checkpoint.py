"""Streaming apply: move a (sharded) safetensors checkpoint into a gauge's target chart, one tensor at a time.

Each output shard keeps the input shard's exact safetensors header (names, dtypes, shapes, offsets and
``__metadata__`` do not change under a gauge), so the output file is sized up front, the header copied verbatim at
offset 0 and every tensor's bytes written at the same offset. The input shard is memory-mapped: each moved tensor is
split into row chunks of 512 KB (1 MB with torch's gathers) that worker threads move (compiled kernels or torch
gathers) from the page cache into a cache-resident buffer and write at their offset (``pwrite``), so every byte is
read once and written once. Runs of untouched tensors are copied inside the kernel (``copy_file_range``). Added
memory is one chunk buffer per worker plus the mapped pages of the tensors in flight (at most 128 MB, or one larger
tensor; dropped from the mapping once written), independent of the shard and checkpoint size.
Checkpoints that, with their output, exceed the memory available take the direct-I/O path instead
(``directio``: ``O_DIRECT`` reads and writes through an aligned arena, tensors moved in place; ``io=``).
The output folder is built beside ``out_dir`` and renamed into place at the end, so a failure never leaves a
half-written checkpoint.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import functools
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping

import torch

from . import directio
from .atomic import (STAGING_MARKER, clean_stale_staging, fsync_dir, fsync_file, fsync_tree, output_lock,
                     publish_mode, remove_staging, staging_dir)
from .engine import (KERNEL_IMPORT_ELEMENTS, Scratch, check_gauge, move_tensor, moves_for, prepare_kernels, row_mover,
                     source_names)
from .errors import GaugeError
from .fileconfig import checkpoint_config
from .gauge import Gauge
from .hub import CARD_NAME, REPO_ID, checkpoint_card, download_snapshot, load_gauge
from .inputs import UNREAD_DIRS, audit_folder
from .view import ConfigAbsent, ConfigView, gain_fingerprint
from .jsonio import read_json

__all__ = ["apply_gauge_to_checkpoint", "resolve_checkpoint", "read_header", "open_shard", "shard_size", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
IO_MODES = ("auto", "buffered", "direct")
SINGLE_NAME = "model.safetensors"
_GAUGES_DIR = "gauges"        # a source repo's own gauges start from the source's chart: not copied to the output
_COPY_CHUNK = 16 << 20
_CHUNK_BYTES = 512 << 10     # 2-D tensors are moved and written in row chunks of about this size (compiled kernels;
                             # torch's gathers take 2x): the chunk stays in cache until it is written
_WINDOW_BYTES = 128 << 20    # input tensors in flight on the workers (beyond one larger tensor)
_PARALLEL_BYTES = 64 << 20   # jobs moving less run on the calling thread alone

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


# ----------------------------------------------------------------------------------------------------------------
# safetensors header
# ----------------------------------------------------------------------------------------------------------------
# bits per element of every dtype the safetensors format defines (F4/F6 are packed below a byte)
_BITS: dict[str, int] = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                         "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
                         "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_MAX_HEADER = 100_000_000           # safetensors' MAX_HEADER_SIZE


def _no_constant(c: str) -> Any:
    raise ValueError(f"{c} is not JSON")


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 64


def read_header(path: str | os.PathLike) -> tuple[bytes, dict[str, dict[str, Any]], int]:
    """``(raw 8-byte length + JSON header, {name: {dtype, shape, data_offsets}}, data start)`` of a shard.

    The header is validated as the safetensors library does (any file it would refuse is a ``GaugeError`` here,
    before anything is written): length within the file and at most 100 MB, a UTF-8 JSON object, string-to-string
    ``__metadata__``, known dtypes, integer shapes and offsets, tensors that tile the data section exactly (sorted by
    offset: no gap, no overlap, nothing after the last) and ``end - begin == numel * dtype size`` for each.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise GaugeError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise GaugeError(f"{path} is not a valid safetensors file (header length {n} exceeds the file or 100 MB)")
        raw = f.read(n)

    def bad(what: str) -> GaugeError:
        return GaugeError(f"{path} is not a valid safetensors file ({what}); the shard is corrupt or hostile: "
                          "re-download the checkpoint")
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise bad("the header is not a JSON object")
        header = json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("the header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ must map strings to strings")
    start = 8 + n
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _BITS:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_index(x) for x in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(x) for x in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] integers")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    end = 0
    for b, e, name, dtype, shape in sorted(entries, key=lambda t: (t[0], t[1])):
        if b != end or e < b:
            raise bad(f"tensor {name!r} at bytes [{b}, {e}) leaves a gap or overlaps the previous tensor (ends at {end})")
        numel = 1
        for x in shape:
            numel *= x
        nbits = numel * _BITS[dtype]
        if nbits % 8 or nbits // 8 != e - b:
            raise bad(f"tensor {name!r} is {dtype} of shape {shape} ({nbits / 8:g} bytes) but spans {e - b} bytes")
        end = e
    if start + end != size:
        raise bad(f"the tensors end at byte {start + end} but the file has {size} bytes "
                  f"({'truncated' if start + end > size else 'trailing bytes'})")
    return head + raw, header, start


# ----------------------------------------------------------------------------------------------------------------
# input resolution
# ----------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(src: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                       endpoint: str | None = None) -> Path:
    """A local folder as is; a Hub id downloaded with ``snapshot_download`` (cache, revision, offline honoured)."""
    p = Path(src)
    if p.is_dir():
        return p
    if p.exists():
        raise GaugeError(f"{p} is a file; pass the checkpoint folder (config.json + *.safetensors)")
    if not isinstance(src, str) or p.is_absolute() or not REPO_ID.match(src):
        raise GaugeError(f"no checkpoint folder at {p} (and it is not a Hub repository id)")
    return download_snapshot(src, src, revision=revision, token=token, cache_dir=cache_dir,
                             local_files_only=local_files_only, endpoint=endpoint)


def shard_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name (the only shard names a checkpoint index may hold), else ``GaugeError``.

    Index files come from the Hub and are untrusted: a ``../`` or absolute name would make a streaming apply read
    or write outside the checkpoint and output folders. Shards always sit beside the index, so any separator, a
    drive, a dot name or a NUL byte is refused before any file is opened.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or ":" in name or len(name) > 255 or Path(name).name != name):
        raise GaugeError(f"{where} names the shard {name!r}, which is not a plain file name; a checkpoint index may "
                         "only name shard files in its own folder (the file may be corrupt or hostile)")
    return name


def _shards(src: Path) -> list[str]:
    index = src / INDEX_NAME
    if index.is_file():
        doc = read_json(index, str(index), "re-download the checkpoint")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise GaugeError(f"{index} is corrupt (no weight_map object); re-download the checkpoint")
        items = list(weight_map.items())
        for key, _ in items:
            if not isinstance(key, str):
                raise GaugeError(f"{index} is corrupt: tensor name {key!r} is not a string")
        shards = sorted({shard_name(v, str(index)) for _, v in items})
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise GaugeError(f"{src} lacks shard(s) {missing[:3]} listed in {INDEX_NAME}; the download is incomplete")
        return shards
    if (src / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    if any(src.glob("*.bin")) or any(src.glob("*.pt")) or any(src.glob("*.pth")):
        raise GaugeError(f"{src} holds pickled weights only; hf_gauge reads safetensors only (never pickle). Convert "
                         "with model.save_pretrained(out, safe_serialization=True) first.")
    raise GaugeError(f"{src} holds no {SINGLE_NAME} or {INDEX_NAME}; is it a transformers checkpoint folder?")


def _inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def shard_size(header: Mapping[str, dict], start: int) -> int:
    """The byte size of a shard whose validated header is ``header`` with data starting at ``start``."""
    return start + max((int(i["data_offsets"][1]) for i in header.values()), default=0)


def open_shard(path: Path, size: int | None = None) -> int:
    """A read-only fd of a shard validated earlier (``read_header``), still ``size`` bytes long (when given).

    A shard deleted, replaced or truncated after validation is a one-line ``GaugeError`` naming it here, before it
    is read or mapped (a mapped file cut short would end the process with SIGBUS)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise GaugeError(f"cannot open {path}: {e.strerror or e}; the shard was removed or changed after it was "
                         "validated: re-download the checkpoint") from None
    have = os.fstat(fd).st_size
    if size is not None and have != size:
        os.close(fd)
        raise GaugeError(f"{path} has {have} bytes but its header was validated for {size}: the shard was "
                         f"{'truncated' if have < size else 'changed'} after it was validated; re-download the "
                         "checkpoint")
    return fd


# ----------------------------------------------------------------------------------------------------------------
# the streaming kernel
# ----------------------------------------------------------------------------------------------------------------
def _pread_into(fd: int, buf: memoryview, offset: int, name: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (positional reads: safe beside the worker threads' I/O)."""
    got = 0
    while got < len(buf):
        try:
            n = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as e:
            raise GaugeError(f"reading {name} failed: {e.strerror or e}; re-download the checkpoint") from None
        if n <= 0:
            raise GaugeError(f"unexpected end of file in {name}: the shard was truncated after it was validated; "
                             "re-download the checkpoint")
        got += n


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (positional: worker threads write their ranges concurrently)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _copy_range(fin: int, fout: int, src: int, dst: int, n: int, mapped: "_MappedShard") -> None:
    """``n`` bytes of ``fin`` at ``src`` to ``fout`` at ``dst``: ``copy_file_range`` (inside the kernel, or a
    reflink), falling back to writes from the mapping where the file system cannot."""
    copy = getattr(os, "copy_file_range", None)
    while n > 0 and copy is not None:
        try:
            k = copy(fin, fout, min(n, 1 << 30), src, dst)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            break
        if k <= 0:
            break
        src, dst, n = src + k, dst + k, n - k
    while n > 0:
        k = min(n, _COPY_CHUNK)
        with memoryview(mapped.mm) as view:
            _pwrite_all(fout, view[src:src + k], dst)
        mapped.release(src, k)
        src, dst, n = src + k, dst + k, n - k


class _MappedShard:
    """A shard mapped copy-on-write and never written: tensors are views of the page cache (no read copy, no input
    buffer). Pages are dropped from this process's mapping once used, so the mapped set stays about one tensor."""

    def __init__(self, f: BinaryIO) -> None:
        size = os.fstat(f.fileno()).st_size
        self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        if self.mm is not None and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_SEQUENTIAL)

    def tensor(self, offset: int, n: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        u8 = torch.frombuffer(self.mm, dtype=torch.uint8, count=n, offset=offset)
        if offset % dtype.itemsize:          # safetensors aligns tensors; a file that does not is read by copy
            u8 = u8.clone()
        return u8.view(dtype).reshape(shape)

    def prefetch(self, offset: int, n: int) -> None:
        """Ask the kernel to read ``[offset, offset + n)`` ahead (``MADV_WILLNEED``: asynchronous, sequential). The
        row gathers of a permuted axis touch a tensor's pages out of order; from a shard the page cache does not
        hold, each would be a small random read (a 20 GB checkpoint on a 23 GB machine: apply 1.49x a copy)."""
        if self.mm is None or n <= 0 or not hasattr(mmap, "MADV_WILLNEED"):
            return
        a = offset - offset % mmap.PAGESIZE
        self.mm.madvise(mmap.MADV_WILLNEED, a, min(len(self.mm), offset + n) - a)

    def release(self, offset: int, n: int) -> None:
        """Drop ``[offset, offset + n)`` from the mapping (the pages stay in the page cache; a re-read re-maps them)."""
        if self.mm is None or n <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        a = offset - offset % mmap.PAGESIZE
        self.mm.madvise(mmap.MADV_DONTNEED, a, min(len(self.mm), offset + n) - a)

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:              # a tensor view is still alive: the mapping goes when it does
                pass


def _read_tensor(fin: BinaryIO, offset: int, n: int, dtype: torch.dtype, shape: list[int],
                 buf: torch.Tensor | None = None) -> torch.Tensor:
    buf = torch.empty(n, dtype=torch.uint8) if buf is None else buf
    if n:
        _pread_into(fin.fileno(), memoryview(buf.numpy()), offset, fin.name)
    return buf.view(dtype).reshape(shape)


def _row_chunks(t: torch.Tensor, moves: tuple, chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of the output computed one at a time (the whole tensor when it is small or not 2-D)."""
    if t.dim() != 2 or t.numel() * t.element_size() <= chunk_bytes or any(m.axis not in (0, 1) for m in moves):
        return [(0, t.shape[0] if t.dim() else 1)]
    step = max(1, chunk_bytes // max(1, t.shape[1] * t.element_size()))
    return [(r0, min(t.shape[0], r0 + step)) for r0 in range(0, t.shape[0], step)]


class _Pool:
    """Tensors' row chunks moved and written on worker threads, each straight from the mapped input through a
    cache-sized per-thread buffer to its offset in the output (``pwrite``; the kernels and file I/O release the GIL).

    At most ``window`` bytes of input tensors are in flight beside the one being submitted (a larger tensor waits
    for all earlier ones): a tensor's mapped pages are dropped (``done``) once all its chunks are written.
    """

    def __init__(self, workers: int, window: int) -> None:
        self.pool = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf_gauge-apply") if workers > 1
                     else None)
        self.local = threading.local()
        self.window = window
        self.inflight: collections.deque = collections.deque()      # (futures, bytes, done callback)
        self.bytes = 0
        self.failed = False

    def scratch(self) -> Scratch:
        s = getattr(self.local, "scratch", None)
        if s is None:
            s = self.local.scratch = Scratch()
        return s

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if self.failed:                  # an earlier chunk failed: the job is abandoned
                return
            try:
                fn()
            except BaseException:
                self.failed = True
                raise
        return run

    def submit(self, jobs: list[Callable[[], None]], nbytes: int, done: Callable[[], None] | None = None) -> None:
        """Run ``jobs`` (one tensor's chunks, any order), then ``done`` on this thread once they all finished."""
        while self.inflight and self.bytes + nbytes > max(self.window, nbytes):
            self._drain_one()
        if self.pool is None:
            for job in jobs:
                job()
            futures = []
        else:
            futures = [self.pool.submit(self._guard(job)) for job in jobs]
        self.inflight.append((futures, nbytes, done))
        self.bytes += nbytes

    def _drain_one(self) -> None:
        futures, nbytes, done = self.inflight.popleft()
        self.bytes -= nbytes
        for f in futures:
            f.result()                       # re-raises a worker's error here
        if done is not None:
            done()

    def finish(self) -> None:
        while self.inflight:
            self._drain_one()

    def close(self) -> None:
        """Wait for every job (also after an error: no worker may touch the mapping once it is closed)."""
        self.failed = self.failed or bool(self.inflight)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.inflight.clear()
        self.bytes = 0


def _move_chunk(pool: _Pool, t: torch.Tensor, moves: tuple, rows: Callable | None, r0: int, r1: int, fd: int,
                at: int, where: str) -> None:
    """Rows ``r0:r1`` of moved ``t`` (``rows``: its ``engine.row_mover``; ``None``: all of ``t``, moved whole) into
    this thread's buffer, then to ``fd`` at ``at``."""
    nbytes = t.numel() * t.element_size() if rows is None else (r1 - r0) * t.shape[1] * t.element_size()
    if nbytes == 0:
        return
    scratch = pool.scratch()
    shape = list(t.shape) if rows is None else [r1 - r0, t.shape[1]]
    out = scratch.bytes(nbytes, "out").view(t.dtype).reshape(shape)
    try:
        y = move_tensor(t, moves, out=out, scratch=scratch) if rows is None else rows(r0, r1, out, scratch)
    except GaugeError as err:
        raise GaugeError(f"{where}: {err}") from None
    _pwrite_all(fd, y.reshape(-1).view(torch.uint8).numpy(), at)


def _moved_dtype(src: Path, name: str, info: dict, sources: Mapping[str, tuple[Path, str, dict, int]]
                 ) -> torch.dtype:
    """The torch dtype of a tensor that moves (or comes from another name), checked: a dtype hf_gauge can move,
    and a renamed tensor's source of the same dtype and shape."""
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise GaugeError(f"{src.name}: tensor {name!r} has dtype {info['dtype']} that hf_gauge cannot move")
    if name in sources:
        _, sname, sinfo, _ = sources[name]
        if sinfo["dtype"] != info["dtype"] or list(sinfo["shape"]) != list(info["shape"]):
            raise GaugeError(f"{src.name}: {name!r} ({info['dtype']} {info['shape']}) takes the place of "
                             f"{sname!r}, which has another dtype or shape; the checkpoint's "
                             "experts differ in shape and cannot be permuted")
    return dtype


def _direct_items(src: Path, plan: dict[str, tuple], header: dict, start: int,
                  sources: Mapping[str, tuple[Path, str, dict, int]]) -> list[directio.Item]:
    """The shard's tensors for ``directio.stream_shard``: absolute offsets, moves, and a reader of the source bytes
    of a tensor renamed by the gauge (from its shard, by positional reads)."""
    items = []
    for name, info in header.items():
        b, e = info["data_offsets"]
        moves = plan.get(name, ())
        if not moves and name not in sources:
            items.append(directio.Item(start + b, start + e, name, None, info["shape"]))
            continue
        dtype = _moved_dtype(src, name, info, sources)
        fill = None
        if name in sources:
            path, sname, sinfo, sstart = sources[name]
            sb, se = sinfo["data_offsets"]
            fill = functools.partial(_fill_from, path, sstart + sb, f"{path.name}: {sname}")
        items.append(directio.Item(start + b, start + e, name, dtype, info["shape"], moves, fill))
    return items


def _fill_from(path: Path, offset: int, where: str, view: memoryview) -> None:
    """``view`` := the bytes of ``path`` at ``offset`` (a renamed tensor's source)."""
    fd = open_shard(path)
    try:
        _pread_into(fd, view, offset, where)
    finally:
        os.close(fd)


def _stream_shard(src: Path, dst: Path, plan: dict[str, tuple], header: dict, raw: bytes, start: int,
                  bar: Any, pool: _Pool | None = None, chunk_bytes: int | None = None,
                  sources: Mapping[str, tuple[Path, str, dict, int]] | None = None) -> None:
    """Write ``dst``: ``src``'s header, then every tensor moved (or copied raw) at its original offset.

    ``sources`` maps a tensor renamed by the gauge (per-expert tensors under a permutation of the experts) to where
    its source tensor lies (shard path, tensor name, header entry, data start); it is read from there, moved, and
    written here.

    The output file is sized up front and the header written at offset 0; each tensor is split into row chunks that
    ``pool``'s workers move from the mapped input into a small buffer and write at their offset, so every byte is
    read once from the page cache and written once. Runs of untouched tensors are copied with ``copy_file_range``.
    """
    chunk_bytes = chunk_bytes or _CHUNK_BYTES
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    sources = sources or {}
    size = shard_size(header, start)
    own = pool is None
    pool = pool or _Pool(1, _WINDOW_BYTES)
    with open(open_shard(src, size), "rb") as fin, open(dst, "wb") as fout, contextlib.ExitStack() as others:
        fd = fout.fileno()
        shard = _MappedShard(fin)
        opened: dict[Path, BinaryIO] = {}
        try:
            os.ftruncate(fd, size)
            _pwrite_all(fd, raw, 0)
            run: list[int] | None = None       # a run of untouched tensors, copied as one byte range
            for k, name in enumerate(order):
                info = header[name]
                b, e = info["data_offsets"]
                moves = plan.get(name, ())
                if not moves and name not in sources:
                    run = [run[0], e] if run else [b, e]
                    bar.update(e - b)
                    continue
                if run:
                    _copy_range(fin.fileno(), fd, start + run[0], start + run[0], run[1] - run[0], shard)
                    run = None
                dtype = _moved_dtype(src, name, info, sources)
                if name in sources:            # renamed: the moved tensor comes from another name
                    path, sname, sinfo, sstart = sources[name]
                    if path not in opened:
                        opened[path] = others.enter_context(open(open_shard(path), "rb"))
                    sb, se = sinfo["data_offsets"]
                    t = _read_tensor(opened[path], sstart + sb, se - sb, dtype, info["shape"])
                    done = None
                else:                          # this tensor read ahead, and the next one behind it
                    nxt = header[order[k + 1]]["data_offsets"][1] if k + 1 < len(order) else e
                    shard.prefetch(start + b, nxt - b)
                    t = shard.tensor(start + b, e - b, dtype, info["shape"])
                    done = functools.partial(shard.release, start + b, e - b)
                chunks = _row_chunks(t, moves, chunk_bytes)
                row_bytes = t.shape[1] * t.element_size() if t.dim() == 2 else 0
                where = f"{src.name}: {name}"
                try:                           # checks and kernel operands once per tensor, not per chunk
                    rows = row_mover(t, moves) if len(chunks) > 1 else None
                except GaugeError as err:
                    raise GaugeError(f"{where}: {err}") from None
                pool.submit([functools.partial(_move_chunk, pool, t, moves, rows, r0, r1, fd,
                                               start + b + r0 * row_bytes, where) for r0, r1 in chunks], e - b, done)
                del t
                bar.update(e - b)
            if run:
                _copy_range(fin.fileno(), fd, start + run[0], start + run[0], run[1] - run[0], shard)
            pool.finish()
        except BaseException:
            pool.close()                       # every worker stops before the mapping goes
            raise
        finally:
            if own:
                pool.close()
            shard.close()


def _check_fingerprint(src: Path, shards: Iterable[str], spec, gauge: Gauge, strict: bool) -> None:
    want = gauge.source.get("fingerprint")
    if not want:
        return
    for s in shards:
        raw, header, start = read_header(src / s)
        key = spec.final_norm_key(header)
        if key is not None:
            info = header[key]
            b, e = info["data_offsets"]
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise GaugeError(f"{src / s}: {key} has dtype {info['dtype']}, which hf_gauge cannot read")
            with open(open_shard(src / s, shard_size(header, start)), "rb") as f:
                gain = _read_tensor(f, start + b, e - b, dtype, info["shape"])
            have = gain_fingerprint(gain)
            if have != want:
                msg = (f"the gauge expects a source chart with fingerprint {want} but the checkpoint's is {have}; "
                       "it may be a fine-tune of the source (fine) or already gauged or another model")
                if strict:
                    raise GaugeError(msg + " (strict=True refuses)")
                warnings.warn(msg, stacklevel=3)
            return


def _config_and_plans(src: Path, gauge: Gauge, headers: Mapping[str, tuple[bytes, dict, int]], stored: bool
                      ) -> tuple[ConfigView, Any, dict[str, dict[str, tuple]], dict[str, tuple[Path, str, dict, int]]]:
    """``(config, spec, {shard: {tensor: moves}}, {renamed tensor: where its source lies})`` (see ``_stream_shard``),
    the config checked against the headers (``fileconfig.checkpoint_config``; ``stored``: as the file holds it,
    ``ConfigAbsent`` where a value needs transformers' defaults) and the gauge against the config."""
    config, spec = checkpoint_config(src, {n: i for _, h, _ in headers.values() for n, i in h.items()}, stored=stored)
    if gauge.source.get("model_type") not in (None, config.model_type):
        raise GaugeError(f"the gauge was fitted for model_type={gauge.source['model_type']!r} but {src} is "
                         f"{config.model_type!r}")
    check_gauge(spec, config, gauge)
    plans, sources = {}, {}
    where = {n: s for s, (_, header, _) in headers.items() for n in header}
    for s, (_, header, _) in headers.items():
        renamed = source_names(spec, gauge, header, files=True, config=config)
        for n, sn in renamed.items():
            if sn not in where:
                raise GaugeError(f"{s}: {n!r} takes the place of {sn!r}, which the checkpoint lacks")
            _, h_s, start_s = headers[where[sn]]
            sources[n] = (src / where[sn], sn, h_s[sn], start_s)
        moves = moves_for(spec, config, gauge, [renamed.get(n, n) for n in header], strict=True, files=True)
        plans[s] = {n: moves[renamed.get(n, n)] for n in header}
    return config, spec, plans, sources


def apply_gauge_to_checkpoint(src_dir: str | os.PathLike, gauge: Gauge | str | os.PathLike,
                              out_dir: str | os.PathLike, progress: bool = True, *, strict: bool = False,
                              overwrite: bool = False, durable: bool = True, io: str = "auto",
                              revision: str | None = None, token: str | bool | None = None,
                              cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                              endpoint: str | None = None) -> Path:
    """Write ``src_dir`` moved through ``gauge`` to ``out_dir`` without loading the model; returns ``out_dir``.

    ``src_dir`` is a checkpoint folder or a Hub id (``snapshot_download``). Shards keep their names and the index
    is copied, as are ``config.json``, tokenizer files and every other file, except a ``gauges/`` folder and, for a
    Hub source, its ``README.md`` (they describe the source's chart; the output gets its own card). ``out_dir`` must not exist (or be
    empty) unless ``overwrite=True``, and may not lie inside ``src_dir``. ``strict=True`` refuses a gauge whose
    source fingerprint differs from the checkpoint's (otherwise a warning). ``durable`` fsyncs each shard before
    the final rename (crash-safe on power loss; costs about a third of the time on slow disks). One run at a time
    writes an output: a second one gets a ``GaugeError`` at once (a ``filelock`` lock, ``.NAME.hf_gauge.lock``
    beside ``out_dir``), and without ``overwrite`` an output that appeared meanwhile is refused at publish time too.
    ``io``: ``"buffered"`` streams through the page cache (mapped input, row chunks on worker threads);
    ``"direct"`` moves tensors in place in an aligned arena read and written with ``O_DIRECT`` (``directio``; about
    the largest tensor + 128 MB of memory); ``"auto"`` (default) takes direct I/O when the checkpoint and its output
    would not fit in the memory available for the page cache (``directio.direct_wanted``).
    """
    if io not in IO_MODES:
        raise GaugeError(f"io={io!r} is not one of {', '.join(IO_MODES)}")
    if not isinstance(gauge, Gauge):
        gauge = load_gauge(gauge)
    src = resolve_checkpoint(src_dir, revision=revision, token=token, cache_dir=cache_dir,
                             local_files_only=local_files_only, endpoint=endpoint)
    files = audit_folder(src, UNREAD_DIRS | {_GAUGES_DIR})   # links and special files, before anything is read
    out = Path(out_dir)
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or _inside(out_r, src_r):
        raise GaugeError(f"refusing to write into the source checkpoint: {out} is {src} or inside it; choose an "
                         "output folder elsewhere")
    if out.exists():
        if not out.is_dir():
            raise GaugeError(f"{out} exists and is a file; choose a new output folder")
        if any(out.iterdir()) and not overwrite:
            raise GaugeError(f"{out} already exists and is not empty; choose a new folder or pass overwrite=True")
        if _inside(src_r, out_r):
            raise GaugeError(f"refusing to replace {out}: the source checkpoint {src} lies inside it")
    if sys.byteorder != "little":
        raise GaugeError("streaming apply needs a little-endian machine (safetensors stores little-endian data)")
    shards = _shards(src)
    headers = {s: read_header(src / s) for s in shards}
    try:                                        # config.json as stored: no transformers config import (about 1 s)
        config, spec, plans, sources = _config_and_plans(src, gauge, headers, stored=True)
    except ConfigAbsent:                        # a default of transformers' config class is needed
        config, spec, plans, sources = _config_and_plans(src, gauge, headers, stored=False)
    _check_fingerprint(src, shards, spec, gauge, strict)

    from tqdm.auto import tqdm

    total = sum(sum(i["data_offsets"][1] - i["data_offsets"][0] for i in h.values()) for _, h, _ in headers.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = tmp = None
    try:
        lock = output_lock(out)               # a second writer of out: GaugeError now, not a silent replacement
        if not overwrite and out.is_dir() and any(out.iterdir()):
            raise GaugeError(f"{out} was written by another run meanwhile; choose a new folder or pass overwrite=True")
        clean_stale_staging(out)              # staging folders of killed runs into the same output
        tmp = staging_dir(out)
        moved = [headers[s][1][n] for s in shards for n, mv in plans[s].items() if mv or n in sources]
        moved_bytes = sum(i["data_offsets"][1] - i["data_offsets"][0] for i in moved)
        direct = io == "direct" or (io == "auto" and directio.direct_wanted(total))
        # the job's work, the elements moved, decides whether to load the compiled kernels; direct I/O moves whole
        # tensors in place, which torch's gathers do only through a tensor-sized copy: it loads them at any size
        work = sum(math.prod(i["shape"]) for i in moved)
        compiled = prepare_kernels(max(work, KERNEL_IMPORT_ELEMENTS) if direct and work else work)
        # the compiled kernels' chunks stay in cache for the write (512 KB: 1.95 s of CPU for the 1.8 GB bf16
        # benchmark's apply, 256 KB 2.27 s, 1 MB 2.78 s, medians of 3 interleaved runs); torch's gathers pay a
        # fixed cost per call (1 MB: 2.8-3.0 s of CPU for the streaming, 256 KB: 3.1-3.8 s), so they take 2x
        chunk = _CHUNK_BYTES if compiled else 2 * _CHUNK_BYTES
        workers = max(2, torch.get_num_threads()) if moved_bytes >= _PARALLEL_BYTES and not direct else 1
        pool = _Pool(workers, _WINDOW_BYTES)
        arena = None
        if direct:
            items = {s: _direct_items(src / s, plans[s], headers[s][1], headers[s][2], sources) for s in shards}
            arena = directio.Arena(max(directio.arena_bytes(directio.segments(items[s], headers[s][2]))
                                       for s in shards))
        # durable: each finished shard is fsynced on a thread while the next one is moved (its data reaches the
        # disk behind the work instead of all at the end)
        syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_gauge-fsync") if durable else None
        synced = []
        try:
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="apply gauge",
                      disable=not progress) as bar:
                for s in shards:
                    raw, header, start = headers[s]
                    (tmp / s).parent.mkdir(parents=True, exist_ok=True)
                    bar.set_postfix_str(s)
                    if arena is not None:
                        directio.stream_shard(src / s, tmp / s, raw, start, shard_size(header, start), items[s],
                                              arena, bar.update)
                    else:
                        _stream_shard(src / s, tmp / s, plans[s], header, raw, start, bar, pool, chunk, sources)
                    if syncer is not None:
                        synced.append(syncer.submit(fsync_file, tmp / s))
            for f in synced:
                f.result()
        finally:
            pool.close()
            if arena is not None:
                arena.close()
            if syncer is not None:
                syncer.shutdown(wait=True, cancel_futures=True)
        written = set(shards)
        hub_src = not Path(src_dir).is_dir()           # downloaded: its card and gauges/ describe the source repo
        for rel, path in files.items():
            if rel in written or (hub_src and rel == CARD_NAME):   # a Hub card describes the source repo
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / rel)           # a new regular file (links resolved inside the folder)
        if hub_src:
            card = checkpoint_card(gauge, str(src_dir), (src / CARD_NAME).read_text(encoding="utf-8", errors="replace")
                                   if (src / CARD_NAME).is_file() else None)
            card.save(str(tmp / CARD_NAME))
        if durable:
            fsync_tree(tmp)
        publish_mode(tmp, directory=True)     # mkdtemp made it 0700
        if overwrite and out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _publish_new(tmp, out)
        tmp = None
        (out / STAGING_MARKER).unlink(missing_ok=True)   # after the rename: a kill never leaves an unmarked staging folder
        fsync_dir(out.parent)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                remove_staging(tmp)
        raise
    finally:
        if lock is not None:
            lock.release()
    return out


def _publish_new(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, which must be absent or an empty folder at this instant (``rename(2)``
    refuses a non-empty one): an output that appeared meanwhile is never replaced without ``overwrite``."""
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise GaugeError(f"{out} appeared while this run was writing it and was left as it is; choose a new "
                             "folder or pass overwrite=True") from None
        raise
