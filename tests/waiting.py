"""The one "wait until" of the test suite: poll a condition, fail with a clear message.

Tests wait for conditions, never for a fixed time: on two shared cores anything can be
slow, so every wait is a poll with a generous deadline. :func:`wait_for` is the driver
for plain (threaded) code, :func:`wait_until` the one for coroutines; both share the
deadline and the message, and both return the first truthy value of ``check``.

``not_yet`` names exceptions that mean "not yet" (a server still starting refuses
connections); the last one seen is part of the failure message.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

POLL = 0.05  # seconds between two looks


class _Attempts:
    """The deadline and the "not yet" errors shared by both drivers."""

    def __init__(
        self,
        limit: float = 30.0,
        what: str = "condition",
        not_yet: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.deadline = time.monotonic() + limit
        self.limit, self.what, self.not_yet = limit, what, not_yet
        self.last: BaseException | None = None

    def __iter__(self) -> Iterator[None]:
        while True:
            yield
            if time.monotonic() > self.deadline:
                last = self.last
                cause = f" (last error: {type(last).__name__}: {last})" if last else ""
                raise AssertionError(
                    f"timed out after {self.limit:g}s waiting for {self.what}{cause}"
                )

    @contextlib.contextmanager
    def looking(self) -> Iterator[None]:
        try:
            yield
        except self.not_yet as exc:
            self.last = exc


def wait_for(check: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
    """Poll ``check`` from a thread (``time.sleep`` between looks); ``limit`` (30 s),
    ``what`` and ``not_yet`` as for :class:`_Attempts`."""
    attempts = _Attempts(*args, **kwargs)
    for _ in attempts:
        with attempts.looking():
            if result := check():
                return result
        time.sleep(POLL)
    raise AssertionError("unreachable")


async def wait_until(check: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
    """Poll ``check`` (sync or async) from a coroutine (``asyncio.sleep`` between looks)."""
    attempts = _Attempts(*args, **kwargs)
    for _ in attempts:
        with attempts.looking():
            result = check()
            if result := (await result if inspect.isawaitable(result) else result):
                return result
        await asyncio.sleep(POLL)
    raise AssertionError("unreachable")
