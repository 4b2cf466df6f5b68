"""Pooling behaviour through the proxy against the real cluster."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from proxyhelpers import (
    ProxyFactory,
    Role,
    RunningProxy,
    pg_tool,
    pgbench,
    pgbench_counts,
    run,
    wait_until,
)


async def test_prepared_statements_shared_server_connections(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """asyncpg's statement cache through transaction pooling with one server connection."""
    proxy = await make_proxy(pool_size=1)
    clients = [await asyncpg.connect(proxy.dsn(db=role.database)) for _ in range(4)]
    try:
        for round_ in range(3):
            results = await asyncio.gather(
                *(c.fetchval("SELECT $1::int + $2::int", i, round_) for i, c in enumerate(clients))
            )
            assert results == [i + round_ for i in range(4)]
        # a different statement under a name another client already used
        assert await clients[0].fetchval("SELECT 'x' || $1::text", "y") == "xy"
        stmt = await clients[1].prepare("SELECT $1::int * 10")
        assert await stmt.fetchval(4) == 40
        assert await clients[2].fetchval("SELECT $1::int * 10", 5) == 50
        status = proxy.server.status()
        (pool,) = status["pools"]
        assert len(pool["connections"]) == 1
    finally:
        for c in clients:
            await c.close()


async def test_session_state_does_not_leak_in_session_mode(
    make_proxy: ProxyFactory, role: Role
) -> None:
    proxy = await make_proxy(pool_mode="session", pool_size=1)
    first = await asyncpg.connect(proxy.dsn(db=role.database))
    await first.execute("SET work_mem = '7MB'")
    await first.execute("CREATE TEMP TABLE leak (x int)")
    await first.execute("PREPARE leaky AS SELECT 1")
    pid = await first.fetchval("SELECT pg_backend_pid()")
    await first.close()
    second = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        # the same server connection, reset
        assert await second.fetchval("SELECT pg_backend_pid()") == pid
        assert await second.fetchval("SHOW work_mem") != "7MB"
        assert not await second.fetchval(
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaky'"
        )
        assert await second.fetchval("SELECT to_regclass('pg_temp.leak') IS NULL")
    finally:
        await second.close()


async def test_client_parameters_follow_the_client(make_proxy: ProxyFactory, role: Role) -> None:
    """Each client keeps its own application_name/TimeZone across shared connections."""
    proxy = await make_proxy(pool_size=1)
    a = await asyncpg.connect(
        proxy.dsn(db=role.database), server_settings={"application_name": "alpha"}
    )
    b = await asyncpg.connect(
        proxy.dsn(db=role.database), server_settings={"application_name": "beta"}
    )
    try:
        await a.execute("SET TimeZone = 'Asia/Tokyo'")
        for _ in range(3):
            assert await a.fetchval("SHOW application_name") == "alpha"
            assert await b.fetchval("SHOW application_name") == "beta"
            assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
            assert await b.fetchval("SHOW TimeZone") != "Asia/Tokyo"
    finally:
        await a.close()
        await b.close()


async def test_startup_options_are_honoured(make_proxy: ProxyFactory, role: Role) -> None:
    proxy = await make_proxy()
    result = await run(
        pg_tool("psql"),
        "-X",
        "-A",
        "-t",
        f"host=127.0.0.1 port={proxy.port} user=x dbname={role.database} "
        "options='-c statement_timeout=4321'",
        "-c",
        "SHOW statement_timeout",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4321ms"


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_pgbench_through_proxy(make_proxy: ProxyFactory, pgbench_db: Role, mode: str) -> None:
    proxy = await make_proxy(pool_mode=mode, pool_size=16)
    for args in (["-S"], [], ["-S", "-M", "prepared"]):
        result = await pgbench(proxy.port, pgbench_db.database, *args, seconds=2)
        assert result.returncode == 0, result.stderr + result.stdout
        done, failed = pgbench_counts(result.stdout)
        assert done > 0
        assert failed == 0


async def test_large_results_and_messages(make_proxy: ProxyFactory, role: Role) -> None:
    """Big rows split over many reads, many rows, and a big message from the client."""
    proxy = await make_proxy()
    conn = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        big = await conn.fetchval("SELECT repeat('x', 5000000)")
        assert big == "x" * 5000000
        rows = await conn.fetch("SELECT g, repeat('y', 500) FROM generate_series(1, 20000) g")
        assert len(rows) == 20000
        assert rows[-1][0] == 20000
        echoed = await conn.fetchval("SELECT length($1::text)", "z" * 3000000)
        assert echoed == 3000000
        async with conn.transaction():
            seen = 0
            async for _ in conn.cursor("SELECT g FROM generate_series(1, 5000) g", prefetch=100):
                seen += 1
            assert seen == 5000
    finally:
        await conn.close()


async def test_psycopg_prepared_statements_in_transaction_mode(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """psycopg 3 prepares server-side after prepare_threshold uses (libpq, named statements)."""
    import psycopg

    proxy = await make_proxy(pool_size=1)
    dsn = f"host=127.0.0.1 port={proxy.port} user=x password=x dbname={role.database}"
    a = await psycopg.AsyncConnection.connect(dsn, prepare_threshold=1, autocommit=True)
    b = await psycopg.AsyncConnection.connect(dsn, prepare_threshold=1, autocommit=True)
    try:
        for i in range(6):
            for conn, factor in ((a, 2), (b, 3)):
                cur = await conn.execute("SELECT %s::int * %s::int", (i, factor))
                assert await cur.fetchone() == (i * factor,)
        cur = await a.execute("SELECT %s::text || 'x'", ("y",))
        assert await cur.fetchone() == ("yx",)
        async with a.transaction():
            await a.execute("SELECT %s::int", (1,))
            cur = await a.execute("SELECT %s::int + 1", (1,))
            assert await cur.fetchone() == (2,)
        # psycopg prepared named statements (one text, both clients): the proxy renamed them
        assert proxy.server.status()["prepared_statements"] >= 1
    finally:
        await a.close()
        await b.close()


async def test_copy_and_client_discard_all(make_proxy: ProxyFactory, role: Role) -> None:
    proxy = await make_proxy(pool_size=1)
    conn = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS copied (x int, y text)")
        await conn.execute("TRUNCATE copied")
        await conn.copy_records_to_table("copied", records=[(i, f"r{i}") for i in range(500)])
        assert await conn.fetchval("SELECT count(*) FROM copied") == 500
        out = await conn.fetch("SELECT x FROM copied ORDER BY x LIMIT 3")
        assert [r["x"] for r in out] == [0, 1, 2]
        # the client throws away every prepared statement; the cache must still work
        assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
        await conn.execute("DISCARD ALL")
        assert await conn.fetchval("SELECT $1::int + 1", 2) == 3
        await conn.execute("DROP TABLE copied")
    finally:
        await conn.close()


def test_pipeline_close_with_flush_answers_without_sync() -> None:
    from proxy.protocol import messages as m
    from proxy.protocol.pipeline import Pipeline
    from proxy.protocol.statements import ClientStatements, StatementNames

    pipe = Pipeline(StatementNames(), {})
    stmts = ClientStatements()
    parse = m.message(b"P", m.cstr("s") + m.cstr("SELECT 1") + b"\x00\x00")
    bind = m.message(b"B", b"\0" + m.cstr("s") + b"\x00\x00\x00\x00\x00\x00")
    close = m.message(b"C", b"S" + m.cstr("s"))
    flush = m.message(b"H")
    buf = parse + bind + close + flush
    frames, pos = [], 0
    for part in (parse, bind, close, flush):
        frames.append((part[0], pos, pos + len(part)))
        pos += len(part)
    out: list[bytes] = []
    pipe.client_frames(buf, frames, stmts, out)
    assert (
        b"".join(out)
        == m.message(b"P", m.cstr("csp_1") + m.cstr("SELECT 1") + b"\0\0")
        + (m.message(b"B", b"\0" + m.cstr("csp_1") + b"\x00\x00\x00\x00\x00\x00"))
        + flush
    )
    reply = m.PARSE_COMPLETE + m.message(b"2")
    to_client: list[bytes] = []
    pipe.server_frames(reply, [(ord("1"), 0, 5), (ord("2"), 5, 10)], to_client)
    assert b"".join(to_client) == reply + m.CLOSE_COMPLETE
    assert pipe.idle


async def test_slow_reader_backpressure(make_proxy: ProxyFactory, role: Role) -> None:
    """A client that does not read its big result holds back its server connection only;
    once it reads, it gets every row and the connection serves others again."""
    from proxy.protocol import messages as m

    proxy = await make_proxy(pool_size=2)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 16)

    async def until_ready() -> int:
        rows = 0
        while True:
            head = await reader.readexactly(5)
            await reader.readexactly(int.from_bytes(head[1:5], "big") - 4)
            rows += head[:1] == b"D"
            if head[:1] == b"Z":
                return rows

    writer.write(m.startup_message({"user": "slow", "database": role.database}))
    await until_ready()
    writer.write(m.query("SELECT repeat('x', 1000) FROM generate_series(1, 30000)"))
    await writer.drain()
    # not reading: the socket buffers fill and the proxy stops reading that server
    await wait_until(lambda: paused_servers(proxy) == 1, what="server reading paused")
    other = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        for _ in range(5):
            assert await other.fetchval("SELECT 7") == 7
        assert await until_ready() == 30000
        assert paused_servers(proxy) == 0
        writer.write(m.query("SELECT 1"))
        assert await until_ready() == 1
    finally:
        await other.close()
        writer.close()
        await writer.wait_closed()


def paused_servers(proxy: RunningProxy) -> int:
    pools = proxy.server.manager.pools.values()
    return sum(
        1
        for pool in pools
        for conn in pool.conns
        if conn.link.transport is not None and not conn.link.transport.is_reading()
    )
