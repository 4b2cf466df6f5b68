"""Run a little of this process's own code as another uid (needs root).

A fork of this process drops to ``uid`` and calls ``action``: it uses the code already
in memory, so nothing is imported or read from the checkout, which may be unreadable
for that uid (a clone under a private ``mktemp -d``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

NOBODY = 65534


def call_as(uid: int, action: Callable[[], str]) -> str:
    """``action()``'s result, computed in a child forked and dropped to ``uid``."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        # only system calls and ``action`` until _exit: nothing that could wait for a
        # lock another thread of the parent held at fork time
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.write(write, action().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = pipe.read().decode()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result
