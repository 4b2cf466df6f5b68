"""Exec mode: run the application as our child.

The child gets the environment of ``exec.env`` (:mod:`agent.childenv`: ours minus
our Vault credentials) plus the variables of ``exec.env_template``
(:mod:`agent.execenv`), runs in its own session so that only our forwarding delivers
signals to it, is reloaded once per burst of changes (signal, restart or nothing; a
changed variable always restarts it: an environment is fixed at exec), and its exit
status becomes ours. Every task it starts (the reload loop, one exit
watcher per process) is its own and ends in :meth:`Child.aclose`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Callable

from agent import metrics
from agent.acks import Acks
from agent.childenv import child_environment
from agent.commands import exit_status
from agent.config import EXEC_TARGET, ExecConfig
from agent.errors import ConfigError
from agent.execenv import ExecEnv
from agent.logs import event
from agent.notify import Debouncer
from agent.taskset import TaskSet

TARGET = EXEC_TARGET


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved once in the parent so the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the agent dies (even by kill -9).

    The child has its own session so that only our forwarding reaches it; without
    this an agent killed outright would leave the application running unsupervised.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """The supervised application. ``start()``, then ``trigger()`` after renders; the
    runtime forwards SIGTERM/SIGINT with ``forward()``, waits with ``await wait()`` and
    ends it (and every task of ours) with ``await aclose()``."""

    def __init__(self, cfg: ExecConfig, env: ExecEnv | None = None) -> None:
        self.cfg = cfg
        self.env = env if env is not None else ExecEnv(cfg.env_template)
        self._started_env: dict[str, str] = {}  # the variables the running process got
        self.debouncer = Debouncer(cfg.wait)
        self.acks = Acks()  # which triggers a reload (or nothing to reload) has covered
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future[int] | None = None
        self._tasks = TaskSet()  # the reload loop and one exit watcher per process
        self._replacing: asyncio.subprocess.Process | None = None  # being restarted by us
        self._stopping = False
        self._lock = asyncio.Lock()  # one reload/stop at a time
        self._reloader: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return TARGET

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Spawn the command and the reload loop. Raises ConfigError when it cannot run."""
        self._exited = asyncio.get_running_loop().create_future()
        if missing := self.env.missing():  # the render loop retries them with backoff
            event("child_waiting", logging.WARNING, for_variables=missing)
            await self.env.complete()
        await self._spawn()
        self._reloader = self._tasks.spawn(self._reload_loop(), "exec-reload")

    async def _spawn(self) -> None:
        variables = self.env.snapshot()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.cfg.command,
                env=child_environment(self.cfg.env) | variables,  # never argv, never logged
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            where = f"exec.command: cannot start {self.cfg.command[0]!r}"
            raise ConfigError([f"{where}: {reason}"]) from None
        self._proc, self._started_env = proc, variables
        event("child_started", pid=proc.pid, command=self.cfg.command[0])
        self._tasks.spawn(self._watch(proc), f"child-{proc.pid}")

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        code = exit_status(await proc.wait())
        if proc is self._replacing:
            return  # a restart: _restart logs it and starts the next one
        event("child_exited", pid=proc.pid, exit_code=code)
        self._finish(code)

    def _finish(self, code: int) -> None:
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(code)
        if self._reloader is not None:
            self._reloader.cancel()  # nothing left to reload

    def trigger(self) -> None:
        """A change happened: reload once the burst settles (``wait.min``/``wait.max``)."""
        self.acks.issue()
        self.debouncer.trigger()

    async def _reload_loop(self) -> None:
        while True:
            await self.debouncer.next_burst()
            await self.reload()

    async def reload(self) -> None:
        """Reload now per ``exec.reload``. Logs and counts failures; never raises."""
        async with self._lock:
            upto = self.acks.issued
            # its variables changed: only a new process can see them, whatever exec.reload
            restart = self.cfg.reload == "restart" or self.env.snapshot() != self._started_env
            if not self.running or self._stopping or (self.cfg.reload == "none" and not restart):
                self.acks.cover(upto)  # nobody to tell: nothing is owed
                return
            try:
                if restart:
                    await self._restart()
                else:
                    self._send(self.cfg.signal)
                    event("signalled", target=TARGET, signal=self.cfg.signal.name, pid=self.pid)
            except Exception as exc:  # keep supervising; the failure is logged and counted
                metrics.notifications_total.labels(TARGET, "error").inc()
                reason = f"{type(exc).__name__}: {exc}"
                event("notify_failed", logging.WARNING, target=TARGET, reason=reason)
                return
            metrics.notifications_total.labels(TARGET, "ok").inc()
            self.acks.cover(upto)

    async def _restart(self) -> None:
        old = self._proc
        assert old is not None
        self._replacing = old
        code = await self._terminate(old)
        event("child_exited", pid=old.pid, exit_code=code, reason="restart")
        if self._stopping:  # SIGTERM/SIGINT forwarded meanwhile: do not start it again
            self._finish(code)
            return
        try:
            await self._spawn()
        except ConfigError:
            self._finish(code)  # nothing left to supervise: wait() must not hang
            raise

    async def _terminate(self, proc: asyncio.subprocess.Process) -> int:
        """SIGTERM, then SIGKILL after ``kill_timeout``. Returns the exit status."""
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return exit_status(await asyncio.wait_for(proc.wait(), self.cfg.kill_timeout))
        except TimeoutError:
            event("child_kill", logging.WARNING, pid=proc.pid, after=self.cfg.kill_timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return exit_status(await proc.wait())

    def _send(self, sig: signal.Signals) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def forward(self, sig: signal.Signals) -> None:
        """Pass a signal we received on to the child. SIGTERM/SIGINT end reloads."""
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        self._send(sig)

    async def wait(self) -> int:
        """The child's exit status once it exits for good (not across restarts)."""
        if self._exited is None:
            raise RuntimeError("Child.wait() before start()")
        return await asyncio.shield(self._exited)

    async def aclose(self) -> int:
        """Terminate the child (SIGTERM, then SIGKILL after kill_timeout), end every task
        of ours, and return the child's exit status."""
        self._stopping = True
        async with self._lock:
            if self.running and self._proc is not None:
                await self._terminate(self._proc)
        code = await self.wait()
        await self._tasks.aclose()
        return code
