"""Rotation behind the agent's PostgreSQL proxy: pgbench through it sees no failure."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from agentproc import AgentProcess
from devservers import OpenBaoServer, PostgresCluster, free_port, pg_bindir
from rotatehelpers import rotate_config


class Bench(threading.Thread):
    """pgbench (select-only) through the proxy for ``seconds``."""

    def __init__(self, port: int, database: str, seconds: int) -> None:
        super().__init__(daemon=True)
        self.port, self.database, self.seconds = port, database, seconds
        self.result: subprocess.CompletedProcess[str] | None = None

    def run(self) -> None:
        self.result = subprocess.run(
            [
                str(pg_bindir() / "pgbench"),
                "-n",
                "-S",
                "-c",
                "8",
                "-j",
                "2",
                "-T",
                str(self.seconds),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "app",
                self.database,
            ],
            capture_output=True,
            text=True,
            timeout=self.seconds + 120,
        )

    def counts(self) -> tuple[int, int]:
        assert self.result is not None
        out = self.result.stdout
        assert self.result.returncode == 0, self.result.stderr[-2000:] + out[-2000:]
        done = re.search(r"number of transactions actually processed: (\d+)", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        assert done is not None, out
        return int(done.group(1)), int(failed.group(1)) if failed else 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgres-password", "postgres-dual-user"])
def test_pgbench_through_the_proxy_during_rotations(
    openbao: OpenBaoServer, postgres: PostgresCluster, shm: Path, unique: str, kind: str
) -> None:
    role, database = f"bench{unique}", f"benchdb{unique}"
    postgres.psql(f"CREATE DATABASE {database}")
    subprocess.run(
        [
            *(str(pg_bindir() / "pgbench"), "-i", "-q", "-s", "1", "-h", "127.0.0.1"),
            *("-p", str(postgres.port), "-U", postgres.superuser, database),
        ],
        env={"PGPASSWORD": postgres.password},
        check=True,
        capture_output=True,
    )
    login = "LOGIN" if kind == "postgres-password" else "NOLOGIN"
    postgres.psql(f"CREATE ROLE {role} {login} IN ROLE pg_read_all_data")
    proxy_port = free_port()
    config = rotate_config(
        openbao,
        postgres,
        shm,
        unique,
        None,
        name="db",
        kind=kind,
        database=database,
        role=role,
        store={"vault_kv": f"secret/data/rot-proxy-{unique}"},
        grace="2s",
    )
    config["proxy"] = {
        "listen": f"127.0.0.1:{proxy_port}",
        "upstream": {"host": "127.0.0.1", "port": postgres.port},
        "credentials": {"secret": "db"},
        "pool_size": 8,
        "drain_timeout": "10s",
    }
    agent = AgentProcess(shm / "agent", config).start()
    try:
        agent.wait_ready()
        bench = Bench(proxy_port, database, seconds=8)
        bench.start()
        time.sleep(1.5)
        for version in (2, 3):
            status, answer = agent.admin("/rotate/db", method="POST")
            assert status == 200, answer
            assert answer["version"] == version
            time.sleep(2.5)
        bench.join()
        done, failed = bench.counts()
        assert done > 0 and failed == 0
        proxy = agent.admin("/status")[1]["proxy"]
        assert proxy["generation"] >= 3  # the proxy moved onto each rotated credential
        expected = f"{role}_a" if kind == "postgres-dual-user" else role
        assert proxy["user"] == expected  # dual-user: _a, _b, _a
    finally:
        assert agent.stop() == 0
    assert len(agent.events("rotation_published")) == 3
