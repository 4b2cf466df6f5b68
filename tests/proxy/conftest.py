"""Fixtures for the proxy tests: a role and database of its own on the session cluster,
and a factory that runs a ProxyServer (file credentials) in the test's event loop.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from devservers import PostgresCluster
from prometheus_client import CollectorRegistry
from proxyhelpers import ProxyFactory, Role, RunningProxy, make_role, pg_tool, write_credentials

from proxy.config import parse_proxy_config
from proxy.credentials import FileCredentialProvider
from proxy.server import ProxyServer


@pytest.fixture(scope="session")
def role(postgres: PostgresCluster) -> Role:
    return make_role(postgres)


@pytest.fixture
async def make_proxy(
    postgres: PostgresCluster, role: Role, tmp_path: Path
) -> AsyncIterator[ProxyFactory]:
    running: list[RunningProxy] = []

    async def factory(*, creds: tuple[str, str] | None = None, **overrides: Any) -> RunningProxy:
        creds_file = tmp_path / f"db-{len(running)}.json"
        username, password = creds or (role.name, role.password)
        write_credentials(creds_file, username, password)
        raw: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "upstream": {"host": "127.0.0.1", "port": postgres.port, "sslmode": "disable"},
            "credentials": {"file": str(creds_file)},
            "pool_mode": "transaction",
            "pool_size": 4,
            "drain_timeout": "10s",
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        config = parse_proxy_config(raw, tmp_path)
        server = ProxyServer(config, FileCredentialProvider(creds_file), CollectorRegistry())
        await server.start()
        proxy = RunningProxy(server, config, creds_file)
        running.append(proxy)
        return proxy

    yield factory
    for proxy in running:
        await proxy.server.stop(timeout=2.0)


@pytest.fixture(scope="session")
def pgbench_db(postgres: PostgresCluster, role: Role) -> Role:
    """The role's database with pgbench tables (scale 1)."""
    subprocess.run(
        [
            pg_tool("pgbench"),
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            str(postgres.port),
            "-U",
            role.name,
            role.database,
        ],
        env={**os.environ, "PGPASSWORD": role.password},
        check=True,
        capture_output=True,
    )
    return role
