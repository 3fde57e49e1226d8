"""Files: the one atomic-write helper family and the one JSON reader.

Writes never leave a half-written output: a temporary sibling (file or folder) is written, flushed to disk
(``fsync`` where ``durable``), then renamed over the target. Reads of JSON files (configs, indexes, sidecars) refuse
anything that is not valid JSON holding an object, with a ``GaugeError`` naming the file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import GaugeError

__all__ = ["atomic_write_bytes", "atomic_file", "atomic_dir", "read_json"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling file path; when the block succeeds, fsync it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary sibling folder; when the block succeeds, rename it to ``path``.

    An existing empty folder at ``path`` is replaced; a non-empty one only with ``replace=True`` (moved aside, then
    removed after the rename, so ``path`` is never missing its old or new contents half-way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    try:
        yield tmp
        if path.exists() and path.is_dir() and any(path.iterdir()):
            if not replace:
                raise GaugeError(f"{path} already exists and is not empty; choose another path")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike, what: str = "JSON file", max_bytes: int = 64 << 20) -> dict[str, Any]:
    """The JSON object in ``path``; ``GaugeError`` naming the file for a missing, oversized, undecodable or
    non-object file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise GaugeError(f"{path}: {what} of {size} bytes exceeds the {max_bytes}-byte limit")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except GaugeError:
        raise
    except OSError as e:
        raise GaugeError(f"cannot read the {what} {path}: {e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise GaugeError(f"{path} is not valid JSON ({what}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise GaugeError(f"{path} must hold a JSON object ({what}), got {type(obj).__name__}")
    return obj
