"""Process-group tests: a command that forks a marked grandchild, and finding it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

# a leader that starts a grandchild (marked on its command line) and waits for it
FORKER = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', sys.argv[1]]); "
    "time.sleep(300)"
)


def forking_command(marker: str) -> tuple[str, ...]:
    return (sys.executable, "-c", FORKER, marker)


async def see_grandchild(marker: str, task: asyncio.Task[Any]) -> None:
    """Wait until the grandchild runs (before the command's timeout ends ``task``)."""
    for _ in range(600):
        if marked_processes(marker):
            return
        assert not task.done(), f"the command ended before its grandchild started: {task}"
        await asyncio.sleep(0.05)
    raise AssertionError("the grandchild never started")


def marked_processes(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


async def none_left(marker: str, limit: float = 10.0) -> bool:
    """True once no process carries ``marker`` (SIGKILL takes effect asynchronously)."""
    for _ in range(int(limit / 0.05)):
        if not marked_processes(marker):
            return True
        await asyncio.sleep(0.05)
    return False
