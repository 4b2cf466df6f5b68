"""Find processes by a marker on their command line (for process-group tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path


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
