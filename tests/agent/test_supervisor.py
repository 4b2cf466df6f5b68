"""The supervisor on its own: a failing part restarts with backoff, alone, counted and
logged by name; a stopped part stays stopped; a cancel of the caller is not swallowed."""

from __future__ import annotations

import asyncio
from typing import Any

from waiting import wait_until

from agent import metrics
from agent.supervisor import Supervisor, describe_failure


def failures(task: str) -> float:
    return metrics.REGISTRY.get_sample_value("credsidecar_task_failures_total", {"task": task}) or 0


async def test_a_failing_part_is_restarted_and_the_others_keep_running(events: Any) -> None:
    supervisor = Supervisor(initial=0.05, maximum=0.2)
    runs: list[int] = []
    steady = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) <= 3:
            raise KeyError("secret-looking-value")  # three bugs in a row, then it holds
        await asyncio.Event().wait()

    async def healthy() -> None:
        steady.set()
        await asyncio.Event().wait()

    before = failures("flaky")
    supervisor.start("healthy", healthy)
    part = supervisor.start("flaky", flaky)
    try:
        await wait_until(lambda: len(runs) == 4, 10, "three restarts")
        assert part.failures == 3 and part.state == "running"
        assert failures("flaky") == before + 3
        logged = events.named("task_failed", task="flaky")
        assert [r.error for r in logged] == ["KeyError"] * 3  # never the message
        assert all(r.where.startswith("agent/supervisor.py:") for r in logged)  # our frame
        assert all(r.restart_in > 0 for r in logged)
        assert steady.is_set() and supervisor.parts["healthy"].failures == 0
    finally:
        await supervisor.aclose()
    assert {p.state for p in supervisor.parts.values()} == {"stopped"}
    assert "secret-looking-value" not in str(events.caplog.records)


async def test_a_part_that_returns_is_finished_not_restarted() -> None:
    supervisor = Supervisor(initial=0.05, maximum=0.1)
    calls = []

    async def once() -> None:
        calls.append(1)

    part = supervisor.start("once", once)
    await wait_until(lambda: part.state == "finished", 10, "the part to finish")
    await supervisor.aclose()
    assert calls == [1] and part.state == "finished"


async def test_stopping_a_part_does_not_swallow_a_cancel_of_the_caller() -> None:
    supervisor = Supervisor()
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # e.g. a drain with a deadline

    part = supervisor.start("slow", slow_to_stop)
    await asyncio.sleep(0)
    stopper = asyncio.create_task(part.stop())
    await asyncio.sleep(0.05)
    stopper.cancel()
    await asyncio.wait([stopper])
    assert stopper.cancelled()
    release.set()
    await supervisor.aclose()


def test_a_failure_is_described_by_type_and_place_never_by_message() -> None:
    from proxy.configkit import parse_mode  # the shared reader kit, used by agent/config.py

    try:
        parse_mode("hunter2")  # its message quotes the value
    except ValueError as exc:
        described = describe_failure(exc)
    assert described["error"] == "ValueError"
    assert "hunter2" not in str(described)
    assert (
        described["where"].startswith("proxy/configkit.py:")
        and "in parse_mode" in described["where"]
    )
