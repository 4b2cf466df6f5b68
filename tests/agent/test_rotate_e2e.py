"""Rotation end to end: real ``credsidecar`` processes sharing one rotated credential."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentproc import AgentProcess
from devservers import AUDIT, OpenBaoServer, PostgresCluster
from rotatehelpers import can_login, rotate_config
from waiting import wait_for


def rendered(path: Path) -> dict[str, Any]:
    creds: dict[str, Any] = json.loads(path.read_text())
    AUDIT.secret(creds["password"])
    return creds


def count(agents: list[AgentProcess], name: str) -> int:
    return sum(len(a.events(name)) for a in agents)


@pytest.mark.slow
def test_replicas_rotate_once_and_agree(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path, unique: str
) -> None:
    agents = []
    for i in range(3):
        out = shm / f"replica{i}"
        config = rotate_config(openbao, postgres, shm, unique, out)
        agents.append(AgentProcess(out, config))
    for agent in agents:  # all at once: they race for the first rotation
        agent.start()
    try:
        for agent in agents:
            agent.wait_ready()
        files = [a.workdir / "db.json" for a in agents]
        first = [rendered(f) for f in files]
        assert all(c == first[0] for c in first), "replicas render different credentials"
        assert first[0]["version"] == "1" and first[0]["username"] == f"e2e{unique}_a"
        assert asyncio.run(can_login(postgres, first[0]["username"], first[0]["password"]))
        assert count(agents, "rotation_started") == 1
        assert count(agents, "rotation_published") == 1
        assert count(agents, "adopted") == 2

        # POST /rotate/<name> on one replica's admin socket: the others adopt the result
        status, answer = agents[1].admin("/rotate/db-password", method="POST")
        assert status == 200, answer
        assert answer == {"name": "db-password", "result": "rotated", "version": 2}
        for f in files:
            wait_for(lambda f=f: rendered(f)["version"] == "2", 20, f"{f} at version 2")
        second = [rendered(f) for f in files]
        assert all(c == second[0] for c in second)
        assert second[0]["username"] == f"e2e{unique}_b"
        assert asyncio.run(can_login(postgres, second[0]["username"], second[0]["password"]))

        # after grace exactly one replica retires the previous user
        wait_for(lambda: count(agents, "rotation_retired") >= 1, 30, "the retire")
        user_a = first[0]["username"]
        assert postgres.psql(f"SELECT rolcanlogin FROM pg_roles WHERE rolname = '{user_a}'") == (
            "f\n"
        )

        # `credsidecar rotate NAME` talks to the running agent: the other replicas adopt it
        done = agents[0].command("rotate", "db-password")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "credsidecar: rotated db-password to version 3"
        for f in files:
            wait_for(lambda f=f: rendered(f)["version"] == "3", 20, f"{f} at version 3")
        assert rendered(files[2])["username"] == f"e2e{unique}_a"

        assert agents[1].admin("/rotate/nope", method="POST")[0] == 404
        missing = agents[0].command("rotate", "nope")
        assert missing.returncode == 2 and "nope" in missing.stderr

        status, body = agents[1].http("/metrics")
        text = body.decode()
        mine = len(agents[1].events("rotation_published"))  # it may also have won the first
        assert mine >= 1
        ok = f'credsidecar_rotations_total{{name="db-password",result="ok"}} {mine:.1f}'
        assert ok in text, [line for line in text.splitlines() if "rotat" in line]
        assert 'credsidecar_rotation_age_seconds{name="db-password"}' in text
        assert agents[2].admin("/status")[1]["rotations"]["db-password"]["version"] == 3
    finally:
        for agent in agents:
            assert agent.stop() == 0
    assert count(agents, "rotation_retired") <= 2  # versions 1 and 2, once each
    for agent in agents:
        assert "rotation_failed" not in {e["event"] for e in agent.events()}


def test_check_reports_rotate_problems(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path, unique: str
) -> None:
    config = rotate_config(openbao, postgres, shm, unique, shm / "check")
    entry = config["rotate"]["db-password"]
    entry["every"] = "soon"
    entry["admin"]["secret"] = "missing"
    entry["store"] = {"vault_kv": "secret/app"}
    path = shm / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    agent = AgentProcess(shm / "check", config, health=False)
    result = agent.command("check")
    assert result.returncode == 2
    assert 'rotate.db-password.every: "soon" is not a duration' in result.stderr
    assert 'rotate.db-password.admin.secret: "missing" is not a secret in secrets' in result.stderr
    assert "rotate.db-password.store.vault_kv" in result.stderr


def test_cli_rotate_without_an_agent_says_so_and_fails_in_one_clear_line(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path, unique: str
) -> None:
    from devservers import free_port

    config = rotate_config(openbao, postgres, shm, unique, shm / "fail")
    config["rotate"]["db-password"]["admin"]["port"] = free_port()  # nothing listens there
    agent = AgentProcess(shm / "fail", config, health=False)
    result = agent.command("rotate", "db-password")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    said = [line for line in lines if line.startswith("credsidecar: ")]
    assert len(said) == 2, result.stderr
    assert said[0].startswith("credsidecar: no credsidecar is running with this config")
    assert "rotating db-password in this process" in said[0]
    assert said[1].startswith("credsidecar: rotation of db-password failed: admin login")
    assert postgres.password not in result.stderr + result.stdout
