"""One supervisor for the parts of the agent: a part that fails is restarted, alone.

Each part (a source, the render loop, a notifier, the rotations, the proxy, the token
keeper) is a long-running coroutine started with :meth:`Supervisor.start`. The parts
handle the failures they expect (Vault down, a render error) themselves; anything else
escaping a part is a bug or an unforeseen fault. Then the part is logged with its name
and where it failed (``task_failed``), counted in
``credsidecar_task_failures_total{task}``, and restarted after a backoff (the one
:class:`agent.leases.Backoff`), while every other part keeps serving. A part that ran
for ``healthy_after`` seconds before failing starts its backoff afresh.

The supervisor owns every task it starts: :meth:`Part.stop` ends one (the runtime
stops parts in its shutdown order), :meth:`Supervisor.aclose` ends whatever is left.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent import metrics
from agent.errors import SidecarError
from agent.leases import Backoff
from agent.logs import event

PartState = Literal["running", "restarting", "finished", "stopped"]
_ROOT = Path(__file__).resolve().parent.parent
_OURS = (_ROOT / "agent", _ROOT / "proxy")  # frames in these packages are ours


def describe_failure(exc: BaseException) -> dict[str, str]:
    """What to log about an unexpected exception, without a value it may quote.

    Our own errors are written to be shown; anything else only by type, plus the
    innermost frame of our code (file:line in function) to find the bug by.
    """
    error = f"{type(exc).__name__}: {exc}" if isinstance(exc, SidecarError) else type(exc).__name__
    out = {"error": error}
    ours = [
        (frame, path)
        for frame in traceback.extract_tb(exc.__traceback__)
        if any((path := Path(frame.filename).resolve()).is_relative_to(p) for p in _OURS)
    ]
    if ours:
        frame, path = ours[-1]
        out["where"] = f"{path.relative_to(_ROOT)}:{frame.lineno} in {frame.name}"
    return out


@dataclass
class Part:
    """One supervised part: its name, its task, and how it has fared."""

    name: str
    run: Callable[[], Awaitable[None]]
    state: PartState = "running"
    failures: int = 0
    last_error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def stop(self, reason: str = "shutdown") -> None:
        """Cancel the part (with ``reason`` as the message) and wait until it has ended."""
        task = self.task
        if task is None or task.done():
            return
        task.cancel(reason)
        await asyncio.wait([task])  # not `await task`: a cancel of our caller must propagate
        if self.state != "finished":
            self.state = "stopped"

    def status(self) -> dict[str, object]:
        return {"state": self.state, "failures": self.failures, "last_error": self.last_error}


class Supervisor:
    def __init__(
        self,
        *,
        initial: float = 0.5,
        maximum: float = 30.0,
        healthy_after: float = 60.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial, self.maximum, self.healthy_after = initial, maximum, healthy_after
        self.rng = rng or random.Random()
        self.clock = clock
        self.parts: dict[str, Part] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> Part:
        """Run ``run()`` as the part ``name`` (unique), restarting it when it fails."""
        if name in self.parts and self.parts[name].state in ("running", "restarting"):
            raise RuntimeError(f"part {name} is already running")
        part = Part(name, run)
        metrics.task_failures_total.labels(name)  # the series exists (at 0) from the start
        part.task = asyncio.create_task(self._keep(part), name=f"part {name}")
        self.parts[name] = part
        return part

    async def _keep(self, part: Part) -> None:
        backoff = Backoff(self.initial, self.maximum, self.rng)
        while True:
            started = self.clock()
            part.state = "running"
            try:
                await part.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the point of supervision: any failure of this part
                failure = describe_failure(exc)
                part.failures += 1
                part.last_error = failure["error"]
                metrics.task_failures_total.labels(part.name).inc()
                if self.clock() - started >= self.healthy_after:
                    backoff.reset()
                delay = backoff.next()
                part.state = "restarting"
                event(
                    "task_failed",
                    logging.ERROR,
                    task=part.name,
                    restart_in=round(delay, 3),
                    failures=part.failures,
                    **failure,
                )
                await asyncio.sleep(delay)
                event("task_restarted", task=part.name)
                continue
            part.state = "finished"
            return

    async def aclose(self) -> None:
        """Stop every part still running, the latest started first."""
        for part in reversed(list(self.parts.values())):
            await part.stop()

    def status(self) -> dict[str, dict[str, object]]:
        return {name: part.status() for name, part in self.parts.items()}
