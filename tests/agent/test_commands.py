"""Commands are contained (issue 8, finding 7) and get no credentials of ours (finding 5):
own process group killed whole on timeout and cancellation, stdout bounded and read in
chunks, the environment computed by agent.childenv."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from procgroups import forking_command, none_left, see_grandchild

from agent import commands
from agent.childenv import EnvPolicy, child_environment
from agent.config import NotifyConfig
from agent.notify import Notifier


async def test_a_timeout_kills_the_whole_process_group() -> None:
    marker = f"grandchild-{uuid.uuid4().hex}"
    command = commands.Command(forking_command(marker), timeout=3.0)
    task = asyncio.create_task(commands.run(command))
    await see_grandchild(marker, task)
    with pytest.raises(commands.CommandError, match=r"timed out after 3s .*process group"):
        await task
    assert await none_left(marker)  # nothing of the group is left


async def test_a_notify_command_that_times_out_leaves_nothing_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    marker = f"notify-grandchild-{uuid.uuid4().hex}"
    notifier = Notifier(NotifyConfig(name="forker", command=forking_command(marker), timeout=3.0))
    task = asyncio.create_task(notifier.deliver())
    await see_grandchild(marker, task)
    assert await task is False
    assert await none_left(marker)
    (failed,) = [r for r in caplog.records if r.getMessage() == "notify_failed"]
    assert "timed out after 3s" in failed.reason  # type: ignore[attr-defined]


async def test_cancelling_a_command_kills_its_group() -> None:
    marker = f"cancelled-{uuid.uuid4().hex}"
    task = asyncio.create_task(commands.run(commands.Command(forking_command(marker), 60.0)))
    await see_grandchild(marker, task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await none_left(marker)


async def test_output_beyond_the_cap_is_an_error_and_never_read_whole(tmp_path: Path) -> None:
    progress = tmp_path / "written"
    # 8 MiB in 64 KiB writes, one byte in the progress file per write the pipe accepted
    writer = (
        "import os, sys; chunk = b'x' * 65536\n"
        "done = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n"
        "for _ in range(128):\n"
        "    os.write(1, chunk); os.write(done, b'.')\n"
    )
    command = commands.Command((sys.executable, "-c", writer, str(progress)), 60.0)
    with pytest.raises(commands.CommandError) as info:
        await commands.run(command, capture=True)
    message = str(info.value)
    assert "stdout exceeds 1048576 bytes" in message and sys.executable in message
    # it blocked on the full pipe once we stopped reading, and was killed there
    assert len(progress.read_bytes()) * 65536 < 4 * 1024 * 1024


async def test_the_cap_is_configurable_and_output_below_it_is_returned() -> None:
    echo = (sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read() * 2)")
    out = await commands.run(commands.Command(echo, 30.0, max_output=10), b"abcde", capture=True)
    assert out == b"abcdeabcde"
    with pytest.raises(commands.CommandError, match="exceeds 9 bytes"):
        await commands.run(commands.Command(echo, 30.0, max_output=9), b"abcde", capture=True)


async def test_a_command_gets_the_filtered_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "agent-token-not-for-children")
    monkeypatch.setenv("BAO_SECRET_ID", "agent-secret-id")
    monkeypatch.setenv("APP_FLAG", "kept")
    dump = tmp_path / "env.json"
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    argv = (sys.executable, "-c", script, str(dump))
    await commands.run(commands.Command(argv, 30.0))
    env = json.loads(dump.read_text())
    assert "VAULT_TOKEN" not in env and "BAO_SECRET_ID" not in env
    assert env["APP_FLAG"] == "kept" and env["PATH"] == os.environ["PATH"]
    policy = EnvPolicy(passed=("PATH",), set={"MODE": "x"})
    await commands.run(commands.Command(argv, 30.0, policy))
    env = json.loads(dump.read_text())
    env.pop("LC_CTYPE", None)  # Python's own locale coercion (PEP 538) in the child
    assert env == {"PATH": os.environ["PATH"], "MODE": "x"}


# --------------------------------------------------------------------------- childenv


PARENT = {
    "PATH": "/bin",
    "HOME": "/home/app",
    "VAULT_ADDR": "http://vault:8200",
    "VAULT_TOKEN": "s.agent",
    "BAO_TOKEN": "s.agent",
    "vault_token": "s.lowercase",
    "VAULT_AGENT_TOKEN": "s.x",
    "APPROLE_SECRET_ID": "sid",
    "VAULT_ROLE_ID": "rid",
    "DB_ADMIN_PASSWORD": "pw",
    "LC_ALL": "C",
}


def test_by_default_everything_but_our_credentials_passes() -> None:
    kept = {"PATH", "HOME", "VAULT_ADDR", "DB_ADMIN_PASSWORD", "LC_ALL"}
    assert child_environment(EnvPolicy(), PARENT) == {k: PARENT[k] for k in kept}


def test_sensitive_env_adds_names_and_globs() -> None:
    policy = EnvPolicy(sensitive=(*EnvPolicy().sensitive, "DB_ADMIN_*"))
    assert "DB_ADMIN_PASSWORD" not in child_environment(policy, PARENT)


def test_pass_is_an_allowlist_and_a_sensitive_name_passes_only_when_named() -> None:
    globbed = EnvPolicy(passed=("PATH", "VAULT_*", "LC_*"))
    assert child_environment(globbed, PARENT) == {
        "PATH": "/bin",
        "VAULT_ADDR": "http://vault:8200",
        "LC_ALL": "C",
    }
    named = EnvPolicy(passed=("VAULT_TOKEN",), set={"APP_MODE": "demo"})
    assert child_environment(named, PARENT) == {"VAULT_TOKEN": "s.agent", "APP_MODE": "demo"}
