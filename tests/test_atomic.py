"""Atomic publishing: fsync before rename, umask modes, whole-or-nothing writes, stale staging folders cleaned
safely (only our exact names carrying our marker, only when the owner is dead or the folder is old)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hf_gauge.atomic as atomic
from hf_gauge.atomic import (STAGING_MARKER, atomic_path, atomic_write_bytes, clean_stale_staging, publish_mode,
                             staging_dir)


@pytest.fixture
def umask027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_umask_read_without_changing_it(umask027) -> None:
    assert atomic.umask() == 0o027 and atomic.umask() == 0o027


def test_atomic_write_bytes_fsyncs_before_rename_and_honours_umask(tmp_path: Path, umask027,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    assert events[:2] == ["fsync", "replace"]
    assert (tmp_path / "f.json").read_bytes() == b"{}"
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["f.json"]


def test_atomic_path_keeps_old_file_on_error_and_leaves_no_temp(tmp_path: Path, umask027) -> None:
    out = tmp_path / "fig.png"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path      # writers that pick a format by suffix
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["fig.png"]
    with atomic_path(tmp_path / "d", directory=True) as tmp:
        (tmp / "a").write_bytes(b"1")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750 and (tmp_path / "d" / "a").read_bytes() == b"1"


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_clean_stale_staging_only_removes_ours(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = staging_dir(out)                                   # a killed run: marker names a dead process
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    marker = json.loads((dead / STAGING_MARKER).read_text())
    marker["pid"] = _dead_pid()
    (dead / STAGING_MARKER).write_text(json.dumps(marker))
    alive = staging_dir(out)                                  # a running apply (this process): kept
    other_host = staging_dir(out)                             # a dead PID on another machine: kept (until old)
    (other_host / STAGING_MARKER).write_text(json.dumps({**marker, "host": "elsewhere"}))
    unmarked_old = tmp_path / ".out.abcd1234.partial"         # the user's: no marker, 3 days old: kept (issue 23)
    unmarked_old.mkdir()
    (unmarked_old / "notes.txt").write_text("mine")
    old = time.time() - 3 * 24 * 3600
    os.utime(unmarked_old, (old, old))
    bad_marker = tmp_path / ".out.ijkl9012.partial"           # a marker file that is not ours (no pid/host): kept
    bad_marker.mkdir()
    (bad_marker / STAGING_MARKER).write_text("[]")
    os.utime(bad_marker, (old, old))
    other_host_old = staging_dir(out)                         # marked by another machine, older than the limit
    (other_host_old / STAGING_MARKER).write_text(json.dumps({**marker, "host": "elsewhere"}))
    os.utime(other_host_old, (old, old))
    other_dead = tmp_path / ".other.abcd1234.partial"         # another output's staging, owner dead: removed
    other_dead.mkdir()
    (other_dead / STAGING_MARKER).write_text(json.dumps(marker))
    other_unmarked = tmp_path / ".other.efgh5678.partial"     # another output's, no marker, old: kept (not ours)
    other_unmarked.mkdir()
    os.utime(other_unmarked, (old, old))
    alive_old = staging_dir(out)                              # a live owner: kept whatever its age
    os.utime(alive_old, (old, old))
    keep = [tmp_path / ".out.abc.partial", tmp_path / "out.abcd1234.partial", tmp_path / ".out.abcd1234.partial.bak",
            tmp_path / "out", tmp_path / ".out.abcd12345.partial", other_unmarked, alive_old]
    for k in keep:
        k.mkdir(exist_ok=True)
        if k not in (other_unmarked, alive_old):
            (k / STAGING_MARKER).write_text(json.dumps(marker))   # even with a dead owner: not our exact name
        os.utime(k, (old, old))
    file_like = tmp_path / ".out.zzzz9999.partial"            # our name, but a file: kept
    file_like.write_text("user file")
    link = tmp_path / ".out.link1234.partial"                 # our name, but a symlink to elsewhere: kept
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.utime(target, (old, old))
    link.symlink_to(target)
    removed = clean_stale_staging(out)
    assert sorted(removed) == sorted([dead, other_dead, other_host_old])
    assert not dead.exists() and not other_host_old.exists()
    assert (unmarked_old / "notes.txt").read_text() == "mine" and bad_marker.is_dir()
    assert alive.is_dir() and other_host.is_dir() and file_like.is_file() and link.is_symlink() and target.is_dir()
    assert all(k.is_dir() for k in keep)


def test_remove_staging_deletes_the_marker_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed while removing a staging folder leaves it marked, so a later cleanup finishes the job."""
    import shutil
    out = tmp_path / "out"
    st = staging_dir(out)
    (st / "sub").mkdir()
    (st / "sub" / "a.safetensors").write_bytes(b"x")
    (st / "b.json").write_text("{}")
    order = []
    real_rmtree, real_unlink = shutil.rmtree, Path.unlink
    monkeypatch.setattr(shutil, "rmtree", lambda p, **k: (order.append(Path(p).name), real_rmtree(p, **k))[1])
    monkeypatch.setattr(Path, "unlink", lambda self, **k: (order.append(self.name), real_unlink(self, **k))[1])
    atomic.remove_staging(st)
    assert order[-1] == STAGING_MARKER and sorted(order[:-1]) == ["b.json", "sub"] and not st.exists()


def test_publish_mode(tmp_path: Path, umask027) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o600)
    publish_mode(p)
    assert p.stat().st_mode & 0o777 == 0o640
