"""Process helpers for the demo and the benchmarks, read straight from ``/proc``.

Everything the demo and benchmarks start runs in its own session (and process
group), so "what is still running" is "who is still in those sessions".
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` fields after the command name: state ppid pgrp session ..."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def sessions_alive(sids: Iterable[int]) -> list[int]:
    """Pids of processes still in any of these sessions."""
    wanted, alive = set(sids), []
    for pid in _pids():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(_stat_fields(pid)[3]) in wanted:
                alive.append(pid)
    return alive


def mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (e.g. a temp dir only our children know)."""
    needle, found = text.encode(), []
    for pid in _pids():
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def terminate(pids: Iterable[int], timeout: float) -> None:
    """SIGTERM these processes, then SIGKILL those still there after ``timeout``."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(_stat_fields(pid)[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_bytes(root: int) -> int:
    """Resident memory of a process tree (sum of VmRSS)."""
    total = 0
    for pid in tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(root: int) -> float:
    """User + system CPU time used so far by a process tree's live members."""
    ticks = 0
    for pid in tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def stop_group(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM a process's group (it leads its own session), wait, then SIGKILL the rest.

    Returns whether the whole group stopped on SIGTERM within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    while (left := sessions_alive([proc.pid])) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return not left
