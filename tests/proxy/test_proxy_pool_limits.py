"""Server connections are bounded (issue 9 finding 3): one pool per database whatever
the clients' startup parameters, at most max_db_connections backends, idle and old
ones closed (server_idle_timeout, server_lifetime, the credential's end)."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import asyncpg
import pytest
from devservers import PostgresCluster
from proxyhelpers import ProxyFactory, Role, wait_until, write_credentials

from proxy import metrics
from proxy.config import parse_proxy_config
from proxy.credentials import StaticCredentialProvider
from proxy.protocol import messages as m

CLIENTS = 500


async def one_client(port: int, role: Role, tag: int) -> None:
    """Log in with a startup parameter of its own, run one query, leave."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        params = {"user": "app", "database": role.database, "app.tag": f"t{tag}"}
        writer.write(m.startup_message(params))
        answer = b""
        for query in (None, "SELECT current_setting('app.tag')"):
            if query is not None:
                writer.write(m.query(query))
            while not answer.endswith(b"Z\0\0\0\5I"):  # the login's, then the query's
                data = await asyncio.wait_for(reader.read(65536), 60)
                assert data, f"closed: {answer!r}"
                answer += data
            answer += b"."
        value = b"t%d" % tag
        assert len(value).to_bytes(4, "big") + value + b"C" in answer, answer  # its own
        writer.write(m.TERMINATE)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.fixture(scope="module")
def own_login(postgres: PostgresCluster) -> tuple[str, str]:
    """A role no other test's proxy logs in with: its backends are this test's alone."""
    name, password = f"plimit_{secrets.token_hex(4)}", "pw-" + secrets.token_hex(12)
    postgres.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    return name, password


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_distinct_parameters_share_a_bounded_pool(
    make_proxy: ProxyFactory,
    postgres: PostgresCluster,
    role: Role,
    own_login: tuple[str, str],
    mode: str,
) -> None:
    proxy = await make_proxy(creds=own_login, pool_mode=mode, pool_size=5, max_db_connections=3)
    # another application, logged in directly as another role, watches all along
    other = await asyncpg.connect(
        host="127.0.0.1", port=postgres.port, user=postgres.superuser,
        password=postgres.password, database="postgres",
    )  # fmt: skip
    seen: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.append(
                await other.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", own_login[0]
                )
            )
            await asyncio.sleep(0.005)

    gate = asyncio.Semaphore(50)

    async def client(tag: int) -> None:
        async with gate:
            await one_client(proxy.port, role, tag)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    finally:
        done.set()
        await watcher
    try:
        direct = await asyncpg.connect(
            host="127.0.0.1", port=postgres.port, user=postgres.superuser,
            password=postgres.password, database="postgres",
        )  # fmt: skip
        await direct.close()
        assert max(seen) <= 3, max(seen)
        assert len(proxy.server.manager.pools) == 1
    finally:
        await other.close()


async def test_idle_connections_close_after_server_idle_timeout(
    make_proxy: ProxyFactory, role: Role
) -> None:
    proxy = await make_proxy(server_idle_timeout="300ms", server_lifetime=0)
    conn = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        pools = proxy.server.manager.pools
        assert sum(len(p.conns) for p in pools.values()) == 1
        await wait_until(
            lambda: not any(p.conns for p in pools.values()), what="idle connection closed"
        )
        assert await conn.fetchval("SELECT 2") == 2  # a new one serves the client
    finally:
        await conn.close()


async def test_server_lifetime_replaces_busy_connections(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """Past server_lifetime a connection is closed at its release, not handed out."""
    proxy = await make_proxy(pool_size=1, server_lifetime="200ms", server_idle_timeout=0)
    conn = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        first = await conn.fetchval("SELECT pg_backend_pid()")

        async def replaced() -> bool:
            return bool(await conn.fetchval("SELECT pg_backend_pid()") != first)

        await wait_until(replaced, what="a new server connection after server_lifetime")
    finally:
        await conn.close()


async def test_no_server_connection_outlives_its_credential(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """A connection is not used past its credential's expires_at (a lease's end), busy
    or idle, with server_lifetime and server_idle_timeout off; a renewal that moves
    expires_at keeps the connections."""
    proxy = await make_proxy(server_idle_timeout=0, server_lifetime=0)
    expired = metrics.server_retired_total.labels("credential_expired")
    before = expired._value.get()
    write_credentials(proxy.creds_file, role.name, role.password, time.time() + 1.0)
    provider = proxy.server.provider
    await wait_until(lambda: (c := provider.current()) is not None and c.expires_at is not None)
    conn = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        first = await conn.fetchval("SELECT pg_backend_pid()")
        pools = proxy.server.manager.pools
        # idle in the pool past the end: closed by the sweep
        await wait_until(lambda: not any(p.conns for p in pools.values()), what="retired")
        assert expired._value.get() > before
        # renewed (same user and password, a later end): the next connection stays
        renewed = time.time() + 600
        write_credentials(proxy.creds_file, role.name, role.password, renewed)
        await wait_until(lambda: (c := provider.current()) is not None and c.expires_at == renewed)
        second = await conn.fetchval("SELECT pg_backend_pid()")
        assert second != first
        await asyncio.sleep(1.5)  # past the sweep's tick: nothing is retired now
        assert await conn.fetchval("SELECT pg_backend_pid()") == second
    finally:
        await conn.close()


def test_a_renewal_keeps_the_generation() -> None:
    provider = StaticCredentialProvider("u", "p")
    assert not provider.update("u", "p", 1234.0)
    current = provider.current()
    assert current is not None and (current.generation, current.expires_at) == (1, 1234.0)
    assert provider.update("u", "p2", 99.0)
    current = provider.current()
    assert current is not None and (current.generation, current.expires_at) == (2, 99.0)


def test_limits_config() -> None:
    base = {"credentials": {"file": "c.json"}}
    config = parse_proxy_config({**base, "pool_size": 7}, Path("/"))
    assert config.max_db_connections == 14  # 2 x pool_size unless set
    assert config.server_idle_timeout == 600 and config.server_lifetime == 3600
    assert parse_proxy_config({**base, "max_db_connections": 0}, Path("/")).max_db_connections == 0
    with pytest.raises(ValueError, match=r"proxy\.max_db_connections: -1 is negative"):
        parse_proxy_config({**base, "max_db_connections": -1}, Path("/"))
    with pytest.raises(ValueError, match=r"proxy\.ignore_startup_parameters"):
        parse_proxy_config({**base, "ignore_startup_parameters": "x"}, Path("/"))
