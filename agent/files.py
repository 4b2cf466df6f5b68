"""Atomic file writes with strict permissions, and the memory-backed check.

A write goes to a temp file in the destination's directory, is fsynced and then
``os.replace``d over the destination, so a reader sees the old bytes or the new
bytes, never a mix. Identical bytes are not rewritten.

Only a regular file (or nothing) is ever replaced. Whatever else sits at a
destination - a FIFO, whose open would block forever, a symlink, whose chmod would
change its target, a device, a directory - is refused with :class:`NotRegularFile`,
and the existing file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with
``fstat`` so that a swap between the check and the open changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from pathlib import Path

from agent.config import TemplateConfig
from agent.errors import RenderError

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
MOUNTINFO = Path("/proc/self/mountinfo")

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


class NotRegularFile(OSError):
    """Something other than a regular file sits where we write one."""

    def __init__(self, path: Path, mode: int) -> None:
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        super().__init__(errno.EINVAL, f"it is {kind}, not a regular file: refusing it", str(path))


def non_regular(path: Path) -> str | None:
    """Why ``path`` cannot be a destination (it exists and is no regular file), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None  # missing (fine) or unreachable (the write will say so)
    return None if stat.S_ISREG(st.st_mode) else str(NotRegularFile(path, st.st_mode).strerror)


def _unchanged(path: Path, data: bytes, mode: int) -> bool:
    """Whether ``path`` already holds ``data`` (then its mode is fixed in place).

    Never blocks and never follows a link: ``lstat`` first, so a FIFO or a device is
    not even opened; then ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat`` on what was opened.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, st.st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a symlink since the lstat
            raise NotRegularFile(path, stat.S_IFLNK) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, st.st_mode)
        if st.st_size != len(data):
            return False
        with os.fdopen(os.dup(fd), "rb") as f:
            if f.read(len(data) + 1) != data:
                return False
        if st.st_mode & 0o7777 != mode:
            os.fchmod(fd, mode)  # on what we opened: never through a link
        return True
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o600,
    uid: int | None = None,
    gid: int | None = None,
) -> bool:
    """Write ``data`` to ``path`` atomically. Returns False when the file already held it.

    Raises :class:`NotRegularFile` when something else than a regular file is there.
    """
    if _unchanged(path, data, mode):
        return False
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


def write_destination(cfg: TemplateConfig, data: bytes) -> bool:
    """Write a template's output to its destination with its perms/uid/gid, refusing a
    disk-backed destination unless ``allow_disk``. Returns whether the file changed."""
    if not cfg.allow_disk:
        check_memory_backed(cfg.destination)
    try:
        return atomic_write(cfg.destination, data, mode=cfg.perms, uid=cfg.uid, gid=cfg.gid)
    except OSError as exc:
        raise RenderError(
            f"template {cfg.name}: cannot write {cfg.destination}: {exc.strerror or exc}"
        ) from None


def check_memory_backed(path: Path) -> None:
    """Raise RenderError unless ``path``'s directory is on tmpfs or ramfs.

    Secrets written to a disk-backed filesystem survive the pod and land in backups.
    The mount is the longest mount point that prefixes the resolved directory.
    """
    directory = path.parent.resolve()
    try:
        mounts = parse_mountinfo(MOUNTINFO.read_text())
    except OSError as exc:
        raise RenderError(
            f"{path}: cannot tell whether it is memory-backed ({MOUNTINFO}: {exc.strerror}); "
            "set allow_disk: true on the template to write it anyway"
        ) from None
    found = mount_of(directory, mounts)
    if found is None:
        raise RenderError(
            f"{path}: no mount found for {directory}; set allow_disk: true to write it anyway"
        )
    mount_point, fstype = found
    if fstype not in MEMORY_FILESYSTEMS:
        raise RenderError(
            f"{path}: refusing to write a secret to {directory}, which is on {fstype} "
            f"(mounted at {mount_point}), not memory-backed (tmpfs/ramfs). Use an in-memory "
            "volume (emptyDir medium: Memory, /dev/shm) or set allow_disk: true on the "
            "template to override"
        )


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) per line of /proc/<pid>/mountinfo, in order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mounts.append((_unescape(fields[4]), right.split()[0]))
    return mounts


def mount_of(directory: Path, mounts: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The mount holding ``directory``: longest prefix; among equal ones the last (on top)."""
    best: tuple[str, str] | None = None
    text = str(directory)
    for point, fstype in mounts:
        inside = point == "/" or text == point or text.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


def _unescape(field: str) -> str:
    # the kernel writes space, tab, newline and backslash as \ooo octal escapes
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
