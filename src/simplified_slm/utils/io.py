"""Atomic file and folder writes: a crash or kill mid-write never leaves half a file behind.

Write to a temporary name in the same folder, flush and fsync, then `os.replace`, which is
atomic on POSIX and Windows; readers see the old file or the new one, never a mix. Folders
(exports) are written under a temporary sibling name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def follow_umask(path: str | Path) -> None:
    """Give `path` (and, for a folder, everything in it) the mode a plain `open` would give
    under the umask: mkstemp/mkdtemp and writers with a temp file of their own (safetensors,
    and transformers through it) leave 0600/0700."""
    path = Path(path)
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then move the finished file over `path`.

    The mode is set after `write`: writers that replace `tmp_path` with a file of their own
    (safetensors does) would otherwise leave mkstemp's 0600 instead of what the umask gives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        follow_umask(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def swap_dir(new: Path, final: Path, aside: Path) -> None:
    """Put folder `new` in place of the existing folder `final`.

    A folder cannot be replaced by one rename, so `final` goes to `aside` first and is deleted
    once `new` is in place; if the second rename fails the old folder is put back. A process
    killed between the two renames leaves `aside` for its owner to recover (checkpoints do).
    """
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of folder `path`; on success it replaces `path`.

    An existing `path` (the caller decided it may be replaced) is renamed aside, the new
    folder renamed in, then the old one deleted, so readers never see the two mixed. On
    any failure the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        follow_umask(tmp)
        if path.is_dir() and any(path.iterdir()):
            swap_dir(tmp, path, Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)))
        else:
            os.replace(tmp, path)  # a missing or empty folder is replaced in one step
            fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
