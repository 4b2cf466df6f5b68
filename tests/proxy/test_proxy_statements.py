"""Prepared statements through the proxy: bounded on the server and in the proxy,
passed through in session mode, never reused once the server says they are stale."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import asyncpg
import psycopg
import pytest
from devservers import PostgresCluster, free_port
from proxyhelpers import ProxyFactory, Role, StandaloneProxy, WireClient, standalone_config

from proxy.config import ProxyConfigError, parse_proxy_config
from proxy.protocol import messages as m
from proxy.protocol.pipeline import Pipeline
from proxy.protocol.statements import ClientStatements, StatementNames

CAP = 20  # max_prepared_statements in these tests
COUNT_SQL = "SELECT count(*) FROM pg_prepared_statements"


def parse(name: str, sql: str) -> bytes:
    return m.message(b"P", m.cstr(name) + m.cstr(sql) + b"\0\0")


def bind(stmt: str) -> bytes:
    return m.message(b"B", m.cstr("") + m.cstr(stmt) + b"\0\0\0\0\0\0")


def close(stmt: str) -> bytes:
    return m.message(b"C", b"S" + m.cstr(stmt))


EXECUTE = m.message(b"E", b"\0\0\0\0\0")


async def replies(client: WireClient, ready: int = 1) -> list[tuple[bytes, bytes]]:
    """Every message up to the ``ready``-th ReadyForQuery (errors included)."""
    out: list[tuple[bytes, bytes]] = []
    async with asyncio.timeout(30):
        while ready:
            kind, size = await client.header()
            out.append((kind, await client.reader.readexactly(size)))
            ready -= kind == b"Z"
    return out


def values(answer: list[tuple[bytes, bytes]]) -> list[str]:
    """The first column of every DataRow."""
    return [
        body[6 : 6 + int.from_bytes(body[2:6], "big")].decode() for k, body in answer if k == b"D"
    ]


def errors(answer: list[tuple[bytes, bytes]]) -> list[str]:
    return [body.split(b"\0C", 1)[1][:5].decode() for k, body in answer if k == b"E"]


async def test_twenty_thousand_statements_stay_within_the_cap(
    postgres: PostgresCluster, role: Role, tmp_path: Path
) -> None:
    """Issue 9 finding 4: a client preparing 20,000 distinct statements (closing each, as
    asyncpg's cache does) and keeping 2 x CAP open: the backend never holds more than
    CAP, every result is right (evicted ones are prepared again), the proxy stays flat."""
    port = free_port()
    extra = f"  pool_size: 1\n  max_prepared_statements: {CAP}\n"
    config = standalone_config(tmp_path, postgres.port, role, port, extra)
    pad = "x" * 1000  # 20 MB of statement text in all: a leak would show in VmHWM
    kept = [f"k{i}" for i in range(2 * CAP)]
    async with StandaloneProxy(config, port) as proxy:
        client = await WireClient.connect(port, "app", role.database)
        client.writer.write(
            b"".join(parse(k, f"SELECT {i} AS kept") for i, k in enumerate(kept)) + m.SYNC
        )
        assert not errors(await replies(client))
        counts: list[int] = []
        peaks: list[int] = []
        for batch in range(20):
            numbers = range(batch * 1000, (batch + 1) * 1000)
            data = [
                parse(f"s{n}", f"SELECT {n} /* {pad} */") + bind(f"s{n}") + EXECUTE + close(f"s{n}")
                for n in numbers
            ]
            data += [bind(k) + EXECUTE for k in kept]  # most were evicted meanwhile
            client.writer.write(b"".join(data) + m.SYNC + m.query(COUNT_SQL))
            answer = await replies(client, ready=2)
            assert not errors(answer)
            got = values(answer)
            assert got[:-1] == [str(n) for n in numbers] + [str(i) for i in range(len(kept))]
            assert [k for k, _ in answer].count(b"3") == 1000  # CloseComplete: only the client's
            counts.append(int(got[-1]))
            peaks.append(proxy.peak_rss())
        await client.close()
    assert max(counts) <= CAP, counts
    # after the first batch (allocator warm): flat, where 20 MB of kept text would show
    assert peaks[-1] - peaks[0] < 8 << 20, f"VmHWM {peaks[0]} -> {peaks[-1]}"
    assert proxy.returncode == 0, proxy.stderr.decode()[-2000:]


async def test_asyncpg_cache_churn_stays_within_the_cap(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """asyncpg with a small statement cache running many distinct queries: its Closes are
    answered by the proxy, the server connection never holds more than the cap."""
    proxy = await make_proxy(pool_size=1, max_prepared_statements=CAP)
    conns = [
        await asyncpg.connect(proxy.dsn(db=role.database), statement_cache_size=5) for _ in range(2)
    ]
    try:
        for n in range(150):
            conn = conns[n % 2]
            assert await conn.fetchval(f"SELECT $1::int + {n}", 1) == n + 1
            if n % 25 == 0:
                assert await conn.fetchval(COUNT_SQL) <= CAP
        assert await conns[0].fetchval(COUNT_SQL) <= CAP
        assert len(proxy.server.manager.names) <= 5 * CAP  # the shared name map is bounded
    finally:
        for conn in conns:
            await conn.close()


async def test_a_client_keeping_too_many_statements_is_refused(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """The proxy keeps each open statement's text (to prepare it again): a client may
    keep 5 x max_prepared_statements of them, the next Parse ends it with 53400."""
    proxy = await make_proxy(pool_size=1, max_prepared_statements=CAP)
    client = await WireClient.connect(proxy.port, "app", role.database)
    try:
        client.writer.write(b"".join(parse(f"s{i}", f"SELECT {i}") for i in range(5 * CAP)))
        client.writer.write(m.SYNC)
        assert not errors(await replies(client))
        client.writer.write(parse("one-more", "SELECT 'one more'") + m.SYNC)
        kind, size = await asyncio.wait_for(client.header(), 30)
        body = await client.reader.readexactly(size)
        assert (kind, errors([(kind, body)])) == (b"E", ["53400"])
        assert await asyncio.wait_for(client.reader.read(), 30) == b""  # closed
    finally:
        client.writer.close()
        await client.writer.wait_closed()


async def test_statement_gone_on_the_server_is_prepared_again(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """Issue 10 finding 7 (26000): a DEALLOCATE ALL the proxy cannot see (inside a
    multi-statement Query) empties the server; the next use fails as PostgreSQL would,
    the proxy forgets the statement, and the use after that prepares it again."""
    proxy = await make_proxy(pool_size=1)
    client = await WireClient.connect(proxy.port, "app", role.database)
    try:
        client.writer.write(parse("s", "SELECT 7") + bind("s") + EXECUTE + m.SYNC)
        assert values(await replies(client)) == ["7"]
        client.writer.write(m.query("SELECT 1; DEALLOCATE ALL"))
        assert not errors(await replies(client))
        client.writer.write(bind("s") + EXECUTE + m.SYNC)
        assert errors(await replies(client)) == ["26000"]
        client.writer.write(bind("s") + EXECUTE + m.SYNC)
        assert values(await replies(client)) == ["7"]
    finally:
        await client.close()


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_altered_column_type_after_asyncpg_retry(
    make_proxy: ProxyFactory, role: Role, mode: str
) -> None:
    """Issue 10 finding 7 (0A000): after ALTER COLUMN TYPE the cached statement fails
    with "cached plan must not change result type"; asyncpg prepares the same text
    again, which must get a fresh server statement (both clients, no hang)."""
    proxy = await make_proxy(pool_mode=mode, pool_size=1 if mode == "transaction" else 2)
    table = "alt_" + secrets.token_hex(4)
    conns = [await asyncpg.connect(proxy.dsn(db=role.database)) for _ in range(2)]
    try:
        async with asyncio.timeout(30):
            await conns[0].execute(f"CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (1)")
            for conn in conns:
                assert await conn.fetch(f"SELECT * FROM {table}") == [(1,)]
            await conns[0].execute(f"ALTER TABLE {table} ALTER COLUMN a TYPE text")
            for conn in conns:
                assert await conn.fetch(f"SELECT * FROM {table}") == [("1",)]
                assert await conn.fetch(f"SELECT * FROM {table}") == [("1",)]
            await conns[0].execute(f"DROP TABLE {table}")
    finally:
        for conn in conns:
            await conn.close()


@pytest.mark.parametrize(
    "settings",
    [{"pool_mode": "session"}, {"pool_mode": "transaction", "max_prepared_statements": 0}],
    ids=["session", "transaction-0"],
)
async def test_statement_names_pass_through(
    make_proxy: ProxyFactory, role: Role, settings: dict[str, object]
) -> None:
    """Issue 10 finding 4: in session mode (and with max_prepared_statements: 0, as in
    PgBouncer) a protocol-level name is the server's name: SQL EXECUTE/DEALLOCATE of it
    work, a Close removes it from pg_prepared_statements, a second Parse of it gets
    PostgreSQL's own 42P05."""
    proxy = await make_proxy(pool_size=1, **settings)
    client = await WireClient.connect(proxy.port, "app", role.database)
    try:
        client.writer.write(parse("mine", "SELECT 40 + $1::int") + m.SYNC)
        assert not errors(await replies(client))
        client.writer.write(m.query("EXECUTE mine(2)"))
        assert values(await replies(client)) == ["42"]
        client.writer.write(m.query("SELECT name FROM pg_prepared_statements"))
        assert values(await replies(client)) == ["mine"]
        client.writer.write(parse("mine", "SELECT 'other'") + m.SYNC)
        assert errors(await replies(client)) == ["42P05"]
        client.writer.write(close("mine") + m.SYNC + m.query(COUNT_SQL))
        answer = await replies(client, ready=2)
        assert [k for k, _ in answer][:1] == [b"3"] and values(answer) == ["0"]
        client.writer.write(parse("mine", "SELECT 1") + m.SYNC + m.query("DEALLOCATE mine"))
        assert not errors(await replies(client, ready=2))
    finally:
        await client.close()


async def test_psycopg_deallocates_in_session_mode(make_proxy: ProxyFactory, role: Role) -> None:
    """psycopg 3 deallocates the statements it evicts from its own cache (prepared_max):
    in session mode they leave the server."""
    proxy = await make_proxy(pool_mode="session", pool_size=1)
    async with await psycopg.AsyncConnection.connect(proxy.dsn(db=role.database)) as conn:
        conn.prepared_max = 2
        for n in range(6):
            cur = await conn.execute(f"SELECT {n} + %s::int", (1,), prepare=True)
            assert await cur.fetchone() == (n + 1,)
        cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
        assert await cur.fetchone() == (2,)


# --- byte level: the pipeline's statement bookkeeping ------------------------------


def _msg(data: bytes) -> m.Message:
    return m.Message(data[:1], data)


def _answer(pipe: Pipeline, *server: bytes) -> list[bytes]:
    out: list[bytes] = []
    for data in server:
        pipe.server_message(_msg(data), out)
    return out


def _send(pipe: Pipeline, client: ClientStatements, *requests: bytes) -> list[bytes]:
    out: list[bytes] = []
    for data in requests:
        pipe.client_message(_msg(data), client, out)
    return out


PARSED, CLOSED, READY = m.PARSE_COMPLETE, m.CLOSE_COMPLETE, m.ready_for_query(b"I")


def test_the_least_recently_used_statement_is_closed_on_the_server() -> None:
    pipe, client = Pipeline(StatementNames(2), {}), ClientStatements()
    out = _send(pipe, client, parse("a", "SELECT 1"), parse("b", "SELECT 2"), m.SYNC)
    assert _answer(pipe, PARSED, PARSED, READY) == [PARSED, PARSED, READY]
    out = _send(pipe, client, bind("a"), parse("c", "SELECT 3"), m.SYNC)
    # a was used last: b (csp_2) makes room, and its CloseComplete is not the client's
    assert out == [bind("csp_1"), close("csp_2"), parse("csp_3", "SELECT 3"), m.SYNC]
    two = m.message(b"2")
    assert _answer(pipe, two, CLOSED, PARSED, READY) == [two, PARSED, READY]
    # b again: prepared from its kept text, a (now the oldest) closed
    out = _send(pipe, client, bind("b"), m.SYNC)
    assert out == [close("csp_1"), parse("csp_2", "SELECT 2"), bind("csp_2"), m.SYNC]
    assert _answer(pipe, CLOSED, PARSED, two, READY) == [two, READY]
    assert pipe.prepared.names() == ["csp_3", "csp_2"]


def test_a_skipped_eviction_leaves_the_statement_counted() -> None:
    """An error earlier in the segment: the server skips our Close and the new Parse."""
    pipe, client = Pipeline(StatementNames(1), {}), ClientStatements()
    _send(pipe, client, parse("a", "SELECT 1"), m.SYNC)
    _answer(pipe, PARSED, READY)
    out = _send(pipe, client, parse("", "SELEC"), parse("b", "SELECT 2"), m.SYNC)
    assert out[1:3] == [close("csp_1"), parse("csp_2", "SELECT 2")]
    error = m.error_response("42601", "syntax error", "ERROR")
    assert _answer(pipe, error, READY) == [error, READY]
    assert pipe.prepared.names() == ["csp_1"] and pipe.idle


def test_a_stale_statement_gets_a_fresh_server_name() -> None:
    """0A000 (cached plan must not change result type) at Bind: the same text prepared
    again, by any client, is a new server statement."""
    names = StatementNames()
    pipe, client = Pipeline(names, {}), ClientStatements()
    _send(pipe, client, parse("a", "SELECT * FROM t"), m.SYNC)
    _answer(pipe, PARSED, READY)
    _send(pipe, client, bind("a"), EXECUTE, m.SYNC)
    stale = m.error_response("0A000", "cached plan must not change result type", "ERROR")
    assert _answer(pipe, stale, READY) == [stale, READY]
    out = _send(pipe, ClientStatements(), parse("again", "SELECT * FROM t"), m.SYNC)
    assert out[0] == parse("csp_2", "SELECT * FROM t")


def test_max_prepared_statements_is_checked(tmp_path: Path) -> None:
    raw = {"credentials": {"file": "db.json"}}
    assert parse_proxy_config(raw, tmp_path).max_prepared_statements == 200  # PgBouncer's
    assert parse_proxy_config({**raw, "max_prepared_statements": 0}, tmp_path)
    with pytest.raises(ProxyConfigError) as info:
        parse_proxy_config({**raw, "max_prepared_statements": -1}, tmp_path)
    assert info.value.problems == ["proxy.max_prepared_statements: -1 is outside 0..100000"]
