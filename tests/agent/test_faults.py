"""The agent under faults (issue 8), as an operator runs it, against real OpenBao and
PostgreSQL: one part's failure never stops the rest, a credential is revoked only once
its successor reached the application, and the process says why it ended.

Faults are real where they can be: a tmpfs filled to ENOSPC, a FIFO at a destination.
The one fake is the HTTP relay that rewrites a single field of OpenBao's answers.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess, agent_config
from devservers import (
    AUDIT,
    OpenBaoServer,
    PostgresCluster,
    configure_database_engine,
    leases_under,
)
from vaultrelay import Rewrite, RewritingRelay
from waiting import wait_for


@pytest.fixture
def db_path(openbao: OpenBaoServer, postgres: PostgresCluster) -> Iterator[Any]:
    """``db_path(ttl=..., max_ttl=...)`` -> ``<mount>/creds/app`` on a mount of this test's own."""
    mount = f"db-faults-{uuid.uuid4().hex[:8]}"

    def make(ttl: str, max_ttl: str) -> str:
        configure_database_engine(
            openbao, postgres, role="app", mount=mount, ttl=ttl, max_ttl=max_ttl
        )
        return f"{mount}/creds/app"

    yield make
    openbao.client().sys.disable_secrets_engine(mount)


def metric(agent: AgentProcess, name: str, **labels: str) -> float | None:
    """One sample of the agent's /metrics, or None when it is not there."""
    wanted = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    )
    for line in agent.http("/metrics")[1].decode().splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return None


def lease_lookup(openbao: OpenBaoServer, lease_id: str) -> dict[str, Any] | None:
    try:
        return dict(openbao.client().sys.read_lease(lease_id)["data"])
    except Exception:  # hvac's InvalidRequest: the lease is gone
        return None


# --------------------------------------------------------------------------- finding 4


def test_a_malformed_vault_answer_is_a_vault_error_and_the_agent_keeps_serving(
    openbao: OpenBaoServer, db_path: Any, shm: Path
) -> None:
    path = db_path(ttl="30s", max_ttl="10m")
    relay = RewritingRelay(openbao.address)
    config = agent_config(openbao, shm, path)
    config["vault"]["address"] = relay.address
    config["vault"]["retry"] = {"initial": "200ms", "max": "1s"}
    config["secrets"]["db"]["renew_fraction"] = 0.1  # a renewal every few seconds
    relay.rewrite = Rewrite("/creds/", "lease_duration", "3 seconds")
    agent = AgentProcess(shm, config).start()
    try:
        # at startup: a clear error naming the request and the field, retried
        (retry,) = agent.wait_event("startup_retry")[:1]
        assert retry["error"] == (
            f"issue {path}: malformed answer: lease_duration should be a number, got a string"
        )
        assert agent.http("/healthz")[0] == 200  # the probes answer meanwhile
        relay.rewrite = None
        agent.wait_ready()
        (issued,) = agent.events("issued")
        # the leases of the answers it could not read were revoked, not left to expire
        assert leases_under(openbao, path + "/") == [issued["version"]]

        # on renewal: the same, and the lease is kept
        relay.rewrite = Rewrite("sys/leases/renew", "lease_duration", "3 seconds")
        failed = agent.wait_event("renew_failed")[0]
        assert failed["error"] == (
            "renew_lease sys/leases/renew: malformed answer: lease_duration should be a "
            "number, got a string"
        )
        assert agent.http("/healthz")[0] == 200
        renewals = len(agent.events("renewed"))
        relay.rewrite = None
        agent.wait_event("renewed", count=renewals + 1)
        assert agent.events("issued") == [issued]  # no new credential for a bad answer
        assert not agent.events("task_failed")  # handled where it happened
        assert relay.rewritten >= 2
    finally:
        relay.close()
        assert agent.stop() == 0
    assert not [e for e in agent.events() if "ValueError" in json.dumps(e)]


def test_enospc_on_the_state_dir_keeps_the_agent_running_with_a_stale_ledger(
    openbao: OpenBaoServer, db_path: Any, shm: Path, tiny_volume: Any
) -> None:
    path = db_path(ttl="30s", max_ttl="10m")
    config = agent_config(openbao, shm, path, state_dir=str(tiny_volume.path / "state"))
    config["secrets"]["db"]["renew_fraction"] = 0.1
    agent = AgentProcess(shm / "agent", config).start()
    try:
        agent.wait_ready()
        tiny_volume.fill()
        renewals = len(agent.events("renewed"))
        (warning,) = agent.wait_event("ledger_write_failed")
        assert warning["entry"] == "db" and warning["error"] == "No space left on device"
        agent.wait_event("renewed", count=renewals + 2)  # renewals go on, in memory
        assert agent.http("/healthz")[0] == 200 and agent.http("/readyz")[0] == 200
        assert metric(agent, "credsidecar_ledger_stale", entry="db") == 1.0
        assert (metric(agent, "credsidecar_ledger_write_failures_total", entry="db") or 0) >= 2
        assert len(agent.events("ledger_write_failed")) == 1  # one warning, not one per write

        tiny_volume.free()
        agent.wait_event("ledger_written")
        assert metric(agent, "credsidecar_ledger_stale", entry="db") == 0.0
    finally:
        assert agent.stop() == 0
    entry = json.loads((tiny_volume.path / "state" / "db.json").read_text())
    assert entry["lease_id"] == agent.events("issued")[0]["version"]


def test_a_startup_failure_exits_non_zero_and_the_last_line_says_why(
    openbao: OpenBaoServer, db_path: Any, shm: Path
) -> None:
    config = agent_config(openbao, shm, db_path(ttl="1m", max_ttl="5m"))
    config["exec"] = {"command": [str(shm / "no-such-program")]}
    agent = AgentProcess(shm, config, health=False).start()
    assert agent.proc is not None
    code = agent.proc.wait(60)
    last = json.loads(agent.log_path.read_text().splitlines()[-1])
    assert code == 1
    assert last["event"] == "stopped" and last["code"] == 1
    assert "cannot start" in last["error"] and "no-such-program" in last["error"]


# --------------------------------------------------------------------------- finding 3


def test_a_failed_render_keeps_the_old_lease_until_the_new_one_is_delivered(
    openbao: OpenBaoServer, db_path: Any, shm: Path, tiny_volume: Any
) -> None:
    # TTL 10 s, max 14 s, renewals at ~2 s: replaced at ~6 s, the old lease lives to 14 s
    path = db_path(ttl="10s", max_ttl="14s")
    config = agent_config(openbao, shm, path)
    destination = tiny_volume.path / "db.json"
    config["templates"][0]["destination"] = str(destination)
    config["secrets"]["db"].update(renew_fraction=0.2, revoke_grace="1s")
    config["vault"]["retry"] = {"initial": "200ms", "max": "1s"}
    agent = AgentProcess(shm, config).start()
    try:
        agent.wait_ready()
        old = json.loads(destination.read_text())
        AUDIT.secret(old["password"])
        (issued,) = agent.events("issued")
        old_lease = issued["version"]
        tiny_volume.fill()
        agent.wait_event("replaced", timeout=40)
        grace_over = time.time() + 1.0 + 1.0  # revoke_grace, and a second more

        def failing_past_the_grace() -> bool:
            return time.time() > grace_over and len(agent.events("render_failed")) >= 2

        wait_for(failing_past_the_grace, 30, "renders failing past the grace")
        failure = agent.events("render_failed")[-1]
        assert "No space left on device" in failure["error"]
        assert str(destination) in failure["template"]
        # the file still holds the old credential, and it still works
        assert json.loads(destination.read_text()) == old
        assert not agent.events("revoked")
        assert lease_lookup(openbao, old_lease) is not None, "the old lease was revoked"

        # readiness is per destination: it turns as the credential it holds nears expiry
        def not_ready() -> list[str] | None:
            code, body = agent.http("/readyz")
            return None if code == 200 else json.loads(body)["reasons"]

        reasons = wait_for(not_ready, 30, "/readyz to turn on the expiring credential")
        assert any(f"template {destination}" in r and "expires in" in r for r in reasons)

        tiny_volume.free()  # the next retry renders the new credential
        agent.wait_ready(timeout=30)
        new = json.loads(destination.read_text())
        AUDIT.secret(new["password"])
        assert new["username"] != old["username"]
        # the old one (and any replaced meanwhile) is revoked once the new one is out
        revoked = wait_for(
            lambda: [e for e in agent.events("revoked") if e["version"] == old_lease],
            30,
            "the old lease revoked",
        )[0]
        written = [e for e in agent.events() if e["event"] in ("rendered", "revoked")]
        assert written.index(revoked) > 1, "revoked before the new file was written"
    finally:
        assert agent.stop() == 0
    assert lease_lookup(openbao, old_lease) is None


# --------------------------------------------------------------------------- finding 9


@pytest.mark.timeout(120)
def test_a_fifo_at_a_destination_is_refused_and_blocks_nothing(
    openbao: OpenBaoServer, shm: Path
) -> None:
    client = openbao.client()
    name = f"fifo-{uuid.uuid4().hex[:8]}"
    client.secrets.kv.v2.create_or_update_secret(path=name, secret={"v": "one"})
    config = agent_config(openbao, shm, "unused")
    config["secrets"] = {"kv": {"kind": "kv", "path": f"secret/data/{name}", "refresh": "500ms"}}
    config["templates"] = [
        {"destination": str(shm / "a"), "contents": "{{ secrets.kv.v }}"},
        {"destination": str(shm / "b"), "contents": "{{ secrets.kv.v }}"},
    ]
    agent = AgentProcess(shm / "agent", config).start()
    try:
        agent.wait_ready()
        (shm / "a").unlink()
        os.mkfifo(shm / "a")  # someone (or something) put a FIFO where the file was
        client.secrets.kv.v2.create_or_update_secret(path=name, secret={"v": "two"})
        (failed,) = agent.wait_event("render_failed")[:1]
        assert failed["template"] == str(shm / "a")
        assert "FIFO" in failed["error"] and "not a regular file" in failed["error"]
        # the other destination is not held up by it
        wait_for(lambda: (shm / "b").read_text() == "two", 20, "the other file updated")
        assert agent.http("/healthz")[0] == 200
    finally:
        assert agent.stop(timeout=30) == 0  # shutdown does not hang on the FIFO
    assert (shm / "a").is_fifo()

    # present at startup: refused before anything runs, with the reason as last line
    agent = AgentProcess(shm / "agent", config).start()
    assert agent.proc is not None and agent.proc.wait(60) == 1
    last = json.loads(agent.log_path.read_text().splitlines()[-1])
    assert last["event"] == "stopped" and last["code"] == 1 and "FIFO" in last["error"]
