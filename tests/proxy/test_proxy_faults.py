"""Cancel, refusals and faults through the proxy against the real cluster."""

from __future__ import annotations

import asyncio
import logging
import socket

import asyncpg
import pytest
from devservers import PostgresCluster
from proxyhelpers import ProxyFactory, Role, psql, wait_until

from proxy.protocol import messages as m


async def send_cancel(port: int, pid: int, secret: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(m.cancel_request(pid, secret))
    await writer.drain()
    await reader.read()  # the proxy closes when done
    writer.close()
    await writer.wait_closed()


async def sleeping(pg: PostgresCluster, user: str) -> int:
    result = await psql(
        "127.0.0.1",
        str(pg.port),
        pg.superuser,
        "postgres",
        "-c",
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE usename = '{user}' AND query LIKE '%pg_sleep(30)%' AND state = 'active'",
        env={"PGPASSWORD": pg.password},
    )
    return int(result.stdout)


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_cancel_reaches_the_right_server_connection(
    make_proxy: ProxyFactory, postgres: PostgresCluster, role: Role, mode: str
) -> None:
    proxy = await make_proxy(pool_mode=mode)
    conn = await asyncpg.connect(proxy.dsn(db=role.database))
    bystander = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        proto = conn._protocol
        pid, secret = proto.backend_pid, proto.backend_secret
        assert pid != bystander.get_server_pid()
        query = asyncio.create_task(conn.fetchval("SELECT pg_sleep(30)"))
        await wait_until(lambda: sleeping(postgres, role.name), what="query running")
        # a wrong secret or an unknown process id cancels nothing
        await send_cancel(proxy.port, pid, secret ^ 1)
        await send_cancel(proxy.port, pid + 1000, secret)
        await asyncio.sleep(0.3)
        assert not query.done()
        await send_cancel(proxy.port, pid, secret)
        with pytest.raises(asyncpg.QueryCanceledError):
            await query
        assert await conn.fetchval("SELECT 1") == 1
        assert await bystander.fetchval("SELECT 2") == 2
    finally:
        await conn.close()
        await bystander.close()


async def test_garbage_gets_08p01_and_others_keep_working(
    make_proxy: ProxyFactory, role: Role
) -> None:
    proxy = await make_proxy()
    good = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x00\x00\x08\x00\x09\x00\x00"):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(garbage)
            answer = await reader.read()
            writer.close()
            assert answer[:1] == b"E"
            assert b"C08P01\x00" in answer
        # garbage after a successful login
        bad = await asyncpg.connect(proxy.dsn(db=role.database))
        bad._transport.write(b"\xff\x00\x00\x00\x04")
        await wait_until(bad.is_closed, what="bad client closed")
        assert await good.fetchval("SELECT 42") == 42
    finally:
        await good.close()


async def test_connect_timeout_against_silent_upstream(
    make_proxy: ProxyFactory, role: Role
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts TCP (kernel backlog), never answers
    try:
        proxy = await make_proxy(
            upstream={"port": silent.getsockname()[1], "connect_timeout": "0.5s"}
        )
        with pytest.raises(asyncpg.PostgresError, match="connect_timeout") as info:
            await asyncpg.connect(proxy.dsn(db=role.database), timeout=30)
        assert info.value.sqlstate == "08006"
    finally:
        silent.close()


async def test_unknown_database_error_reaches_client(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(proxy.dsn(db="no_such_db"))


async def test_postgres_restart_under_load(make_proxy: ProxyFactory, role: Role) -> None:
    """A separate cluster (the session one must stay up): clean errors, then recovery."""
    cluster = PostgresCluster()
    cluster.start()
    try:
        cluster.psql(f"CREATE ROLE {role.name} LOGIN PASSWORD '{role.password}'")
        proxy = await make_proxy(upstream={"port": cluster.port}, pool_size=8)
        conns = [await asyncpg.connect(proxy.dsn(db="postgres")) for _ in range(4)]
        stop = asyncio.Event()
        errors: list[BaseException] = []
        ok = [0]

        async def worker(conn: asyncpg.Connection) -> None:
            while not stop.is_set():
                try:
                    await conn.fetchval("SELECT pg_sleep(0.01)")
                    ok[0] += 1
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                    errors.append(exc)
                    return

        tasks = [asyncio.create_task(worker(c)) for c in conns]
        await wait_until(lambda: ok[0] > 20, what="load running")
        await asyncio.to_thread(cluster.restart)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        # clients that were mid-query got a clean PostgreSQL error, not a hang
        for exc in errors:
            assert isinstance(exc, asyncpg.PostgresError | asyncpg.ConnectionDoesNotExistError), exc
        # new connections succeed once it is back, and in transaction mode the clients
        # that only saw an ERROR (no server at that moment) keep their connection
        fresh = await asyncpg.connect(proxy.dsn(db="postgres"))
        assert await fresh.fetchval("SELECT 1") == 1
        await fresh.close()
        for conn in conns:
            if not conn.is_closed():
                assert await conn.fetchval("SELECT 2") == 2
            await conn.close()
    finally:
        cluster.remove()


async def test_raw_startup_negotiation(make_proxy: ProxyFactory, role: Role) -> None:
    """GSSENCRequest and SSLRequest get 'N' without a certificate; a newer minor protocol
    version and _pq_ options get NegotiateProtocolVersion; the login then completes."""
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(m.gssenc_request())
        assert await reader.readexactly(1) == b"N"
        writer.write(m.ssl_request())
        assert await reader.readexactly(1) == b"N"
        params = {"user": "raw", "database": role.database, "_pq_.future": "1"}
        writer.write(m.startup_message(params, protocol=(3 << 16) | 2))
        first = await reader.readexactly(5)
        assert first[:1] == b"v"
        body = await reader.readexactly(int.from_bytes(first[1:5], "big") - 4)
        assert body == b"\x00\x00\x00\x00\x00\x00\x00\x01_pq_.future\x00"
        seen = []
        while not seen or seen[-1] != b"Z":
            head = await reader.readexactly(5)
            await reader.readexactly(int.from_bytes(head[1:5], "big") - 4)
            seen.append(head[:1])
        assert seen[0] == b"R"
        assert b"K" in seen
        assert b"S" in seen
        writer.write(m.TERMINATE)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_backend_terminated_between_requests(
    make_proxy: ProxyFactory,
    postgres: PostgresCluster,
    role: Role,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Transaction mode: a pooled backend killed between transactions is invisible to the
    client. Session mode: the client's own session ends with the server's error. Both
    are logged with the error's SQLSTATE, never its text."""
    caplog.set_level(logging.INFO, logger="credsidecar.proxy")
    tx_proxy = await make_proxy(pool_size=1)
    session_proxy = await make_proxy(pool_mode="session")
    tx_client = await asyncpg.connect(tx_proxy.dsn(db=role.database))
    session_client = await asyncpg.connect(session_proxy.dsn(db=role.database))
    try:
        pids = [
            await tx_client.fetchval("SELECT pg_backend_pid()"),
            await session_client.fetchval("SELECT pg_backend_pid()"),
        ]
        for pid in pids:
            await psql(
                "127.0.0.1",
                str(postgres.port),
                postgres.superuser,
                "postgres",
                "-c",
                f"SELECT pg_terminate_backend({pid})",
                env={"PGPASSWORD": postgres.password},
            )
        await wait_until(session_client.is_closed, what="session client ended")
        # the proxy noticed its pooled backend went away (pg_terminate_backend is async)
        await wait_until(
            lambda: not tx_proxy.server.status()["pools"][0]["connections"], what="pool empty"
        )
        new_pid = await tx_client.fetchval("SELECT pg_backend_pid()")
        assert new_pid != pids[0]
    finally:
        await tx_client.close()
        await session_client.close()
    ended = [r for r in caplog.records if r.getMessage() == "proxy_server_ended_session"]
    assert [getattr(r, "sqlstate", None) for r in ended] == ["57P01", "57P01"]
    assert not [r for r in ended if "terminat" in str(r.__dict__)]
