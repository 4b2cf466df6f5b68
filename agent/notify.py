"""Tell the application once per burst of changes: a signal to a pid, a pid file's pid or
every process whose command line matches a regex, or a command.

:class:`Debouncer` is the quiescence window shared with exec mode: a burst ends when
no trigger came for ``wait.min``, or at the latest ``wait.max`` after its first trigger.
When a target cannot be signalled, the log line says exactly why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from agent import commands, metrics
from agent.acks import Acks
from agent.config import NotifyConfig, Wait
from agent.errors import NotifyError
from agent.logs import event

PROC = Path("/proc")
_NAMESPACE_HINT = (
    "it exited, or it runs in another PID namespace (in Kubernetes set "
    "shareProcessNamespace: true on the pod)"
)


def settles_at(first: float, last: float, wait: Wait) -> float:
    """When a burst ends: ``wait.min`` after its last trigger, at most ``wait.max`` after
    its first (pure: the quiescence window of consul-template's ``wait``)."""
    return min(last + wait.min, first + wait.max)


class Debouncer:
    """Collects triggers into bursts. ``trigger()`` is sync and never blocks.

    The decision is :func:`settles_at` on the burst's first and last trigger times,
    read from ``clock`` (injectable: tests drive it without sleeping).
    """

    def __init__(self, wait: Wait, clock: Callable[[], float] = time.monotonic) -> None:
        self.wait = wait
        self.clock = clock
        self._event = asyncio.Event()
        self._first: float | None = None  # clock time of the burst's first trigger
        self._last = 0.0

    @property
    def pending(self) -> bool:
        return self._first is not None

    def trigger(self) -> None:
        now = self.clock()
        if self._first is None:
            self._first = now
        self._last = now
        self._event.set()

    def remaining(self) -> float | None:
        """Seconds until the pending burst settles (<= 0: now); None when none is pending."""
        if self._first is None:
            return None
        return settles_at(self._first, self._last, self.wait) - self.clock()

    def take(self) -> bool:
        """End the current burst now. Returns whether one was pending."""
        pending = self._first is not None
        self._first = None
        self._event.clear()
        return pending

    async def next_burst(self) -> None:
        """Return when a burst has settled (and end it)."""
        while True:
            await self._event.wait()
            self._event.clear()
            while (delay := self.remaining()) is not None:
                if delay <= 0:
                    self.take()
                    return
                await asyncio.sleep(delay)
            # the burst was taken by a flush while we slept: wait for the next one


class Notifier:
    """One notify target. Run :meth:`run` as a task; call :meth:`trigger` after renders."""

    def __init__(self, cfg: NotifyConfig) -> None:
        self.cfg = cfg
        self.debouncer = Debouncer(cfg.wait)
        self.acks = Acks()  # which triggers a successful delivery has covered
        self._lock = asyncio.Lock()
        self._regex = re.compile(cfg.process) if cfg.process is not None else None

    @property
    def name(self) -> str:
        return self.cfg.name

    def trigger(self) -> None:
        self.acks.issue()
        self.debouncer.trigger()

    @property
    def pending(self) -> bool:
        return self.debouncer.pending

    async def run(self) -> None:
        while True:
            await self.debouncer.next_burst()
            await self.deliver()

    async def flush(self) -> None:
        """Deliver a pending notification now (shutdown)."""
        if self.debouncer.take():
            await self.deliver()

    async def deliver(self) -> bool:
        """Notify the target once. Logs and counts the outcome; never raises."""
        async with self._lock:
            upto = self.acks.issued  # what this delivery tells the target about
            try:
                await self._deliver()
            except NotifyError as exc:
                metrics.notifications_total.labels(self.cfg.name, "error").inc()
                event("notify_failed", logging.WARNING, target=self.cfg.name, reason=str(exc))
                return False
            except Exception as exc:  # a bug must not stop future notifications
                metrics.notifications_total.labels(self.cfg.name, "error").inc()
                event(
                    "notify_failed",
                    logging.ERROR,
                    target=self.cfg.name,
                    reason=f"unexpected {type(exc).__name__}: {exc}",
                )
                return False
            metrics.notifications_total.labels(self.cfg.name, "ok").inc()
            self.acks.cover(upto)
            return True

    async def _deliver(self) -> None:
        cfg = self.cfg
        if cfg.command is not None:
            await self._run_command(cfg.command)
        elif cfg.pid_file is not None:
            send_signal(read_pid_file(cfg.pid_file), cfg.signal, cfg.name)
        elif cfg.pid is not None:
            send_signal(cfg.pid, cfg.signal, cfg.name)
        elif self._regex is not None:
            self._signal_matches(self._regex)
        else:
            raise NotifyError("no target configured (pid_file, pid, process or command)")

    async def _run_command(self, argv: tuple[str, ...]) -> None:
        """No shell; output discarded (it could echo secrets); own process group."""
        try:
            await commands.run(commands.Command(argv, self.cfg.timeout, self.cfg.env))
        except commands.CommandError as exc:
            raise NotifyError(str(exc)) from None
        event("notified", target=self.cfg.name, command=argv[0], exit_code=0)

    def _signal_matches(self, regex: re.Pattern[str]) -> None:
        pids, visible = matching_processes(regex)
        if not pids:
            raise NotifyError(
                f"no process matches {regex.pattern!r} among {visible} visible processes "
                "(if the application runs in another container, set "
                "shareProcessNamespace: true on the pod)"
            )
        failures: list[str] = []
        for pid in pids:
            try:
                send_signal(pid, self.cfg.signal, self.cfg.name)
            except NotifyError as exc:
                failures.append(str(exc))
        if len(failures) == len(pids):
            raise NotifyError("; ".join(failures))
        for reason in failures:  # some matches were signalled: report the others
            event("notify_failed", logging.WARNING, target=self.cfg.name, reason=reason)


def read_pid_file(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise NotifyError(f"no pid file yet at {path} (has the application started?)") from None
    except OSError as exc:
        raise NotifyError(f"pid file {path} is unreadable: {exc.strerror}") from None
    # never echo the contents: a misconfigured path might point at a secret
    if not re.fullmatch(r"\s*\d{1,10}\s*", text):
        raise NotifyError(f"pid file {path} does not hold a process id (one decimal number)")
    return int(text)


def send_signal(pid: int, sig: signal.Signals, target: str) -> None:
    if pid <= 0:  # 0 and negatives mean process groups to kill(2): never that
        raise NotifyError(f"pid {pid} is not a process id")
    if pid == os.getpid():
        raise NotifyError(f"pid {pid} is the sidecar itself, not the application")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise NotifyError(f"process {pid} is not visible: {_NAMESPACE_HINT}") from None
    except PermissionError:
        raise NotifyError(
            f"not permitted to signal process {pid}: it runs as another user "
            f"(we are uid {os.getuid()}; run the sidecar with the application's runAsUser)"
        ) from None
    event("signalled", target=target, signal=sig.name, pid=pid)


def matching_processes(regex: re.Pattern[str]) -> tuple[list[int], int]:
    """Pids whose NUL-separated command line, joined by spaces, matches; and how many
    processes were visible at all. Excludes the sidecar itself and kernel threads."""
    me, pids, visible = os.getpid(), [], 0
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile, or hidden by hidepid
            continue
        visible += 1
        pid = int(entry.name)
        if not raw or pid == me:
            continue
        cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
        if regex.search(cmdline):
            pids.append(pid)
    return sorted(pids), visible
