"""Exec mode with a real child: reload signal per burst, restart, forwarded SIGTERM,
exit statuses like a shell, SIGKILL after kill_timeout, environment."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sighup_counter import Record, command
from waiting import wait_until as until

from agent import metrics
from agent.childenv import EnvPolicy
from agent.config import ENV_MAX_SIZE, EnvTemplateConfig, ExecConfig, TemplateConfig, Wait
from agent.errors import ConfigError
from agent.execenv import ExecEnv
from agent.pipeline import RenderPipeline
from agent.secret import SecretValue
from agent.supervise import Child


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    """Children a test starts; stopped at the end."""
    started: list[Child] = []
    yield started
    for child in started:
        child.cfg = ExecConfig(**{**child.cfg.__dict__, "kill_timeout": 1.0})
        await child.aclose()


async def start(
    children: list[Child], tmp_path: Path, *extra: str, **options: Any
) -> tuple[Child, Record]:
    record = Record(tmp_path / "child.log")
    cfg = ExecConfig(command=tuple(command(record.path, *extra)), **options)
    child = Child(cfg)
    await child.start()
    children.append(child)
    await record.wait_for("started", 1)
    return child, record


def reloads(result: str = "ok") -> float:
    value = metrics.REGISTRY.get_sample_value(
        "credsidecar_notifications_total", {"target": "exec", "result": result}
    )
    return value or 0.0


async def test_burst_sends_one_reload_signal_then_sigterm_ends_it(
    children: list[Child], tmp_path: Path
) -> None:
    child, record = await start(
        children, tmp_path, "--term-exit", "3", wait=Wait(min=1.0, max=20.0)
    )
    before = reloads()
    for _ in range(4):
        child.trigger()
        await asyncio.sleep(0.05)
    assert await record.wait_for("hup", 1) == [child.pid]
    assert not child.debouncer.pending
    assert reloads() == before + 1

    child.forward(signal.SIGTERM)
    assert await asyncio.wait_for(child.wait(), 30) == 3
    assert not child.running


async def test_restart_mode_replaces_the_child(children: list[Child], tmp_path: Path) -> None:
    # as the agent does before it starts its child (agent/cli.py): SIGINT caught here,
    # so the children start with its default action even when this process was started
    # with SIGINT ignored (a background job of a shell without job control)
    inherited = signal.getsignal(signal.SIGINT)
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, lambda: None)
    try:
        await _restart_then_sigint(children, tmp_path)
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, inherited)


async def _restart_then_sigint(children: list[Child], tmp_path: Path) -> None:
    child, record = await start(
        children, tmp_path, "--term-exit", "4", reload="restart", wait=Wait(0.1, 1)
    )
    first = child.pid
    waiter = asyncio.create_task(child.wait())
    child.trigger()
    pids = await record.wait_for("started", 2)
    assert pids[0] == first and pids[1] == child.pid != first
    assert record.count("hup") == 0
    assert not waiter.done()  # the restart's exit is not the child's exit
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)

    child.forward(signal.SIGINT)  # Python dies of an unhandled SIGINT: 128 + 2
    assert await asyncio.wait_for(waiter, 30) == 128 + signal.SIGINT


async def test_sigterm_during_a_restart_ends_it_without_a_new_child(
    children: list[Child], tmp_path: Path
) -> None:
    child, record = await start(
        children, tmp_path, "--ignore-term", reload="restart", kill_timeout=1.0
    )
    restart = asyncio.create_task(child.reload())
    await asyncio.sleep(0)  # the restart has sent SIGTERM and waits for the exit
    child.forward(signal.SIGTERM)
    await asyncio.wait_for(restart, 30)
    assert await asyncio.wait_for(child.wait(), 30) == 128 + signal.SIGKILL
    assert record.count("started") == 1
    assert not child.running


async def test_killed_by_a_signal_exits_128_plus_n(children: list[Child], tmp_path: Path) -> None:
    child, _ = await start(children, tmp_path)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    assert await asyncio.wait_for(child.wait(), 30) == 128 + signal.SIGKILL


async def test_stop_kills_a_child_that_ignores_sigterm(
    children: list[Child], tmp_path: Path
) -> None:
    child, _ = await start(children, tmp_path, "--ignore-term", kill_timeout=0.5)
    assert await asyncio.wait_for(child.aclose(), 30) == 128 + signal.SIGKILL


async def test_reload_none_and_after_stop_sends_nothing(
    children: list[Child], tmp_path: Path
) -> None:
    child, record = await start(children, tmp_path, reload="none")
    await child.reload()
    child.cfg = ExecConfig(**{**child.cfg.__dict__, "reload": "signal"})
    await child.reload()  # a signal reload now lands: proves the first one sent nothing
    assert await record.wait_for("hup", 1) == [child.pid]
    child.forward(signal.SIGTERM)
    await child.reload()  # stopping: no more reloads
    assert await asyncio.wait_for(child.wait(), 30) == 0
    assert record.count("hup") == 1


async def test_child_gets_our_environment_plus_exec_env(
    children: list[Child], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "the-agents-token")  # ours, never the app's
    out = tmp_path / "env"
    script = (
        "import os, sys; "
        "open(sys.argv[1], 'w').write(os.environ['PATH'] + '|' + os.environ['APP_MODE'] + '|' "
        "+ os.environ.get('VAULT_TOKEN', 'none')); "
        "sys.exit(7)"
    )
    child = Child(
        ExecConfig(
            command=(sys.executable, "-c", script, str(out)),
            env=EnvPolicy(set={"APP_MODE": "demo"}),
        )
    )
    await child.start()
    children.append(child)
    assert await asyncio.wait_for(child.wait(), 30) == 7
    assert out.read_text() == os.environ["PATH"] + "|demo|none"


async def test_a_command_that_cannot_start_is_a_config_error(tmp_path: Path) -> None:
    child = Child(ExecConfig(command=(str(tmp_path / "no-such-app"),)))
    with pytest.raises(ConfigError, match=r"exec.command: cannot start .*no-such-app"):
        await child.start()


async def test_wait_returns_for_a_child_that_already_exited(
    children: list[Child], tmp_path: Path
) -> None:
    child = Child(ExecConfig(command=(sys.executable, "-c", "pass")))
    await child.start()
    children.append(child)
    await until(lambda: not child.running)
    assert await asyncio.wait_for(child.wait(), 30) == 0
    assert await asyncio.wait_for(child.aclose(), 30) == 0


# --------------------------------------------------------------------------- exec.env_template


def db(version: str, password: str | None = None) -> SecretValue:
    data = {"username": f"u-{version}", "password": password or f"pw-{version}"}
    return SecretValue("db", data, version)


DSN = EnvTemplateConfig("DATABASE_URL", '{{ secrets.db | libpq_dsn(host="db") }}')


async def test_a_changed_variable_restarts_the_child_and_is_delivered_once_it_runs(
    children: list[Child], tmp_path: Path, shm: Path
) -> None:
    record = Record(tmp_path / "child.log")
    cfg = ExecConfig(
        command=tuple(command(record.path, "--env", "DATABASE_URL")),
        wait=Wait(min=0.05, max=1.0),  # reload: signal, for files
        env_template=(DSN,),
    )
    env = ExecEnv(cfg.env_template)
    child = Child(cfg, env)
    delivered: list[tuple[str, str, int | None]] = []  # (secret, version, the child's pid then)
    pipe = RenderPipeline(
        [TemplateConfig(shm / "kv", contents="{{ secrets.kv.x }}")],
        ["db", "kv"],
        on_delivered=lambda name, version, at: delivered.append((name, version, child.pid)),
        exec_env=env,
    )
    await pipe.publish(db("v1"))
    await pipe.publish(SecretValue("kv", {"x": "1"}, "k1"))
    await pipe.run_pass()  # the first pass: the variables before the child starts
    await child.start()
    children.append(child)
    pipe.targets.append(child)
    (first,) = await record.wait_for("started", 1)
    assert record.env(first) == "host=db user=u-v1 password=pw-v1"

    await pipe.publish(SecretValue("kv", {"x": "2"}, "k2"))
    await pipe.run_pass()  # a file changed, no variable: the reload signal, same process
    await record.wait_for("hup", 1)
    assert record.lines("started") == [first]

    await pipe.publish(db("v2"))
    await pipe.run_pass()  # the variable changed: stop, start with the new value
    await until(lambda: ("db", "v2") in [d[:2] for d in delivered], 30, "v2 delivered")
    started = await record.wait_for("started", 2)
    assert len(started) == 2 and record.env(started[1]) == "host=db user=u-v2 password=pw-v2"
    # reported delivered (the old lease may go) only once the new child was running
    assert delivered[-1] == ("db", "v2", started[1])
    assert record.count("hup") == 1  # a restart, not a signal
    await pipe.aclose()


async def test_a_child_waits_for_its_variables_and_a_bad_value_keeps_the_old_one(
    children: list[Child], tmp_path: Path
) -> None:
    record = Record(tmp_path / "child.log")
    cfg = ExecConfig(command=tuple(command(record.path, "--env", "DATABASE_URL")))
    env = ExecEnv((DSN,))
    pipe = RenderPipeline([], ["db"], on_delivered=lambda *_: None, exec_env=env)
    child = Child(cfg, env)
    starting = asyncio.create_task(child.start())
    children.append(child)
    await pipe.publish(db("v1", password="a\0b"))  # execve would cut it: refused
    burst = await pipe.run_pass()
    assert burst.failed == ["template exec.env_template.DATABASE_URL: the value holds a NUL byte"]
    assert not starting.done() and env.missing() == ["DATABASE_URL"]
    await pipe.publish(db("v1"))
    await pipe.run_pass()
    await asyncio.wait_for(starting, 30)
    (pid,) = await record.wait_for("started", 1)

    await pipe.publish(db("v2", password="x" * ENV_MAX_SIZE))  # past the bound with the rest
    burst = await pipe.run_pass()
    assert len(burst.failed) == 1 and "exec.env_template.DATABASE_URL" in burst.failed[0]
    assert "x" * 100 not in burst.failed[0]
    assert env.snapshot() == {"DATABASE_URL": "host=db user=u-v1 password=pw-v1"}
    assert pipe.status()[0]["holds"] == {"db": "v1"}  # the child still holds v1
    assert record.lines("started") == [pid]
    await pipe.aclose()
