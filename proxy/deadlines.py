"""One loop timer for many deadlines of one length: the proxy's client_login_timeout.

A timer per login (``call_later`` at accept, ``cancel`` when the login is done: most
are done within a millisecond) cost more than the rest of a quick login's
bookkeeping. PgBouncer looks at its logging-in clients from a periodic janitor; here
the deadlines wait in a dict in the order they were set, which, all being of one
length on one monotonic clock, is the order they fall due. One timer is armed for the
earliest; ending a deadline is one dict removal, and the timer, when it fires, hands
on what is due and arms itself for the next one still waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, final

log = logging.getLogger("credsidecar.proxy")

T = TypeVar("T")


class Timers(Protocol):
    """What is used of the event loop."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], Any]) -> asyncio.TimerHandle: ...


@final
class Deadlines(Generic[T]):
    """``on_due(item)`` once ``length`` seconds after :meth:`start`, unless :meth:`end`
    came first."""

    __slots__ = ("_due", "_loop", "_on_due", "_time", "_timer", "length")

    def __init__(self, loop: Timers, length: float, on_due: Callable[[T], None]) -> None:
        self._loop = loop
        self._time = loop.time  # bound once: through the Protocol it is a call by name
        self.length = length
        self._on_due = on_due
        self._due: dict[T, float] = {}  # item -> loop time it falls due, in that order
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def start(self, item: T) -> None:
        when = self._time() + self.length
        self._due[item] = when
        if self._timer is None:
            self._timer = self._loop.call_at(when, self._fire)
        # else it fires no later than this one is due (all have the same length)

    def end(self, item: T) -> None:
        """No deadline for ``item`` any more (none started: nothing happens)."""
        if item in self._due:  # compiled: two dict operations, pop() is a call by name
            del self._due[item]

    def close(self) -> None:
        """Forget every deadline and the timer: nothing is due from now on."""
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        now = self._time()
        due = self._due
        fallen: list[T] = []
        for item, when in due.items():
            if when > now:
                self._timer = self._loop.call_at(when, self._fire)
                break
            fallen.append(item)
        for item in fallen:
            del due[item]
        # armed again before any is handed on: one that raises cannot stop the rest
        for item in fallen:
            try:
                self._on_due(item)
            except Exception:
                log.exception("proxy_deadline_handler_failed")
