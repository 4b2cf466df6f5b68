"""Atomic file writes with strict permissions, and the memory-backed check.

A write goes to a temp file in the destination's directory, is fsynced and then
``os.replace``d over the destination, so a reader sees the old bytes or the new
bytes, never a mix. Identical bytes are not rewritten.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o600,
    uid: int | None = None,
    gid: int | None = None,
) -> bool:
    """Write ``data`` to ``path`` atomically. Returns False when the file already held it."""
    try:
        if path.read_bytes() == data:
            st = path.stat()
            if st.st_mode & 0o7777 != mode:
                os.chmod(path, mode)
            return False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # before any byte lands: no window with looser permissions
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
