"""The one reader for JSON files that may be hostile (gauge configs, checkpoint indexes, SAE and adapter configs).

A file from the Hub can be huge, not UTF-8, not JSON, hold integers past Python's digit limit or nest deep enough
to make later code hit ``RecursionError``: each of those is a one-line ``GaugeError`` here, before any field is used.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import GaugeError

__all__ = ["read_json", "read_bounded", "MAX_JSON_BYTES", "MAX_JSON_DEPTH"]

MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


def read_bounded(src: Path, what: str, hint: str = "re-save or re-download it") -> bytes:
    """The bytes of a JSON file that may be hostile: a regular file (a FIFO or device would block or never end) of at
    most ``MAX_JSON_BYTES``, both checked on the open file before reading; ``GaugeError`` otherwise."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))     # opening a FIFO must not wait for a writer
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise GaugeError(f"{what} is not a regular file (a FIFO, device or socket); {hint}")
            if st.st_size > MAX_JSON_BYTES:
                raise GaugeError(f"{what} is larger than {MAX_JSON_BYTES >> 20} MB; {hint}")
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise GaugeError(f"cannot read {what}: {e.strerror or e}; {hint}") from None
    if len(data) > MAX_JSON_BYTES:                         # grew while read
        raise GaugeError(f"{what} is larger than {MAX_JSON_BYTES >> 20} MB; {hint}")
    return data


def read_json(src: Path | bytes, what: str, hint: str = "re-save or re-download it") -> Any:
    """The JSON value in a file (or bytes) that may be hostile; anything unreadable is a one-line ``GaugeError``.

    Refused: unreadable paths (missing, a folder, a symlink loop, no permission, not a regular file), files or bytes
    over 64 MB (files before they are read: ``read_bounded``), invalid UTF-8, invalid JSON, integers beyond Python's
    digit limit and nesting deeper than 64 levels (so later code never hits ``RecursionError``). ``what`` names the
    file in the message; ``hint`` says what to do.
    """
    data = bytes(src) if isinstance(src, (bytes, bytearray)) else read_bounded(Path(src), what, hint)
    if len(data) > MAX_JSON_BYTES:
        raise GaugeError(f"{what} is larger than {MAX_JSON_BYTES >> 20} MB; {hint}")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:   # JSONDecodeError is a ValueError, as is int size
        raise GaugeError(f"{what} is not valid JSON ({str(e).splitlines()[0][:200]}); {hint}") from None
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise GaugeError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels; {hint}")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return value
