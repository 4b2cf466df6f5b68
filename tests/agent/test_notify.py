"""Notify: one signal per burst (counted by a real process), the max bound, every target
kind, and one precise log line for each reason a target cannot be signalled."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from otheruid import NOBODY, call_as
from sighup_counter import Record, command
from waiting import wait_until as until

from agent import metrics
from agent.config import NotifyConfig, Wait
from agent.errors import NotifyError
from agent.notify import Debouncer, Notifier, send_signal, settles_at


@dataclass
class App:
    proc: asyncio.subprocess.Process
    record: Record
    marker: str

    @property
    def pid(self) -> int:
        return self.proc.pid


async def start_app(tmp_path: Path, *extra: str) -> App:
    marker = f"app-{uuid.uuid4().hex[:12]}"
    record = Record(tmp_path / f"{marker}.log")
    proc = await asyncio.create_subprocess_exec(*command(record.path, *extra, marker))
    await record.wait_for("started", 1)
    return App(proc, record, marker)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    started = await start_app(tmp_path)
    yield started
    await stop_app(started)


async def stop_app(app: App) -> None:
    if app.proc.returncode is None:
        app.proc.kill()
    await app.proc.wait()


def sent(target: str, result: str = "ok") -> float:
    value = metrics.REGISTRY.get_sample_value(
        "credsidecar_notifications_total", {"target": target, "result": result}
    )
    return value or 0.0


@pytest.fixture
def running() -> Iterator[list[asyncio.Task[None]]]:
    """Tasks started by a test (Notifier.run); cancelled at the end."""
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()


def notifier(tasks: list[asyncio.Task[None]], **options: Any) -> Notifier:
    n = Notifier(NotifyConfig(name=f"t-{uuid.uuid4().hex[:8]}", **options))
    tasks.append(asyncio.create_task(n.run()))
    return n


async def test_a_burst_of_triggers_sends_exactly_one_signal(
    app: App, tmp_path: Path, running: list[asyncio.Task[None]]
) -> None:
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(f"{app.pid}\n")
    n = notifier(running, pid_file=pid_file, wait=Wait(min=1.0, max=20.0))
    for _ in range(5):
        n.trigger()
        await asyncio.sleep(0.05)
    await app.record.wait_for("hup", 1)
    # no burst pending and one delivery counted: no second signal can follow
    assert not n.pending
    assert sent(n.cfg.name) == 1
    assert app.record.lines("hup") == [app.pid]


async def test_triggers_spread_beyond_max_still_signal_at_max(
    app: App, running: list[asyncio.Task[None]]
) -> None:
    n = notifier(running, pid=app.pid, wait=Wait(min=1.0, max=2.0))
    # keep triggering faster than min: only the max bound can end the burst
    for _ in range(600):
        n.trigger()
        await asyncio.sleep(0.1)
        if app.record.count("hup"):
            break
    assert app.record.count("hup") == 1, "no signal while triggers kept coming"
    n.trigger()  # the burst ended with that signal: a new trigger starts the next one
    await app.record.wait_for("hup", 2)


async def test_flush_delivers_a_pending_notification_now(app: App) -> None:
    n = Notifier(NotifyConfig(name="flush", pid=app.pid, wait=Wait(min=60, max=120)))
    await n.flush()  # nothing pending: nothing sent
    n.trigger()
    await n.flush()
    await app.record.wait_for("hup", 1)
    assert not n.pending


async def test_process_regex_signals_every_match_and_only_matches(
    tmp_path: Path, running: list[asyncio.Task[None]]
) -> None:
    tag = uuid.uuid4().hex[:8]
    a = await start_app(tmp_path, f"group-{tag}")
    b = await start_app(tmp_path, f"group-{tag}")
    other = await start_app(tmp_path, f"other-{tag}")
    try:
        n = notifier(running, process=rf"sighup_counter\.py .* group-{tag} ", wait=Wait(0.1, 1))
        n.trigger()
        await a.record.wait_for("hup", 1)
        await b.record.wait_for("hup", 1)
        assert sent(n.cfg.name) == 1
        assert other.record.count("hup") == 0
    finally:
        for started in (a, b, other):
            await stop_app(started)


async def test_command_target_runs_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "ran"
    script = "import sys; open(sys.argv[1], 'a').write('ran;')"
    n = Notifier(NotifyConfig(name="cmd", command=(sys.executable, "-c", script, str(out))))
    n.trigger()
    await n.flush()
    assert out.read_text() == "ran;"
    assert sent("cmd") >= 1


async def test_run_survives_failures_and_signals_once_the_target_appears(
    app: App, tmp_path: Path, running: list[asyncio.Task[None]], caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "late.pid"
    n = notifier(running, pid_file=pid_file, wait=Wait(0.1, 1))
    n.trigger()
    await until(lambda: any(r.getMessage() == "notify_failed" for r in caplog.records))
    pid_file.write_text(str(app.pid))
    n.trigger()
    await app.record.wait_for("hup", 1)
    assert sent(n.cfg.name, "error") == 1


# --------------------------------------------------------------------------- why not


def reason_of(caplog: pytest.LogCaptureFixture, target: str) -> str:
    found = [
        r
        for r in caplog.records
        if r.getMessage() == "notify_failed" and getattr(r, "target", None) == target
    ]
    assert len(found) == 1, [r.getMessage() for r in caplog.records]
    assert found[0].levelno >= logging.WARNING
    return str(found[0].reason)  # type: ignore[attr-defined]


async def exited_pid() -> int:
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_pid_file", ["no pid file yet at "]),
        ("pid_file_unreadable", ["is unreadable", "Is a directory"]),
        ("pid_file_garbage", ["does not hold a process id"]),
        ("not_visible", ["is not visible", "shareProcessNamespace: true"]),
        ("ourselves", ["is the sidecar itself"]),
        ("group", ["pid 0 is not a process id"]),
        ("no_match", ["no process matches", "visible processes", "shareProcessNamespace"]),
        ("command_missing", ["cannot start", "No such file"]),
        ("command_fails", ["exited with 3"]),
        ("command_hangs", ["timed out after 0.5s", "process group was killed"]),
    ],
)
async def test_each_reason_has_its_own_log_line(
    case: str, expected: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credsidecar")
    pid_file = tmp_path / "app.pid"
    targets: dict[str, dict[str, Any]] = {
        "no_pid_file": {"pid_file": pid_file},
        "pid_file_unreadable": {"pid_file": tmp_path},
        "pid_file_garbage": {"pid_file": pid_file},
        "not_visible": {"pid": await exited_pid()},
        "ourselves": {"pid": os.getpid()},
        "group": {"pid": 0},
        "no_match": {"process": f"no-such-process-{uuid.uuid4().hex}"},
        "command_missing": {"command": (str(tmp_path / "missing"),)},
        "command_fails": {"command": (sys.executable, "-c", "raise SystemExit(3)")},
        "command_hangs": {"command": ("sleep", "30"), "timeout": 0.5},
    }
    target = targets[case]
    if case == "pid_file_garbage":
        pid_file.write_text("not-a-pid\n")
    n = Notifier(NotifyConfig(name=case, **target))
    before = sent(case, "error")
    assert await n.deliver() is False
    reason = reason_of(caplog, case)
    for text in expected:
        assert text in reason
    assert "not-a-pid" not in reason  # the pid file's contents are never echoed
    assert sent(case, "error") == before + 1


async def test_other_uid_gives_a_permission_reason(app: App) -> None:
    """Signal a root-owned process as nobody: EPERM, and a reason that says what to do.

    The unprivileged side is a fork of this process (otheruid): it needs nothing from
    the checkout, which may be unreadable for nobody (a clone under a private directory).
    """
    if os.geteuid() != 0:
        reason = _signal_reason(1)  # pid 1 belongs to root: EPERM for us already
    else:
        reason = await asyncio.to_thread(call_as, NOBODY, lambda: _signal_reason(app.pid))
    assert "not permitted to signal process" in reason
    assert "runAsUser" in reason
    assert app.record.count("hup") == 0


def _signal_reason(pid: int) -> str:
    try:
        send_signal(pid, signal.SIGHUP, "eperm")
    except NotifyError as exc:
        return str(exc)
    return "signalled"


# --------------------------------------------------------------------------- debouncer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_settles_min_after_its_last_trigger_and_at_most_max_after_its_first() -> None:
    wait = Wait(min=1.0, max=5.0)
    assert settles_at(first=0.0, last=0.0, wait=wait) == 1.0
    assert settles_at(first=0.0, last=3.5, wait=wait) == 4.5
    assert settles_at(first=0.0, last=4.5, wait=wait) == 5.0  # max wins over min


def test_the_debouncer_decides_on_its_clock_without_sleeping() -> None:
    clock = Clock()
    d = Debouncer(Wait(min=1.0, max=3.0), clock=clock)
    assert d.remaining() is None and not d.pending
    d.trigger()
    assert d.remaining() == 1.0
    for _ in range(5):  # a trigger every 0.5 s keeps it open, up to max
        clock.now += 0.5
        d.trigger()
    assert d.remaining() == pytest.approx(0.5)  # max: 3 s after the first trigger
    clock.now += 0.5
    assert d.remaining() == pytest.approx(0.0)
    assert d.take() is True and d.remaining() is None
    assert d.take() is False


async def test_a_burst_taken_by_flush_is_not_returned_again() -> None:
    d = Debouncer(Wait(min=0.05, max=1.0))
    waiter = asyncio.create_task(d.next_burst())
    d.trigger()
    await asyncio.sleep(0)  # next_burst now sleeps towards the burst's end
    assert d.take() is True  # a flush delivered it meanwhile
    d.trigger()  # the next burst
    await asyncio.wait_for(waiter, 30)
    assert not d.pending and d.take() is False
