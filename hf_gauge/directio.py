"""Streaming apply with direct I/O, for checkpoints the page cache cannot hold beside their output.

A shard is processed in file order as segments: runs of whole tensors of at most 64 MB, or one larger tensor. The
block-aligned byte range ``[A, B)`` around a segment ``[a, b)`` (``A = a`` rounded down, ``B = b`` rounded up to
4096 bytes) is read with ``O_DIRECT`` into a ring arena, the segment's moved tensors are moved in place there
(``engine.move_tensors_``: index moves, bit-exact) and ``[A, b)`` rounded down is written with ``O_DIRECT`` at the
same offsets. The partial block at ``b`` goes into the next segment's head (its buffer starts at the same block), so
every byte is read once and written once, each block written once, without the page cache: no page-cache copy
(``copy_folio_from_iter_atomic``) and no reclaim of a cache that cannot keep the data anyway. A reader thread fills
the arena ahead of the moves and a writer thread drains it behind them. The arena holds the largest segment plus a
128 MB window, allocated once and reused (peak memory: about the largest tensor + 128 MB). Where the file system
refuses ``O_DIRECT`` (tmpfs, some network file systems), the same pipeline runs on ordinary file descriptors.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import mmap
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .engine import Move, Scratch, move_tensors_
from .errors import GaugeError

__all__ = ["Item", "Arena", "stream_shard", "segments", "arena_bytes", "direct_wanted", "available_memory", "BLOCK",
           "SEGMENT_BYTES", "WINDOW_BYTES"]

BLOCK = 4096                  # O_DIRECT alignment of offsets, lengths and buffers (covers 512 B and 4 KiB sectors)
SEGMENT_BYTES = 64 << 20      # small tensors are grouped into segments of at most this size
WINDOW_BYTES = 128 << 20      # the arena's room beyond the largest segment: reads ahead, writes behind
_MAX_IO = 1 << 30             # bytes per read/write call (Linux moves at most 2 GiB - 4 KiB per call)


@dataclass
class Item:
    """One tensor of a shard: absolute file offsets ``[begin, end)``, how it moves (``moves`` empty: copied as
    is), and ``fill`` where its bytes come from elsewhere (a tensor renamed by the gauge: ``fill(view)`` writes
    the source tensor's bytes into ``view``)."""
    begin: int
    end: int
    name: str
    dtype: torch.dtype | None
    shape: list[int]
    moves: tuple[Move, ...] = ()
    fill: Callable[[memoryview], None] | None = None


def _down(x: int) -> int:
    return x - x % BLOCK


def _up(x: int) -> int:
    return _down(x + BLOCK - 1)


def segments(items: list[Item], start: int, limit: int | None = None) -> list[tuple[int, int, list[Item]]]:
    """``(a, b, items)`` covering ``[0, end of data)`` in file order: the first starts at 0 (it carries the
    header, bytes ``[0, start)``); consecutive tensors are grouped while the group stays within ``limit`` bytes
    (default ``SEGMENT_BYTES``), a larger tensor is a segment of its own."""
    limit = SEGMENT_BYTES if limit is None else limit
    out: list[tuple[int, int, list[Item]]] = []
    a, group = 0, []
    for it in sorted(items, key=lambda i: i.begin):
        if group and it.end - a > limit:
            out.append((a, group[-1].end, group))
            a, group = group[-1].end, []
        group.append(it)
    if group or start:
        out.append((a, group[-1].end if group else start, group))
    return out


def arena_bytes(segs: list[tuple[int, int, list[Item]]]) -> int:
    """The arena a pipeline over ``segs`` needs: its largest aligned segment (one block more: a segment's buffer
    starts at the block holding the previous segment's tail) plus the window."""
    return max((_up(b) - _down(a) + BLOCK for a, b, _ in segs), default=BLOCK) + WINDOW_BYTES


class Arena:
    """A ring of aligned anonymous memory (``mmap``: page-aligned, faulted once and reused across shards) from
    which spans are taken and returned in FIFO order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = _up(capacity)
        self.mem = mmap.mmap(-1, self.capacity)
        self.view = memoryview(self.mem)
        self.live: collections.deque = collections.deque()      # (offset, size), oldest first
        self.cond = threading.Condition()
        self.stopped = False

    def take(self, n: int) -> int:
        """The offset of ``n`` free bytes (``n`` a multiple of ``BLOCK``), waiting for older spans to be freed."""
        if n > self.capacity:
            raise GaugeError(f"a {n}-byte segment does not fit the {self.capacity}-byte arena (internal error)")
        with self.cond:
            while True:
                if self.stopped:
                    raise _Stopped()
                off = self._fit(n)
                if off is not None:
                    self.live.append((off, n))
                    return off
                self.cond.wait()

    def _fit(self, n: int) -> int | None:
        if not self.live:
            return 0
        tail = self.live[0][0]
        head = self.live[-1][0] + self.live[-1][1]
        if head > tail:                      # not wrapped: room after head, or from 0 up to tail
            if head + n <= self.capacity:
                return head
            return 0 if n <= tail else None
        return head if head + n <= tail else None

    def give(self, off: int) -> None:
        """Return the oldest span (it starts at ``off``)."""
        with self.cond:
            first, _ = self.live.popleft()
            assert first == off, "arena spans are returned in the order they were taken"
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def close(self) -> None:
        self.view.release()
        try:
            self.mem.close()
        except BufferError:                  # a tensor view of the arena is still alive: the mapping goes with it
            pass


class _Stopped(Exception):
    """The pipeline stopped after an error elsewhere."""


def _open(path: Path, flags: int, mode: int = 0o666) -> tuple[int, bool]:
    """``(fd, direct)``: ``path`` opened with ``O_DIRECT`` where the file system allows, else without."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, mode), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False


def _buffered(fd: int) -> None:
    """Drop ``O_DIRECT`` from ``fd`` (a device or file system that refuses an aligned direct transfer)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))


def _io(call: Callable[[int, memoryview, int], int], fd: int, view: memoryview, offset: int) -> int:
    """Bytes moved by ``call`` over all of ``view`` at ``offset`` (``pread``/``pwrite`` style; stops at end of file
    for reads), retried on ordinary I/O where ``O_DIRECT`` is refused with ``EINVAL``."""
    done = 0
    while done < len(view):
        try:
            n = call(fd, view[done:done + _MAX_IO], offset + done)
        except OSError as e:
            if e.errno != errno.EINVAL or not (fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)):
                raise
            _buffered(fd)
            continue
        if n <= 0:
            break
        done += n
    return done


def _pread(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


def _pwrite(fd: int, view: memoryview, offset: int) -> int:
    return os.pwritev(fd, [view], offset)


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` in bytes (Linux), ``None`` where the kernel does not say."""
    try:
        with open(meminfo, encoding="ascii") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        return None


def direct_wanted(total_bytes: int, available: int | None = None) -> bool:
    """``io="auto"``: direct I/O when the checkpoint and its output (``2 * total_bytes``) exceed the memory
    available for the page cache (``available``, default ``available_memory()``): the cache could not keep them,
    so passing the data through it only adds a copy and a reclaim per page. Never without ``O_DIRECT``."""
    available = available_memory() if available is None else available
    return hasattr(os, "O_DIRECT") and available is not None and 2 * total_bytes > available


def _move_segment(arena: Arena, off: int, a0: int, items: list[Item], scratch: Scratch, where: str) -> None:
    """Move ``items`` in place in the arena span at ``off`` that holds file bytes from ``a0`` on."""
    pending = []
    copies = []
    for it in items:
        if not it.moves or it.end == it.begin:
            continue
        n, at = it.end - it.begin, off + it.begin - a0
        u8 = torch.frombuffer(arena.mem, dtype=torch.uint8, count=n, offset=at)
        if at % it.dtype.itemsize:           # safetensors aligns tensors; one that is not moves through a copy
            t = u8.clone().view(it.dtype).reshape(it.shape)
            copies.append((u8, t))
        else:
            t = u8.view(it.dtype).reshape(it.shape)
        pending.append((t, it.moves, it.name))
    try:
        move_tensors_([(t, m) for t, m, _ in pending], scratch)
    except GaugeError as err:
        names = ", ".join(n for _, _, n in pending[:3])
        raise GaugeError(f"{where}: {names}: {err}") from None
    for u8, t in copies:
        u8.copy_(t.reshape(-1).view(torch.uint8))


def stream_shard(src: Path, dst: Path, raw: bytes, start: int, size: int, items: list[Item], arena: Arena,
                 progress: Callable[[int], Any]) -> bool:
    """Write ``dst``, ``size`` bytes: ``raw`` (the validated header) at 0, then every item moved in place, through
    ``arena`` (module docstring). Returns whether both files took ``O_DIRECT``."""
    segs = segments(items, start)
    fin, din = _open(src, os.O_RDONLY)
    try:
        if os.fstat(fin).st_size != size:
            raise GaugeError(f"{src} has {os.fstat(fin).st_size} bytes but its header was validated for {size}: "
                             "the shard was changed after it was validated; re-download the checkpoint")
        fout, dout = _open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except BaseException:
        os.close(fin)
        raise
    arena.stopped = False
    reads: queue.Queue = queue.Queue()
    writes: queue.Queue = queue.Queue()
    errors: list[BaseException] = []

    def fail(e: BaseException) -> None:
        errors.append(e)
        arena.stop()
        reads.put(None)

    def reader() -> None:
        try:
            for a, b, group in segs:
                lo, hi = _down(a), _up(b)
                off = arena.take(hi - lo)
                view = arena.view[off:off + hi - lo]
                got = _io(_pread, fin, view, lo)
                if got < min(hi, size) - lo:
                    raise GaugeError(f"unexpected end of file in {src}: the shard was truncated after it was "
                                     "validated; re-download the checkpoint")
                for it in group:
                    if it.fill is not None:
                        it.fill(view[it.begin - lo:it.end - lo])
                reads.put((a, b, group, off))
        except _Stopped:
            pass
        except BaseException as e:           # noqa: BLE001 (re-raised on the calling thread)
            fail(e)

    def writer() -> None:
        try:
            while True:
                job = writes.get()
                if job is None:
                    return
                off, lo, n, done = job
                if n and _io(_pwrite, fout, arena.view[off:off + n], lo) != n:
                    raise GaugeError(f"writing {dst} failed: short write (is the disk full?)")
                arena.give(off)
                progress(done)
        except BaseException as e:           # noqa: BLE001
            fail(e)

    threads = [threading.Thread(target=reader, name="hf_gauge-read", daemon=True),
               threading.Thread(target=writer, name="hf_gauge-write", daemon=True)]
    for t in threads:
        t.start()
    scratch = Scratch()
    carry = b""                              # bytes [_down(a), a) of the next segment, already final
    try:
        for k in range(len(segs)):
            job = reads.get()
            if job is None:
                break
            a, b, group, off = job
            lo = _down(a)
            _move_segment(arena, off, lo, group, scratch, src.name)
            if k == 0:
                arena.view[off:off + start] = raw
            if carry:
                arena.view[off:off + len(carry)] = carry
            last = k == len(segs) - 1
            end = _up(b) if last else _down(b)
            if last and end > b:
                arena.view[off + b - lo:off + end - lo] = bytes(end - b)
            carry = b"" if last else bytes(arena.view[off + end - lo:off + b - lo])
            writes.put((off, lo, end - lo, b - a))
    except BaseException as e:               # noqa: BLE001
        fail(e)
    finally:
        writes.put(None)
        for t in threads:
            t.join()
        try:
            if not errors:
                os.ftruncate(fout, size)
        finally:
            os.close(fin)
            os.close(fout)
    if errors:
        raise errors[0]
    return din and dout
