"""Benchmark: what the first touch of a page costs on this machine (why the streaming apply bypasses the page cache).

Two measurements, each in this process, one thread:
- ``page_cache``: a file of ``--mb`` MB is written, fsynced and dropped from the page cache
  (``POSIX_FADV_DONTNEED``), left ``--settle`` seconds, then read back into the cache (``POSIX_FADV_WILLNEED``, waited for) and copied out of
  a mapping twice: the first copy touches each cached page for the first time, the second touches them again. On
  bare metal both run at memory speed; in a VM whose host reclaims freed guest memory (virtio-balloon free page
  reporting) the first one pays a host fault per page.
- ``anonymous``: ``--mb`` MB of fresh anonymous memory filled twice (first touch: page faults and zeroing, and the
  host's faults where it reclaimed the memory).

    python benchmarks/bench_first_touch.py [--mb 2048] [--workdir DIR] [--rounds 3] [--settle 10]

Result: benchmarks/results/bench_first_touch.json (seconds of CPU per pass, GB/s).
"""
from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import write_result  # noqa: E402

BLOCK = 64 << 20


def _copy_out(src: memoryview, dst: np.ndarray) -> float:
    """CPU seconds to copy ``src`` into ``dst`` block by block."""
    c0 = time.process_time()
    for o in range(0, len(src), BLOCK):
        n = min(BLOCK, len(src) - o)
        dst[:n] = np.frombuffer(src[o:o + n], dtype=np.uint8)
    return time.process_time() - c0


def page_cache(path: Path, nbytes: int, settle: float) -> dict:
    """First and second copy out of freshly cached pages of ``path``."""
    block = np.full(BLOCK, 7, dtype=np.uint8)
    with open(path, "wb") as f:
        for o in range(0, nbytes, BLOCK):
            f.write(block[:min(BLOCK, nbytes - o)].tobytes())
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    time.sleep(settle)                             # freed pages: a host that reclaims them does so within seconds
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        buf = bytearray(BLOCK)
        for o in range(0, nbytes, BLOCK):          # wait until every page is in the cache (reads hit it)
            os.preadv(fd, [memoryview(buf)[:4096]], o)
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        dst = np.empty(BLOCK, dtype=np.uint8)
        view = memoryview(mm)
        first = _copy_out(view, dst)
        second = _copy_out(view, dst)
        view.release()
        mm.close()
    finally:
        os.close(fd)
        path.unlink()
    return {"first_s": first, "second_s": second}


def anonymous(nbytes: int) -> dict:
    """Two fills of fresh anonymous memory."""
    src = np.full(BLOCK, 3, dtype=np.uint8)
    a = np.empty(nbytes, dtype=np.uint8)
    out = {}
    for key in ("first_s", "second_s"):
        c0 = time.process_time()
        for o in range(0, nbytes, BLOCK):
            n = min(BLOCK, nbytes - o)
            a[o:o + n] = src[:n]
        out[key] = time.process_time() - c0
    del a
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds between dropping the file from the page "
                    "cache and reading it back")
    args = ap.parse_args(argv)
    nbytes = args.mb << 20
    runs: dict[str, list[dict]] = {"page_cache": [], "anonymous": []}
    with tempfile.TemporaryDirectory(prefix="bench_first_touch-", dir=args.workdir) as tmp:
        for _ in range(args.rounds):
            runs["page_cache"].append(page_cache(Path(tmp) / "data", nbytes, args.settle))
            runs["anonymous"].append(anonymous(nbytes))
    gb = nbytes / 1e9
    res = {"mb": args.mb, "rounds": args.rounds, "settle_s": args.settle, "runs": runs}
    for kind, rs in runs.items():
        for key in ("first_s", "second_s"):
            med = statistics.median(r[key] for r in rs)
            res[f"{kind}_{key}_median"] = med
            res[f"{kind}_{key.split('_')[0]}_gb_per_s"] = gb / med if med > 0 else None
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    res.update(commit=commit, script_sha256=hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
               cpus=os.cpu_count())
    write_result("bench_first_touch", res)
    print({k: v for k, v in res.items() if k != "runs"})
    return res


if __name__ == "__main__":
    main()
