"""Input folders are hostile: which of their entries hf_gauge reads or copies.

A checkpoint, adapter or SAE folder may come from the Hub, an archive or a ``git clone``, which can hold symbolic
links (``notes.txt -> ../../.ssh/id_rsa``) and special files. Before anything in such a folder is opened,
``audit_folder`` walks it (links never followed while walking) and checks every entry:

- a regular file or a folder is kept;
- a symbolic link is followed only when its fully resolved target is a regular file inside the folder, or, for a
  Hugging Face cache snapshot (``.../models--org--name/snapshots/<rev>/``), inside that repository's ``blobs/``
  folder, where the cache keeps every file a snapshot links to;
- refused with a one-line ``GaugeError``, before anything is read or written: a link whose target leaves those
  folders, a dangling link, a link loop, a link to a folder, a FIFO, a socket or a device (a FIFO would block a read
  forever; a device or a secret outside the folder must never end up in an output that gets pushed).

Refusing rather than skipping is deliberate: a skipped file would silently be missing from the output, and a link
out of a downloaded folder is a sign of a hostile folder that the user should look at. Outputs are written as new
regular files with the process umask's modes (never a copy of the input's mode bits).
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import GaugeError

__all__ = ["audit_folder", "allowed_roots", "MAX_ENTRIES", "UNREAD_DIRS"]

MAX_ENTRIES = 100_000
UNREAD_DIRS = frozenset({".git", ".cache"})   # never read nor copied: git's data, huggingface_hub's download cache
_CACHE_PREFIXES = ("models--", "datasets--", "spaces--")


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """The resolved folders that links inside ``folder`` may point into: the folder itself and, for a Hub-cache
    snapshot or a folder inside one, its repository's ``blobs/``."""
    root = folder.resolve()
    for snapshot in (root, *root.parents):          # the snapshot itself or a subfolder of it (an SAE release)
        repo = snapshot.parent.parent
        if snapshot.parent.name == "snapshots" and repo.name.startswith(_CACHE_PREFIXES) and (repo / "blobs").is_dir():
            return root, (repo / "blobs").resolve()
    return (root,)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _resolve_link(path: Path, rel: str, folder: Path, roots: tuple[Path, ...], skip_dirs) -> Path:
    """The regular file a link inside ``folder`` leads to, or ``GaugeError`` (also for a target inside a skipped
    top-level folder such as ``.git``, whose config may hold a token)."""
    where = f"{folder}: {rel!r} is a symbolic link"
    try:
        target = path.resolve(strict=True)
    except RuntimeError:                                   # Python < 3.13 reports a loop so
        raise GaugeError(f"{where} in a loop; remove it") from None
    except OSError as e:
        what = {errno.ELOOP: "in a loop", errno.ENOENT: "to nothing (dangling)"}.get(e.errno, f"that fails ({e.strerror})")
        raise GaugeError(f"{where} {what}; remove it or replace it with the file it should hold") from None
    inner = target.relative_to(roots[0]).parts if roots[0] in target.parents else ()
    if not _inside(target, roots) or (inner and inner[0] in skip_dirs):
        raise GaugeError(f"{where} to {target}, outside what hf_gauge reads of the folder; it never reads through "
                         "links that leave an input folder or point into its .git or .cache (a downloaded or cloned "
                         "folder may hold one to a secret). Replace the link with the file itself (a copy or a hard "
                         "link), or remove it")
    mode = target.stat().st_mode
    if stat.S_ISDIR(mode):
        raise GaugeError(f"{where} to a folder; hf_gauge does not follow links to folders: replace it with the folder")
    if not stat.S_ISREG(mode):
        raise GaugeError(f"{where} to {_kind(mode)}; remove it (only regular files are read or copied)")
    return target


def audit_folder(folder: str | os.PathLike, skip_dirs: frozenset[str] | set[str] = UNREAD_DIRS) -> dict[str, Path]:
    """Every file of ``folder`` (recursively, top-level folders named in ``skip_dirs`` left out and never read) as
    ``{relative posix name: path to read}``, sorted by name, after the checks in the module docstring.

    The path to read is the entry itself for a regular file and the link's resolved target for an admitted link."""
    folder = Path(folder)
    roots = allowed_roots(folder)
    files: dict[str, Path] = {}
    stack: list[tuple[Path, str]] = [(folder, "")]
    while stack:
        here, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as e:
            raise GaugeError(f"cannot list {here}: {e.strerror or e}") from None
        for entry in entries:
            rel = prefix + entry.name
            if len(files) + len(stack) >= MAX_ENTRIES:
                raise GaugeError(f"{folder} holds more than {MAX_ENTRIES} entries; is it the right folder?")
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except FileNotFoundError:               # gone since the listing (a concurrent writer): nothing to read
                continue
            if stat.S_ISLNK(mode):
                files[rel] = _resolve_link(Path(entry.path), rel, folder, roots, skip_dirs)
            elif stat.S_ISDIR(mode):
                if not (prefix == "" and entry.name in skip_dirs):
                    stack.append((Path(entry.path), rel + "/"))
            elif stat.S_ISREG(mode):
                files[rel] = Path(entry.path)
            else:
                raise GaugeError(f"{folder}: {rel!r} is {_kind(mode)}; remove it (only regular files are read or "
                                 "copied from an input folder)")
    return dict(sorted(files.items()))
