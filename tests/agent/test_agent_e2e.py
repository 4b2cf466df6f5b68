"""The agent end to end: a real ``credsidecar run`` against real OpenBao and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import AgentProcess, agent_config
from devservers import (
    AUDIT,
    FaultRelay,
    OpenBaoServer,
    PostgresCluster,
    configure_database_engine,
    leases_under,
)
from waiting import wait_for

# A stand-in application: writes its pid file, counts the SIGHUPs it receives.
SIGHUP_COUNTER = textwrap.dedent(
    """
    import os, signal, sys, time
    pid_file, count_file = sys.argv[1], sys.argv[2]
    def on_hup(signum, frame):
        with open(count_file, "a") as f:
            f.write("hup\\n")
    signal.signal(signal.SIGHUP, on_hup)
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    while True:
        time.sleep(1)
    """
)


@pytest.fixture
def counter_app(shm: Path) -> Iterator[tuple[Path, Path]]:
    import subprocess

    pid_file, count_file = shm / "app.pid", shm / "hups"
    proc = subprocess.Popen([sys.executable, "-c", SIGHUP_COUNTER, str(pid_file), str(count_file)])
    wait_for(pid_file.exists, 10, "the app's pid file")
    yield pid_file, count_file
    proc.kill()
    proc.wait()


def hups(count_file: Path) -> int:
    return len(count_file.read_text().splitlines()) if count_file.exists() else 0


class LoginChecker(threading.Thread):
    """Logs in to PostgreSQL with the rendered file every 250 ms, counting failures."""

    def __init__(self, path: Path, postgres: PostgresCluster) -> None:
        super().__init__(daemon=True)
        self.path, self.postgres = path, postgres
        self.ok = 0
        self.failures: list[str] = []
        self.users: set[str] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                creds = json.loads(self.path.read_text())
                AUDIT.secret(creds["password"])
                asyncio.run(self._login(creds["username"], creds["password"]))
                self.ok += 1
                self.users.add(creds["username"])
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self._halt.wait(0.25)

    async def _login(self, user: str, password: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=self.postgres.port,
            user=user,
            password=password,
            database="postgres",
            timeout=5,
        )
        await conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join()


@pytest.mark.slow
def test_dynamic_credentials_rotate_with_zero_login_failures(
    openbao: OpenBaoServer,
    postgres: PostgresCluster,
    shm: Path,
    counter_app: tuple[Path, Path],
) -> None:
    configure_database_engine(
        openbao, postgres, role="rot", mount="db-rot", ttl="6s", max_ttl="20s"
    )
    pid_file, count_file = counter_app
    config = agent_config(
        openbao,
        shm,
        "db-rot/creds/rot",
        notify={
            "app": {
                "signal": "SIGHUP",
                "pid_file": str(pid_file),
                "wait": {"min": "200ms", "max": "2s"},
            }
        },
    )
    config["secrets"]["db"]["revoke_grace"] = "2s"
    agent = AgentProcess(shm, config).start()
    try:
        agent.wait_ready()
        checker = LoginChecker(shm / "db.json", postgres)
        checker.start()
        agent.wait_event("replaced", timeout=40)
        agent.wait_event("revoked", timeout=20)
        time.sleep(2)
        checker.stop()
    finally:
        assert agent.stop() == 0
    assert checker.failures == []
    assert checker.ok > 20
    assert len(checker.users) >= 2, "the credential was never replaced"
    renewed = agent.events("renewed")
    replaced = agent.events("replaced")
    assert renewed, "no renewal happened before the max TTL"
    # one SIGHUP for the first render and one per replacement; none for plain renewals
    wait_for(lambda: hups(count_file) == 1 + len(replaced), 10, "one SIGHUP per change")
    old = replaced[0]["old_version"]
    assert old not in leases_under(openbao, "db-rot/creds/rot/")


@pytest.mark.slow
def test_restarts_adopt_the_recorded_lease(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path
) -> None:
    configure_database_engine(
        openbao, postgres, role="adopt", mount="db-adopt", ttl="1m", max_ttl="10m"
    )
    config = agent_config(openbao, shm, "db-adopt/creds/adopt")
    users = set()
    for attempt in range(6):  # the first start and 5 restarts
        agent = AgentProcess(shm, config).start()
        agent.wait_ready()
        users.add(json.loads((shm / "db.json").read_text())["username"])
        if attempt % 2:
            agent.kill()
        else:
            assert agent.stop() == 0
    assert len(leases_under(openbao, "db-adopt/creds/adopt/")) == 1
    assert len(users) == 1
    assert len(agent.events("adopted")) == 1  # per process log: the last run adopted


@pytest.mark.slow
async def test_kv_changes_reach_the_file(openbao: OpenBaoServer, shm: Path) -> None:
    client = openbao.client()
    client.secrets.kv.v2.create_or_update_secret(path="e2e", secret={"api_key": "key-version-1"})
    config = agent_config(openbao, shm, "unused")
    config["secrets"] = {
        "fast": {"kind": "kv", "path": "secret/data/e2e", "refresh": "1s"},
        "slow": {"kind": "kv", "path": "secret/data/e2e", "refresh": "1h"},
    }
    config["templates"] = [
        {"destination": str(shm / "fast"), "contents": "{{ secrets.fast.api_key }}"},
        {"destination": str(shm / "slow"), "contents": "{{ secrets.slow.api_key }}"},
    ]
    agent = AgentProcess(shm, config).start()
    try:
        agent.wait_ready()
        assert (shm / "fast").read_text() == "key-version-1"
        client.secrets.kv.v2.create_or_update_secret(
            path="e2e", secret={"api_key": "key-version-2"}
        )
        wait_for(lambda: (shm / "fast").read_text() == "key-version-2", 10, "the 1s refresh")
        # the hourly one only moves when asked
        assert (shm / "slow").read_text() == "key-version-1"
        status, answer = agent.admin("/refresh?secret=slow", method="POST")
        assert status == 202 and answer == {"refreshing": ["slow"]}
        wait_for(lambda: (shm / "slow").read_text() == "key-version-2", 10, "POST /refresh")
        assert agent.admin("/refresh?secret=nope", method="POST")[0] == 404
    finally:
        assert agent.stop() == 0


def test_a_burst_is_fully_written_before_anyone_is_notified(
    openbao: OpenBaoServer, shm: Path
) -> None:
    """The notify command reads both files of a burst; it must never see them disagree."""
    client = openbao.client()
    client.secrets.kv.v2.create_or_update_secret(path="burst", secret={"v": "generation-0"})
    record = shm / "seen"
    reader = (
        "import sys; a, b, out = sys.argv[1:]; "
        "open(out, 'a').write(open(a).read() + '|' + open(b).read() + '\\n')"
    )
    config = agent_config(openbao, shm, "unused")
    config["secrets"] = {"kv": {"kind": "kv", "path": "secret/data/burst", "refresh": "1h"}}
    config["templates"] = [
        {"destination": str(shm / name), "contents": "{{ secrets.kv.v }}"} for name in ("a", "b")
    ]
    config["notify"] = {
        "reader": {
            "command": [sys.executable, "-c", reader, str(shm / "a"), str(shm / "b"), str(record)],
            "wait": {"min": "0s", "max": "0s"},
        }
    }
    agent = AgentProcess(shm, config).start()
    try:
        agent.wait_ready()
        for n in range(1, 4):
            client.secrets.kv.v2.create_or_update_secret(
                path="burst", secret={"v": f"generation-{n}"}
            )
            agent.admin("/refresh", method="POST")
            wait_for(
                lambda n=n: record.exists() and f"generation-{n}|" in record.read_text(),
                15,
                f"the notification for generation {n}",
            )
    finally:
        assert agent.stop() == 0
    for line in record.read_text().splitlines():
        a, b = line.split("|")
        assert a == b, line


@pytest.mark.slow
def test_vault_outage_keeps_files_and_recovers_without_new_leases(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path
) -> None:
    configure_database_engine(
        openbao, postgres, role="out", mount="db-out", ttl="12s", max_ttl="10m"
    )
    relay = FaultRelay(openbao.port)
    config = agent_config(openbao, shm, "db-out/creds/out")
    config["vault"]["address"] = relay.address
    config["vault"]["retry"] = {"initial": "200ms", "max": "2s"}
    agent = AgentProcess(shm, config).start()
    try:
        agent.wait_ready()
        before = (shm / "db.json").read_bytes()
        lease = agent.admin("/status")[1]["secrets"]["db"]["lease_id"]
        relay.cut()

        def not_ready() -> dict[str, object] | None:
            code, body = agent.http("/readyz")
            return None if code == 200 else {"at": time.time(), **json.loads(body)}

        turned = wait_for(not_ready, 30, "/readyz to turn not-ready during the outage")
        status = agent.admin("/status")[1]
        assert status["secrets"]["db"]["expires_at"] > turned["at"], "not-ready only after expiry"
        assert (shm / "db.json").read_bytes() == before
        failures = agent.events("renew_failed")
        assert len(failures) >= 2
        relay.restore()
        agent.wait_ready(timeout=30)
        assert agent.admin("/status")[1]["secrets"]["db"]["lease_id"] == lease
        assert (shm / "db.json").read_bytes() == before
        assert leases_under(openbao, "db-out/creds/out/") == [lease]
        metrics = agent.http("/metrics")[1].decode()
        assert "credsidecar_vault_errors_total" in metrics
    finally:
        relay.close()
        assert agent.stop() == 0


def test_exec_mode_runs_the_app_and_exits_with_its_code(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path
) -> None:
    configure_database_engine(openbao, postgres, role="ex", mount="db-ex", ttl="1m", max_ttl="5m")
    app = textwrap.dedent(
        f"""
        import json, signal, sys, time
        creds = json.load(open({str(shm / "db.json")!r}))
        print("app saw user", creds["username"], flush=True)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
        while True:
            time.sleep(0.1)
        """
    )
    config = agent_config(openbao, shm, "db-ex/creds/ex")
    config["exec"] = {"command": [sys.executable, "-c", app]}
    agent = AgentProcess(shm, config).start()
    agent.wait_ready()
    wait_for(lambda: "app saw user" in agent.out_path.read_text(), 20, "the child's output")
    assert agent.stop(signal.SIGTERM) == 3


# A stand-in application that reads its credentials from DATABASE_URL only: logs in with
# them when it starts, and again when it is told to stop (the old lease must still work).
DSN_APP = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    import asyncpg
    record = sys.argv[1]
    fields = dict(pair.split("=", 1) for pair in os.environ["DATABASE_URL"].split())
    async def login():
        conn = await asyncpg.connect(
            host=fields["host"], port=int(fields["port"]), user=fields["user"],
            password=fields["password"], database=fields["dbname"], timeout=20)
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()
    def log(kind):
        with open(record, "a") as f:
            f.write(f"{kind} {os.getpid()} {asyncio.run(login())}\\n")
    def on_term(*_):
        log("stopping")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    log("started")
    while True:
        time.sleep(0.1)
    """
)


@pytest.mark.slow
def test_exec_env_template_restarts_the_child_with_each_new_credential(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path
) -> None:
    record = shm / "app.record"
    where = f'host="127.0.0.1", port={postgres.port}, dbname="postgres"'
    dsn = f"{{{{ secrets.db | libpq_dsn({where}) }}}}"
    configure_database_engine(
        openbao, postgres, role="envt", mount="db-envt", ttl="6s", max_ttl="20s"
    )
    config = agent_config(openbao, shm, "db-envt/creds/envt")
    config["secrets"]["db"]["revoke_grace"] = "1s"
    config["exec"] = {
        "command": [sys.executable, "-c", DSN_APP, str(record)],
        "env_template": {"DATABASE_URL": dsn},
        "wait": {"min": "100ms", "max": "1s"},
    }
    agent = AgentProcess(shm, config).start()
    try:
        agent.wait_ready()
        wait_for(lambda: record.exists() and "started" in record.read_text(), 30, "the child")
        password = json.loads((agent.state_dir / "db.json").read_text())["data"]["password"]
        AUDIT.secret(password)
        (first,) = agent.events("child_started")
        cmdline = Path(f"/proc/{first['pid']}/cmdline").read_bytes()
        assert password.encode() not in cmdline  # the DSN reached it through its environment
        (replaced,) = agent.wait_event("replaced", timeout=60)
        agent.wait_event("revoked", timeout=30)
    finally:
        code = agent.stop()
    assert code == 0, agent.log_path.read_text()[-3000:] + agent.out_path.read_text()[-2000:]
    lines = [line.split() for line in record.read_text().splitlines()]
    (kind1, pid1, user1), (kind2, pid2, _), (kind3, pid3, user3) = lines[:3]
    # the first child saw the first DSN, could still log in with it when stopped, and its
    # successor logged in with the replacement
    assert (kind1, kind2, kind3) == ("started", "stopping", "started")
    assert pid1 == pid2 == str(first["pid"]) and pid3 != pid1 and user3 != user1
    events = agent.events()
    names = [(e["event"], e.get("pid"), e.get("version")) for e in events]
    restarted = names.index(("child_started", int(pid3), None))
    revoked = names.index(("revoked", None, replaced["old_version"]))
    assert restarted < revoked, "the old lease was revoked before the new child ran"
    assert replaced["old_version"] not in leases_under(openbao, "db-envt/creds/envt/")


def process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_exec_child_does_not_outlive_a_killed_agent(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path
) -> None:
    configure_database_engine(openbao, postgres, role="ex9", mount="db-ex9", ttl="1m", max_ttl="5m")
    config = agent_config(openbao, shm, "db-ex9/creds/ex9")
    config["exec"] = {"command": [sys.executable, "-c", "import time; time.sleep(300)"]}
    agent = AgentProcess(shm, config).start()
    (started,) = agent.wait_event("child_started")
    assert not process_gone(started["pid"])
    agent.kill()
    wait_for(lambda: process_gone(started["pid"]), 10, "the child to exit with its agent")


def test_metrics_and_status_never_show_values(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path
) -> None:
    configure_database_engine(openbao, postgres, role="obs", mount="db-obs", ttl="1m", max_ttl="5m")
    agent = AgentProcess(shm, agent_config(openbao, shm, "db-obs/creds/obs")).start()
    try:
        agent.wait_ready()
        password = json.loads((shm / "db.json").read_text())["password"]
        AUDIT.secret(password)
        code, body = agent.http("/metrics")
        text = body.decode()
        assert code == 200
        for name in (
            "credsidecar_secret_age_seconds",
            "credsidecar_lease_ttl_remaining_seconds",
            "credsidecar_renders_total",
            "credsidecar_ready 1.0",
        ):
            assert name in text, name
        code, status = agent.admin("/status")
        assert code == 200 and status["ready"] is True
        assert status["secrets"]["db"]["fields"] == ["password", "username"]
        assert password not in json.dumps(status) and password not in text
        assert agent.http("/healthz")[0] == 200
    finally:
        assert agent.stop() == 0


def test_no_secret_reached_any_log_so_far() -> None:
    """The suite-wide audit, also run at session end; here it shows up as a test."""
    assert len(AUDIT.secrets) > 1
    assert AUDIT.leaks() == []
