"""The state directory is ours, or the agent does not start.

``state_dir`` holds the lease ledger (credentials and leases the agent will revoke
with its own token) and the admin socket. Anything another user could have prepared
there is a way to make the agent act for them (revoke another application's lease,
read credentials through a symlink), so :func:`prepare` creates the directory itself
(0700) and refuses, with a clear error, a directory or entry that is a symlink, is
not owned by our uid, or is writable by group or others. Files in it are opened
with :func:`open_owned` (``O_NOFOLLOW``, checked again on the open descriptor).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.errors import SidecarError
from agent.logs import event

MAX_STATE_FILE = 1024 * 1024  # a ledger file is a few hundred bytes


class StateDirError(SidecarError):
    """The state directory (or a file in it) is not safely ours."""


def prepare(path: Path) -> Path:
    """Create ``path`` (0700) if missing; check it and every entry in it. Raises
    :class:`StateDirError` naming what is wrong and what to do."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
        event("state_dir_created", path=str(path))
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateDirError(f"state_dir {path}: cannot create it ({exc.strerror})") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise StateDirError(
                f"state_dir {path} is a symlink; refusing to follow it (point state_dir at "
                "a directory the agent creates itself)"
            ) from None
        raise StateDirError(f"state_dir {path}: cannot open it ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        _check_owned(st, f"state_dir {path}", directory=True)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # ours, and not writable by others: safe to set
        for name in os.listdir(fd):
            entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(entry.st_mode):
                raise StateDirError(
                    f"state_dir {path}: {name} is a symlink; the state directory must hold "
                    "only the agent's own files (remove it, or use another state_dir)"
                )
            _check_owned(entry, f"state_dir {path}: {name}", directory=False)
    finally:
        os.close(fd)
    return path


def _check_owned(st: os.stat_result, what: str, *, directory: bool) -> None:
    uid = os.geteuid()
    if st.st_uid != uid:
        raise StateDirError(
            f"{what} belongs to uid {st.st_uid}, not to the agent (uid {uid}); another user "
            "may have prepared it: remove it, or point state_dir at a new path the agent "
            "creates itself"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        kind = "directory" if directory else "file"
        raise StateDirError(
            f"{what} is a {kind} writable by group or others (mode {mode:04o}); its contents "
            "cannot be trusted: remove it and let the agent create it (0700)"
        )


def open_owned(path: Path) -> bytes | None:
    """The contents of a state file, or None when it does not exist. Never follows a
    symlink; refuses a file that is not a regular file of ours or is too large."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        if os.path.islink(path):
            raise StateDirError(f"{path} is a symlink; refusing to follow it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise StateDirError(f"{path} is not a regular file")
        _check_owned(st, str(path), directory=False)
        data = f.read(MAX_STATE_FILE + 1)
    if len(data) > MAX_STATE_FILE:
        raise StateDirError(f"{path} is larger than {MAX_STATE_FILE} bytes")
    return data
