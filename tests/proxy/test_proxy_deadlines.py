"""proxy/deadlines.py: one timer for all of the server's login deadlines.

The proxy's own use (client_login_timeout ending silent and half-done logins) is
tested end to end in test_proxy_connections.py and test_proxy_security.py; these pin
the parts a login flood relies on: one armed timer however many logins wait, nothing
handed on before its time or after it ended, and a failing handler stopping nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from proxy.deadlines import Deadlines

LENGTH = 0.05


class CountingTimers:
    """The running loop's clock and timers, counting the timers armed."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.armed = 0

    def time(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Callable[[], Any]) -> asyncio.TimerHandle:
        self.armed += 1
        return self.loop.call_at(when, callback)


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_many_deadlines_arm_one_timer_and_fall_due_in_order_never_early() -> None:
    due: list[tuple[int, float]] = []
    started: dict[int, float] = {}

    async def scenario() -> None:
        timers = CountingTimers()
        deadlines: Deadlines[int] = Deadlines(
            timers, LENGTH, lambda i: due.append((i, timers.time()))
        )
        for batch in (range(100), range(100, 200)):  # logins arriving in two bursts
            for i in batch:
                started[i] = timers.time()
                deadlines.start(i)
            for i in batch[::2]:
                deadlines.end(i)  # logged in in time
            if batch.start == 0:
                assert timers.armed == 1  # a hundred logins waiting, one timer
                await asyncio.sleep(LENGTH / 2)
        # a timer later than every deadline: the loop runs timers in the order they fall due
        await asyncio.sleep(LENGTH * 2)
        assert not len(deadlines)
        # armed again only for a deadline still waiting when it fired: per burst, not
        # per login
        assert timers.armed <= 4

    _run(scenario)
    assert [i for i, _ in due] == list(range(1, 200, 2))
    assert all(at >= started[i] + LENGTH for i, at in due)


def test_a_failing_handler_stops_neither_the_others_nor_later_deadlines() -> None:
    handed: list[str] = []

    def on_due(item: str) -> None:
        handed.append(item)
        if item == "bad":
            raise RuntimeError("handler failed")

    async def scenario() -> None:
        timers = CountingTimers()
        deadlines: Deadlines[str] = Deadlines(timers, LENGTH, on_due)
        deadlines.start("bad")
        deadlines.start("next")
        await asyncio.sleep(LENGTH * 2)
        deadlines.start("later")
        await asyncio.sleep(LENGTH * 2)
        assert not len(deadlines)

    _run(scenario)
    assert handed == ["bad", "next", "later"]


def test_closed_deadlines_hand_on_nothing() -> None:
    handed: list[int] = []

    async def scenario() -> None:
        timers = CountingTimers()
        deadlines: Deadlines[int] = Deadlines(timers, LENGTH, handed.append)
        deadlines.start(1)
        deadlines.close()
        await asyncio.sleep(LENGTH * 2)
        deadlines.start(2)  # a deadline set after close() works as before
        await asyncio.sleep(LENGTH * 2)

    _run(scenario)
    assert handed == [2]
