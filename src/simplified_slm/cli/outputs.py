"""Check a command's output path before the work starts.

A missing folder, a read-only location or a path of the wrong kind found only when the
results are written would throw away minutes of evaluation, generation or export. Every
subcommand that writes calls one of these first, so such problems end in one `error:`
line before anything runs (as `slm train` does for its output_dir).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from simplified_slm.errors import SLMError


def _probe(directory: Path, flag: str, path: Path) -> None:
    """Create and delete a file in `directory`: unlike permission bits, this is also right
    for root, ACLs and read-only mounts."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".slm-write-check.", dir=directory)
    except OSError as err:
        raise SLMError(f"cannot write {flag} {path}: {directory} is not writable ({err.strerror}); "
                       "choose a writable location") from None
    os.close(fd)
    os.unlink(probe)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """`path` can be written as a file: its folder exists and is writable, it is not a folder,
    and an existing file there is not read-only."""
    path = Path(path)
    if path.is_dir():
        raise SLMError(f"{flag} {path} is a folder; give a file path")
    parent = path.parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise SLMError(f"cannot write {flag} {path}: {parent} {what}; create the folder first or choose another path")
    if path.exists() and not os.access(path, os.W_OK):
        raise SLMError(f"{flag} {path} is read-only; make it writable or choose another path")
    _probe(parent, flag, path)
    return path


def check_output_dir(path: str | Path, flag: str, overwrite: bool = False,
                     reusable: Callable[[Path], bool] | None = None) -> Path:
    """`path` can be written as a folder: it is not a file, it is missing, empty, accepted by
    `reusable` (an earlier output of the same command, updated in place) or `overwrite` is
    set, and the place it is created in (or replaced from) is writable. Creates nothing."""
    path = Path(path)
    if path.is_symlink():  # replacing it would replace the link, not the folder it points to
        raise SLMError(f"{flag} {path} is a symbolic link; give the folder's real path")
    if path.exists() and not path.is_dir():
        raise SLMError(f"{flag} {path} is a file; give a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite and not (reusable and reusable(path)):
        raise SLMError(f"{flag} {path} is not empty; pass --overwrite to replace it, or choose a new folder")
    ancestor = _existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise SLMError(f"cannot create {flag} {path}: {ancestor} is a file, not a folder; choose another path")
    _probe(ancestor, flag, path)
    if path.is_dir():
        _probe(path, flag, path)
    return path
