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
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

POLL = 0.05  # seconds between two looks


def _attempts(limit: float, what: str, last: list[BaseException]) -> Iterator[None]:
    """Yield once per attempt until ``limit``; then fail naming ``what``."""
    deadline = time.monotonic() + limit
    while True:
        yield
        if time.monotonic() > deadline:
            cause = f" (last error: {type(last[0]).__name__}: {last[0]})" if last else ""
            raise AssertionError(f"timed out after {limit:g}s waiting for {what}{cause}")


def wait_for(
    check: Callable[[], Any],
    limit: float = 30.0,
    what: str = "condition",
    not_yet: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``check`` from a thread (``time.sleep`` between looks)."""
    last: list[BaseException] = []
    for _ in _attempts(limit, what, last):
        try:
            if result := check():
                return result
        except not_yet as exc:
            last[:] = [exc]
        time.sleep(POLL)
    raise AssertionError("unreachable")


async def wait_until(
    check: Callable[[], Any],
    limit: float = 30.0,
    what: str = "condition",
    not_yet: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``check`` (sync or async) from a coroutine (``asyncio.sleep`` between looks)."""
    last: list[BaseException] = []
    for _ in _attempts(limit, what, last):
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except not_yet as exc:
            last[:] = [exc]
        await asyncio.sleep(POLL)
    raise AssertionError("unreachable")
