"""The admin API's refresh coalescing, decided on an injected clock without sleeping
(end to end, with OpenBao's audit log counting reads: test_surfaces_e2e.py)."""

from __future__ import annotations

import asyncio

from agent.admin import RefreshGate, refresh_delay


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_refresh_waits_out_the_rest_of_the_second_after_the_last_one() -> None:
    assert refresh_delay(None, 10.0) == 0.0  # never refreshed by request: at once
    assert refresh_delay(10.0, 10.25) == 0.75
    assert refresh_delay(10.0, 11.0) == 0.0
    assert refresh_delay(10.0, 30.0, interval=5.0) == 0.0


async def test_requests_inside_the_interval_join_one_scheduled_wake() -> None:
    clock, woken = Clock(), list[str]()
    gate = RefreshGate(woken.append, clock=clock)
    gate.request(["db", "kv"])
    assert woken == ["db", "kv"]  # nothing was refreshed before: both at once
    clock.now += 0.2
    for _ in range(200):
        gate.request(["db"])
    assert woken == ["db", "kv"]  # held: one wake is scheduled for the end of the second
    assert list(gate._pending) == ["db"]
    clock.now += 5  # a secret refreshed long ago goes at once again
    gate.request(["kv"])
    assert woken == ["db", "kv", "kv"]
    gate.close()  # shutdown: the pending wake never fires
    assert gate._pending == {}
    await asyncio.sleep(0)
    assert woken == ["db", "kv", "kv"]


async def test_the_scheduled_wake_fires_once() -> None:
    woken = list[str]()
    gate = RefreshGate(woken.append, interval=0.05)
    gate.request(["db"])
    gate.request(["db"])
    gate.request(["db"])
    for _ in range(600):
        if len(woken) == 2:
            break
        await asyncio.sleep(0.05)
    assert woken == ["db", "db"] and not gate._pending


def test_a_wake_for_a_source_not_running_yet_is_dropped() -> None:
    def wake(name: str) -> None:
        raise KeyError(name)  # the runtime before its sources exist

    RefreshGate(wake).request(["db"])  # no exception: the source checks when it starts
