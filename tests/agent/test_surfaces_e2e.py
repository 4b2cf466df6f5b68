"""The agent under attack (issue 8): real ``credsidecar run`` processes against real
OpenBao and PostgreSQL.

- finding 1: the probe port changes nothing; the admin API is owner-only (a 0600 unix
  socket, or TCP with a bearer token); the CLI talks to it;
- finding 2: grace is a promise for forced rotations too; concurrent forced rotations
  run once; POST /refresh is coalesced (Vault reads counted in OpenBao's audit log);
- finding 5: no child (exec, notify command, rotation command) sees our Vault token;
- finding 6: a state directory another user prepared is refused, nothing is revoked.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import socket
import stat
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess, agent_config, unix_request, wait_for
from devservers import (
    AUDIT,
    ROOT_TOKEN,
    OpenBaoServer,
    PostgresCluster,
    free_port,
    leases_under,
)
from otheruid import NOBODY, call_as
from rotatehelpers import can_login, kv_record, rotate_config

PROBES_ONLY = [
    ("POST", "/rotate/db-password"),
    ("POST", "/rotate/db-password?now=true"),
    ("POST", "/refresh"),
    ("POST", "/refresh?secret=db_admin"),
    ("GET", "/status"),
    ("POST", "/healthz"),
    ("POST", "/readyz"),
]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def connect_error(path: Path) -> str:
    """What a connect to the unix socket ``path`` gives: "connected" or the errno name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()
    return "connected"


def rendered(path: Path) -> dict[str, Any]:
    creds: dict[str, Any] = json.loads(path.read_text())
    AUDIT.secret(creds["password"])
    return creds


@pytest.mark.slow
def test_the_probe_port_changes_nothing_and_grace_holds_for_forced_rotations(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path, unique: str
) -> None:
    out = shm / "agent"
    config = rotate_config(openbao, postgres, shm, unique, out)
    config["rotate"]["db-password"]["grace"] = "10m"
    store = f"secret/data/rot-e2e-{unique}"
    agent = AgentProcess(out, config).start()
    try:
        agent.wait_ready()
        first = rendered(out / "db.json")

        # finding 1: nothing on the probe port acts or tells more than probes
        for method, path in PROBES_ONLY:
            code, _ = agent.http(path, method=method)
            assert code in (404, 405), (method, path, code)
        assert kv_record(openbao, store)["version"] == 1
        assert len(agent.events("rotation_started")) == 1  # the first one, at start

        # the admin socket: ours, 0600, in a 0700 state_dir; nobody else may connect
        sock = os.stat(agent.admin_socket)
        assert stat.S_ISSOCK(sock.st_mode) and sock.st_uid == os.geteuid()
        assert mode(agent.admin_socket) == 0o600 and mode(agent.state_dir) == 0o700
        if os.geteuid() == 0:
            assert call_as(NOBODY, lambda: connect_error(agent.admin_socket)) == "EACCES"
        code, status = agent.admin("/status")
        assert code == 200 and status["rotations"]["db-password"]["version"] == 1

        # finding 2: concurrent forced rotations run once ...
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: agent.admin("/rotate/db-password", "POST"), range(4)))
        rotated = {"name": "db-password", "result": "rotated", "version": 2}
        assert (200, rotated) in answers
        # ... the others joined it, or came after it and met the grace of version 1
        assert all(a == (200, rotated) or a[1]["result"] == "in_grace" for a in answers), answers
        assert len(agent.events("rotation_started")) == 2
        wait_for(lambda: rendered(out / "db.json")["version"] == "2", 20, "version 2 rendered")
        second = rendered(out / "db.json")
        assert second["username"] != first["username"]

        # ... and grace is a promise: version 1 stays valid, a new forced rotation waits
        code, refused = agent.admin("/rotate/db-password", "POST")
        record = kv_record(openbao, store)
        assert code == 409 and refused["result"] == "in_grace"
        assert refused["not_before"] == record["retire_at"] and record["retired"] is False
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record["retire_at"]))
        assert until in refused["error"]
        assert asyncio.run(can_login(postgres, first["username"], first["password"]))
        cli = agent.command("rotate", "db-password")
        assert cli.returncode == 1, cli.stderr
        assert "rotation of db-password refused" in cli.stderr and until in cli.stderr
        assert record["version"] == 2 == kv_record(openbao, store)["version"]

        # --now accepts that in-flight consumers of version 1 fail: it says so, and they do
        cli = agent.command("rotate", "db-password", "--now")
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.strip() == "credsidecar: rotated db-password to version 3"
        (overridden,) = agent.events("rotation_grace_overridden")
        assert overridden["version"] == 1 and "fail" in overridden["consequence"]
        assert not asyncio.run(can_login(postgres, first["username"], first["password"]))
        assert asyncio.run(can_login(postgres, second["username"], second["password"]))
        # an unknown name, a bad flag
        assert agent.admin("/rotate/nope", "POST")[0] == 404
        assert agent.admin("/rotate/db-password?now=maybe", "POST")[0] == 400
    finally:
        assert agent.stop() == 0
    assert not agent.admin_socket.exists()  # removed on the way out


def https_get(url: str, token: str | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_admin_over_tcp_needs_the_bearer_token(openbao: OpenBaoServer, shm: Path) -> None:
    openbao.client().secrets.kv.v2.create_or_update_secret(path="admin-tcp", secret={"k": "v1"})
    token = secrets.token_urlsafe(24)
    AUDIT.secret(token)
    token_file = shm / "admin-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_port()
    config = agent_config(openbao, shm, "unused")
    config["secrets"] = {"kv": {"kind": "kv", "path": "secret/data/admin-tcp", "refresh": "1h"}}
    config["templates"] = [{"destination": str(shm / "kv"), "contents": "{{ secrets.kv.k }}"}]
    config["admin"] = {"listen": f"127.0.0.1:{port}", "token_file": str(token_file)}
    agent = AgentProcess(shm / "tcp", config).start()
    base = f"http://127.0.0.1:{port}"
    try:
        agent.wait_ready()
        assert https_get(f"{base}/status") == 401
        assert https_get(f"{base}/status", "x" * len(token)) == 401
        assert https_get(f"{base}/refresh", "wrong", method="POST") == 401
        assert https_get(f"{base}/status", token) == 200
        assert https_get(f"{base}/refresh", token, method="POST") == 202
        status = agent.command("status")  # the CLI uses the socket (also on by default)
        assert status.returncode == 0 and json.loads(status.stdout)["ready"] is True
    finally:
        assert agent.stop() == 0

    # a token others may read is refused at start; a TCP listener without one at check
    token_file.chmod(0o644)
    refused = AgentProcess(shm / "tcp-644", config).start()
    assert refused.proc is not None and refused.proc.wait(60) == 1
    assert "lets other users read or change it" in refused.log_path.read_text()
    config["admin"] = {"listen": f"0.0.0.0:{port}"}
    check = AgentProcess(shm / "tcp-open", config, health=False).command("check")
    assert check.returncode == 2
    assert "admin.token_file: is required with admin.listen" in check.stderr
    assert "0.0.0.0 is not a loopback address" in check.stderr


@pytest.fixture(scope="module")
def audited_openbao() -> Iterator[OpenBaoServer]:
    """An OpenBao of this module's own whose audit log counts every request."""
    server = OpenBaoServer(audited=True).start()
    yield server
    server.remove()


def test_refresh_is_coalesced_to_one_read_per_second(
    audited_openbao: OpenBaoServer, shm: Path, unique: str
) -> None:
    path = f"coalesce-{unique}"
    audited_openbao.client().secrets.kv.v2.create_or_update_secret(path=path, secret={"k": "v1"})
    config = agent_config(audited_openbao, shm, "unused")
    config["secrets"] = {"kv": {"kind": "kv", "path": f"secret/data/{path}", "refresh": "1h"}}
    config["templates"] = [{"destination": str(shm / "kv"), "contents": "{{ secrets.kv.k }}"}]
    agent = AgentProcess(shm / "coalesce", config).start()
    try:
        agent.wait_ready()
        assert audited_openbao.requests(f"secret/data/{path}") == 1  # the first read

        def refresh(_: int) -> int:
            return unix_request(agent.admin_socket, "POST", "/refresh?secret=kv")[0]

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(refresh, range(200)))
        elapsed = time.monotonic() - started
        assert codes == [202] * 200
        # a change and one more request: its read sees v2 once every wake of the burst
        # (at most a second after its last request) has happened; then count
        audited_openbao.client().secrets.kv.v2.create_or_update_secret(
            path=path, secret={"k": "v2"}
        )
        assert refresh(0) == 202
        wait_for(lambda: (shm / "kv").read_text() == "v2", 20, "a refresh after the change")
        reads = audited_openbao.requests(f"secret/data/{path}") - 1
        # one at once, one per second while they came and one after, one for the change
        assert 1 <= reads <= elapsed + 3, (reads, elapsed)

        cli = agent.command("refresh", "kv")
        assert cli.returncode == 0 and cli.stdout.strip() == "credsidecar: refreshing kv"
        unknown = agent.command("refresh", "nope")
        assert unknown.returncode == 2 and "no secret named 'nope'" in unknown.stderr
    finally:
        assert agent.stop() == 0
    gone = agent.command("refresh")
    assert gone.returncode == 1
    assert "no credsidecar is running with this config" in gone.stderr
    assert str(agent.admin_socket) in gone.stderr


def test_no_child_sees_our_vault_token(
    openbao: OpenBaoServer, database_mount: Any, shm: Path, unique: str
) -> None:
    mount = database_mount(ttl="1m", max_ttl="5m")
    dump = (
        "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))\n"
        "if len(sys.argv) > 2: print(json.dumps({'api_key': 'k-' + sys.argv[2]}))\n"
        "if len(sys.argv) > 3: import time; time.sleep(300)\n"
    )

    def command(name: str, *extra: str) -> list[str]:
        return [sys.executable, "-c", dump, str(shm / f"{name}.env"), *extra]

    config = agent_config(openbao, shm, f"{mount}/creds/app")
    config["vault"]["auth"] = {"method": "token"}  # from VAULT_TOKEN, as operators do
    config["sensitive_env"] = ["APP_DB_ADMIN_*"]
    config["exec"] = {"command": command("exec", "x", "wait"), "env": {"APP_MODE": "demo"}}
    config["notify"] = {"cmd": {"command": command("notify"), "wait": "0s"}}
    config["rotate"] = {
        "api": {
            "kind": "command",
            "store": {"vault_kv": f"secret/data/rot-env-{unique}"},
            "create": command("rotate", unique),
            "env": {"pass": ["PATH", "VAULT_ADDR"], "set": {"PROVIDER": "test"}},
        }
    }
    env = {
        "VAULT_TOKEN": ROOT_TOKEN,
        "VAULT_ADDR": openbao.address,
        "BAO_SECRET_ID": "agent-secret-id-value",
        "APP_DB_ADMIN_PASSWORD": "marked-sensitive-value",
    }
    agent = AgentProcess(shm / "env", config, env=env).start()
    try:
        agent.wait_ready()
        for name in ("exec", "notify", "rotate"):
            wait_for((shm / f"{name}.env").exists, 30, f"the {name} command's environment")
    finally:
        agent.stop()
    seen = {n: json.loads((shm / f"{n}.env").read_text()) for n in ("exec", "notify", "rotate")}
    for name, child in seen.items():
        assert not {"VAULT_TOKEN", "BAO_SECRET_ID", "APP_DB_ADMIN_PASSWORD"} & set(child), name
        assert ROOT_TOKEN not in json.dumps(child), name
    assert seen["exec"]["APP_MODE"] == "demo" and seen["exec"]["VAULT_ADDR"] == openbao.address
    assert seen["notify"]["PATH"] == os.environ["PATH"]
    rotate = {k: v for k, v in seen["rotate"].items() if k != "LC_CTYPE"}  # Python's own
    assert rotate == {"PATH": os.environ["PATH"], "VAULT_ADDR": openbao.address, "PROVIDER": "test"}


def test_a_state_dir_prepared_by_another_user_is_refused_and_nothing_is_revoked(
    openbao: OpenBaoServer, database_mount: Any, shm: Path, unique: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to prepare a directory as another user")
    mount = database_mount(ttl="1m", max_ttl="5m")
    victim = openbao.client().read(f"{mount}/creds/app")["lease_id"]  # another app's lease
    # the attack: nobody prepares a world-writable state_dir holding a planted ledger
    state = Path(f"/dev/shm/credsidecar-planted-{unique}")
    state.mkdir()
    try:
        state.chmod(0o777)
        os.chown(state, NOBODY, NOBODY)
        planted = state / "retired-leases.json"
        planted.write_text(json.dumps({victim: 0}))
        os.chown(planted, NOBODY, NOBODY)
        config = agent_config(openbao, shm, f"{mount}/creds/app", state_dir=str(state))
        agent = AgentProcess(shm / "planted", config).start()
        assert agent.proc is not None
        try:
            code = agent.proc.wait(60)
        finally:
            if agent.proc.poll() is None:  # it must not run; if it does, before it does harm
                agent.kill()
        assert code == 1
        log = agent.log_path.read_text()
        assert f"state_dir {state} belongs to uid {NOBODY}, not to the agent" in log
        assert victim in leases_under(openbao, f"{mount}/creds/app/")  # nothing revoked
        assert not (shm / "db.json").exists()
    finally:
        for entry in state.iterdir():
            entry.unlink()
        state.rmdir()
