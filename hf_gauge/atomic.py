"""Publishing files and folders atomically: temp name beside the target, fsync, permissions from the umask, rename.

Every file hf_gauge publishes goes through this module, so a reader (or a crash, or a full disk) sees either the
old file or the complete new one, never a half-written one. ``tempfile`` creates files 0600 and folders 0700;
published outputs get the modes an ordinary ``open()`` / ``mkdir()`` would (``0o666`` / ``0o777`` minus the umask).

Hidden staging folders (``.NAME.<random>.partial``) hold a marker file with the creating process's PID and host, so a
folder left by a killed run can be recognised and removed later (``clean_stale_staging``); a folder without the
marker is never removed, however much its name looks like ours.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import GaugeError

__all__ = ["umask", "publish_mode", "fsync_file", "fsync_dir", "fsync_tree", "atomic_write_bytes", "atomic_path", "folder_lock",
           "output_lock", "staging_dir", "remove_staging", "clean_stale_staging", "STAGING_MARKER"]

STAGING_MARKER = ".hf_gauge-staging.json"
_STAGING_SUFFIX = ".partial"
_STALE_AFTER_S = 24 * 3600.0      # a staging folder whose owner cannot be checked is stale after a day


def umask() -> int:
    """The process umask (read from /proc where possible: ``os.umask`` itself would briefly change it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def publish_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()`` (``0o666``) or ``mkdir()`` (``0o777``) would, minus the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk (before the rename that publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems cannot fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file and folder under ``root`` (before a rename publishes it)."""
    for dirpath, _, files in os.walk(root):
        for fn in files:
            p = Path(dirpath) / fn
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path``: temp file in the same folder, fsync, umask mode, rename. Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (a file, or a folder when ``directory``) for a writer that takes a file
    name (``savefig``, ``save_file``, ``torch.save``); on success fsync it, set the umask mode and rename it onto
    ``path`` (an existing file is replaced; an existing folder must be empty). On error the temp path is removed."""
    path = Path(path)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            fsync_tree(tmp)
            publish_mode(tmp, directory=True)
            if path.is_dir():
                path.rmdir()            # only an empty folder may be replaced
        else:
            fsync_file(tmp)
            publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def folder_lock(folder: str | os.PathLike, exclusive: bool) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``folder`` itself (exclusive: a writer replacing several files that belong
    together; shared: a reader of them). No lock file is created; without ``fcntl`` (Windows) or when the folder
    cannot be opened, this is a no-op."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)          # releases the lock


def output_lock(out: Path):
    """Take the exclusive, non-blocking lock on writing ``out`` (``filelock`` on ``.NAME.hf_gauge.lock`` beside it,
    kept there; the OS releases it when the process dies, so a killed writer never blocks the next one). Returns
    the held ``FileLock`` (``release()`` it); a second writer of the same output gets a ``GaugeError`` at once."""
    from filelock import FileLock, Timeout

    path = out.parent / f".{out.name}.hf_gauge.lock"
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise GaugeError(f"another process is writing {out} (it holds {path}); wait for it to finish or choose "
                         "another output folder") from None
    return lock


# ------------------------------------------------------------------------------------------------ staging folders
def staging_dir(out: Path) -> Path:
    """A new hidden staging folder ``.NAME.<random>.partial`` beside ``out``, marked with this process's PID."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=_STAGING_SUFFIX, dir=out.parent))
    (tmp / STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "created": time.time()}))
    return tmp


def remove_staging(folder: Path) -> None:
    """Delete a staging folder, its marker last: a process killed midway leaves a folder that is still marked (so
    ``clean_stale_staging`` finishes the job), never an unmarked remnant."""
    for p in folder.iterdir():
        if p.name == STAGING_MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    (folder / STAGING_MARKER).unlink(missing_ok=True)
    folder.rmdir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _marker(folder: Path) -> dict | None:
    """The staging marker ``staging_dir`` wrote in ``folder`` (a regular file holding a JSON object with an integer
    ``pid`` and a string ``host``), or None: a folder without it is not hf_gauge's."""
    marker = folder / STAGING_MARKER
    try:
        if marker.is_symlink() or not marker.is_file():
            return None
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("host"), str):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return info


def clean_stale_staging(out: Path, max_age_s: float = _STALE_AFTER_S) -> list[Path]:
    """Remove staging folders left by killed runs beside ``out``; returns the removed paths.

    Only real folders (not symlinks) named exactly ``.NAME.<8 tempfile chars>.partial`` that hold hf_gauge's own
    marker (``STAGING_MARKER``, written by ``staging_dir``) are considered: a folder without it is never touched,
    whatever its name or age. One whose marker names a process of this machine is removed when that process is dead
    (kept while it runs, whatever its age); one whose marker names another machine only if it is ``out``'s own
    (``NAME == out.name``) and older than ``max_age_s``. Anything else in the parent is never touched.
    """
    removed: list[Path] = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    any_name = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(_STAGING_SUFFIX))
    own_name = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}" + re.escape(_STAGING_SUFFIX))
    now = time.time()
    for p in parent.iterdir():
        if not any_name.fullmatch(p.name) or p.is_symlink() or not p.is_dir():
            continue
        info = _marker(p)
        if info is None:
            continue                                   # not marked by hf_gauge: the user's folder
        if info["host"] == socket.gethostname():
            stale = info["pid"] != os.getpid() and not _pid_alive(info["pid"])
        else:
            try:
                stale = bool(own_name.fullmatch(p.name)) and now - p.stat().st_mtime > max_age_s
            except OSError:
                continue
        if stale:
            try:
                remove_staging(p)
            except OSError:
                continue
            removed.append(p)
    return removed
