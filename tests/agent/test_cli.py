"""The command line as an operator uses it: version, check, run --once."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from agentproc import REPO, AgentProcess, agent_config, login_with
from devservers import AUDIT, OpenBaoServer, PostgresCluster, configure_database_engine


@pytest.fixture(scope="module")
def db_role(openbao: OpenBaoServer, postgres: PostgresCluster) -> str:
    configure_database_engine(openbao, postgres, role="cli", mount="db-cli", ttl="1m", max_ttl="5m")
    return "db-cli/creds/cli"


def test_version() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "agent", "version"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0
    assert out.stdout.startswith("credsidecar 0.")


def test_check_accepts_a_valid_config(openbao: OpenBaoServer, shm: Path) -> None:
    agent = AgentProcess(shm, agent_config(openbao, shm, "db-cli/creds/cli"), health=False)
    out = agent.command("check")
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_check_prints_every_problem_with_its_key_path(openbao: OpenBaoServer, shm: Path) -> None:
    config = agent_config(openbao, shm, "db-cli/creds/cli")
    config["templates"].append({"destination": str(shm / "b"), "contents": "x", "perms": "0999"})
    config["secrets"]["api"] = {"kind": "kv", "path": "secret/data/x", "refresh": "often"}
    agent = AgentProcess(shm, config, health=False)
    out = agent.command("check")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert any(line.endswith('templates[1].perms: "0999" is not an octal mode') for line in lines)
    assert any('secrets.api.refresh: "often" is not a duration' in line for line in lines)
    assert len(lines) == 2, lines


def test_check_catches_template_syntax_errors(openbao: OpenBaoServer, shm: Path) -> None:
    config = agent_config(openbao, shm, "db-cli/creds/cli")
    config["templates"][0]["contents"] = "{{ secrets.db.username "
    out = AgentProcess(shm, config, health=False).command("check")
    assert out.returncode == 2
    assert "templates[0]" in out.stderr
    config = agent_config(openbao, shm, "db-cli/creds/cli")
    config["exec"] = {"command": ["app"], "env_template": {"DSN": "{{ secrets.db | libpq_dsn "}}
    out = AgentProcess(shm, config, health=False).command("check")
    assert out.returncode == 2
    assert "template exec.env_template.DSN line 1: syntax error" in out.stderr


async def test_once_renders_working_credentials(
    openbao: OpenBaoServer, postgres: PostgresCluster, db_role: str, shm: Path
) -> None:
    agent = AgentProcess(shm, agent_config(openbao, shm, db_role), health=False)
    out = agent.command("run", "--once")
    assert out.returncode == 0, out.stderr
    rendered = shm / "db.json"
    assert stat.S_IMODE(rendered.stat().st_mode) == 0o600
    user = await login_with(rendered, postgres)
    assert user == json.loads(rendered.read_text())["username"]


def test_once_fails_with_one_clear_line_when_vault_is_unreachable(
    openbao: OpenBaoServer, shm: Path
) -> None:
    from devservers import free_port

    config = agent_config(openbao, shm, "db-cli/creds/cli")
    config["vault"]["address"] = f"http://127.0.0.1:{free_port()}"
    out = AgentProcess(shm, config, health=False).command("run", "--once")
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.startswith("credsidecar:")]
    assert len(lines) == 1, out.stderr
    assert "127.0.0.1" in lines[0]
    assert not (shm / "db.json").exists()


def test_once_refuses_a_disk_destination(openbao: OpenBaoServer, shm: Path, tmp_path: Path) -> None:
    config = agent_config(openbao, shm, "db-cli/creds/cli")
    config["templates"][0]["destination"] = str(tmp_path / "db.json")
    out = AgentProcess(shm, config, health=False).command("run", "--once")
    assert out.returncode == 1
    assert "allow_disk" in out.stderr
    assert not (tmp_path / "db.json").exists()
    config["templates"][0]["allow_disk"] = True
    out = AgentProcess(shm, config, health=False).command("run", "--once")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "db.json").exists()


def test_failing_template_keeps_the_previous_file(
    openbao: OpenBaoServer, db_role: str, shm: Path
) -> None:
    config = agent_config(openbao, shm, db_role)
    assert AgentProcess(shm, config, health=False).command("run", "--once").returncode == 0
    rendered = shm / "db.json"
    before = rendered.read_bytes()
    AUDIT.secret(json.loads(before)["password"])
    config["templates"][0]["contents"] = "{{ secrets.db.no_such_field }}"
    out = AgentProcess(shm, config, health=False).command("run", "--once")
    assert out.returncode == 1
    assert "no_such_field" in out.stderr
    assert rendered.read_bytes() == before


def test_unwritable_destination_is_a_clear_error(
    openbao: OpenBaoServer, db_role: str, shm: Path
) -> None:
    config = agent_config(openbao, shm, db_role)
    config["templates"][0]["destination"] = str(shm / "missing-dir" / "db.json")
    out = AgentProcess(shm, config, health=False).command("run", "--once")
    assert out.returncode == 1
    assert "missing-dir" in out.stderr and "does not exist" in out.stderr
