"""Issue 10, findings 3 and 8: segments, Syncs and errors in flight.

A server connection is the client's until the ReadyForQuery that answers its last Sync
(a segment ended by Flush, or failed before its Sync, is still open); after an error the
server ignores everything up to the segment's Sync, and so does the proxy's bookkeeping.
Each live test sends the same requests straight to PostgreSQL and through the proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import psycopg
import pytest
from devservers import PostgresCluster, free_port
from proxyhelpers import (
    ProxyFactory,
    Role,
    RunningProxy,
    StandaloneProxy,
    connect_direct,
    frames_of,
    wait_until,
    write_credentials,
)

from proxy import metrics
from proxy.config import ProxyConfigError, parse_proxy_config
from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol.auth import UpstreamAuthenticator
from proxy.protocol.backend import ServerConnection
from proxy.protocol.pipeline import (
    _FWD_QUERY,
    CLOSED,
    FAILED,
    OPEN,
    Pipeline,
    between_transactions,
)
from proxy.protocol.statements import ClientStatements, StatementNames
from proxy.watchdog import MIN_TICK, Watchdog, tick_interval

MODES = ["transaction", "session"]


# --- raw protocol ------------------------------------------------------------------


def parse(sql: str, name: str = "") -> bytes:
    return m.message(b"P", m.cstr(name) + m.cstr(sql) + b"\0\0")


def bind(stmt: str = "") -> bytes:
    return m.message(b"B", b"\0" + m.cstr(stmt) + b"\0\0\0\0\0\0")


DESCRIBE = m.message(b"D", b"S\0")
DESCRIBE_PORTAL = m.message(b"D", b"P\0")
EXECUTE = m.message(b"E", b"\0\0\0\0\0")
FLUSH = m.message(b"H")


def run(sql: str) -> bytes:
    return parse(sql) + bind() + DESCRIBE_PORTAL + EXECUTE


class Wire:
    """A bare protocol client: what it reads is kept as whole messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def message(self) -> bytes:
        head = await asyncio.wait_for(self.reader.readexactly(5), 20)
        return head + await self.reader.readexactly(int.from_bytes(head[1:], "big") - 4)

    async def until(self, kind: bytes, count: int = 1) -> list[bytes]:
        """Messages up to and including the ``count``-th of type ``kind``."""
        got: list[bytes] = []
        while count:
            got.append(await self.message())
            count -= got[-1][:1] == kind
        return got

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def close(self) -> None:
        self.writer.write(m.TERMINATE)
        self.writer.close()
        await self.writer.wait_closed()


@asynccontextmanager
async def wire(port: int, user: str, password: str, database: str) -> AsyncIterator[Wire]:
    """Logged in with SCRAM (PostgreSQL) or trust (the proxy)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Wire(reader, writer)
    proto = ServerConnection()
    auth = UpstreamAuthenticator(user, password, cleartext_allowed=False)
    writer.write(proto.send(m.StartupMessage({"user": user, "database": database})))
    try:
        while True:
            data = await client.message()
            proto.receive_data(data)
            event = proto.next_event()
            if isinstance(event, ev.AuthenticationRequest):
                reply = auth.respond(event)
                if reply is not None:
                    writer.write(proto.send(reply))
            elif data[:1] == b"Z":
                break
            assert data[:1] != b"E", data
        yield client
    finally:
        await client.close()


def direct(postgres: PostgresCluster, role: Role) -> AsyncIterator[Wire]:
    return wire(postgres.port, role.name, role.password, role.database)


def proxied(proxy: RunningProxy, role: Role) -> AsyncIterator[Wire]:
    return wire(proxy.port, "app", "x", role.database)


async def answers(client: Wire, steps: list[tuple[bytes, int]]) -> list[bytes]:
    """Send each step's bytes, read until its count of ReadyForQuery (0: until the
    first ErrorResponse, the answer to a Flush-ended segment)."""
    got: list[bytes] = []
    for data, syncs in steps:
        client.send(data)
        got += await (client.until(b"Z", syncs) if syncs else client.until(b"E"))
    return got


def kinds(messages: list[bytes]) -> str:
    return "".join(chr(x[0]) for x in messages)


BAD = "SELECT no_such_column FROM pg_class"
STEPS = {
    # three segments in one write, the second fails at its Parse
    "three_segments": [
        (run("SELECT 1") + m.SYNC + run(BAD) + m.SYNC + run("SELECT 3") + m.SYNC, 3)
    ],
    # the error before its Sync is even sent: the rest of the segment comes later
    "failed_then_sync": [
        (parse(BAD) + FLUSH, 0),
        (bind() + EXECUTE + run("SELECT 2") + m.SYNC + run("SELECT 3") + m.SYNC, 2),
    ],
    # an error at Execute, with further segments and a simple Query queued behind it
    "execute_error": [
        (run("SELECT 1/0") + run("SELECT 2") + m.SYNC + m.query("SELECT 4") + run("SELECT 5"), 2),
        (m.SYNC, 1),
    ],
    # a named statement prepared in the failed part of a segment does not exist after it
    "ignored_parse": [
        (parse(BAD) + FLUSH, 0),
        (parse("SELECT 7", "st") + m.SYNC, 1),
        (bind("st") + EXECUTE + m.SYNC, 1),
    ],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(STEPS))
async def test_pipelined_errors_answer_like_postgresql(
    make_proxy: ProxyFactory, postgres: PostgresCluster, role: Role, mode: str, case: str
) -> None:
    """The same bytes, straight and through the proxy: the same answer, byte for byte."""
    proxy = await make_proxy(pool_mode=mode, pool_size=1)
    async with direct(postgres, role) as straight:
        expected = await answers(straight, STEPS[case])
    async with proxied(proxy, role) as through:
        got = await answers(through, STEPS[case])
        # and the connection is sound afterwards
        after = await answers(through, [(run("SELECT 9") + m.SYNC, 1)])
    assert kinds(got) == kinds(expected)
    assert got == expected
    assert kinds(after) == "12TDCZ"


async def test_flush_ended_segment_keeps_the_server_connection(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """Parse/Describe/Flush, a wait, Bind/Execute/Sync: a competing client waits for the
    Sync's ReadyForQuery instead of taking the connection (and the unnamed statement)."""
    proxy = await make_proxy(pool_size=1)
    other = await asyncpg.connect(proxy.dsn(db=role.database))  # logs in, then lets go
    async with proxied(proxy, role) as first:
        first.send(parse("SELECT $1::int + 1") + DESCRIBE + FLUSH)
        assert kinds(await first.until(b"T")) == "1tT"
        try:
            competing = asyncio.create_task(other.fetchval("SELECT 42"))

            def waiting() -> bool:
                return competing.done() or proxy.server.status()["pools"][0]["waiting"] == 1

            await wait_until(waiting, what="the competing client waits")
            assert not competing.done(), "the competing client took a connection mid-segment"
            first.send(m.message(b"B", b"\0\0\0\0\0\1\0\0\0\0016\0\0") + EXECUTE + m.SYNC)
            got = await first.until(b"Z")
            assert kinds(got) == "2DCZ"
            assert got[1] == m.message(b"D", b"\0\1\0\0\0\0017")  # 6 + 1
            assert await asyncio.wait_for(competing, 20) == 42
        finally:
            await asyncio.wait_for(other.close(), 20)


@asynccontextmanager
async def competitor(proxy: RunningProxy, role: Role) -> AsyncIterator[list[int]]:
    """Another client running queries in a loop; yields how many it finished."""
    done = [0]
    conn = await asyncpg.connect(proxy.dsn(db=role.database))

    async def loop() -> None:
        while True:
            assert await conn.fetchval("SELECT 5") == 5
            done[0] += 1

    task = asyncio.create_task(loop())
    try:
        await wait_until(lambda: done[0] > 0 or task.done(), what="the competitor runs")
        yield done
        assert not task.done(), task.exception()
        seen = done[0]
        await wait_until(lambda: done[0] > seen or task.done(), what="the competitor still runs")
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.wait_for(conn.close(), 20)


async def test_asyncpg_error_at_prepare_then_a_good_query(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """Transaction mode, one server connection, a competing client: a misspelt column
    fails, the next query works, close() returns."""
    proxy = await make_proxy(pool_size=1)
    async with competitor(proxy, role):
        conn = await asyncpg.connect(proxy.dsn(db=role.database))
        try:
            for _ in range(3):
                with pytest.raises(asyncpg.UndefinedColumnError):
                    await asyncio.wait_for(conn.fetch(BAD), 20)
                assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 20) == 1
        finally:
            await asyncio.wait_for(conn.close(), 20)


async def test_psycopg_error_then_a_good_query(make_proxy: ProxyFactory, role: Role) -> None:
    proxy = await make_proxy(pool_size=1)
    dsn = f"host=127.0.0.1 port={proxy.port} user=app password=x dbname={role.database}"
    async with competitor(proxy, role):
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        try:
            for prepare in (False, True):
                with pytest.raises(psycopg.errors.UndefinedColumn):
                    await asyncio.wait_for(conn.execute(BAD, prepare=prepare), 20)
                cur = await asyncio.wait_for(conn.execute("SELECT 1", prepare=prepare), 20)
                assert await cur.fetchone() == (1,)
        finally:
            await asyncio.wait_for(conn.close(), 20)


async def _psycopg_pipeline(dsn: str, autocommit: bool) -> list[str]:
    """What psycopg's pipeline mode reports for each step of a pipeline with an error."""
    seen: list[str] = []
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit)
    try:

        async def step(sql: str) -> None:
            try:
                cur = await conn.execute(sql)
                seen.append(repr(await cur.fetchall()))
            except psycopg.Error as exc:
                seen.append(type(exc).__name__)

        async with conn.pipeline() as pipeline:
            await step("SELECT 1")
            await step(BAD)
            await step("SELECT 3")
            try:
                await pipeline.sync()
                seen.append("synced")
            except psycopg.Error as exc:
                seen.append(f"sync: {type(exc).__name__}")
            await step("SELECT 4")
        await step("SELECT 5")
        seen.append(str(conn.info.transaction_status))
    finally:
        await asyncio.wait_for(conn.close(), 20)
    return seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("autocommit", [True, False])
async def test_psycopg_pipeline_mode_with_an_error(
    make_proxy: ProxyFactory, postgres: PostgresCluster, role: Role, mode: str, autocommit: bool
) -> None:
    """PipelineAborted for the rest of the segment, recovery after the Sync: as direct."""
    # session mode: each client has a server connection of its own
    proxy = await make_proxy(pool_mode=mode, pool_size=1 if mode == "transaction" else 2)
    straight = (
        f"host=127.0.0.1 port={postgres.port} user={role.name} "
        f"password={role.password} dbname={role.database}"
    )
    through = f"host=127.0.0.1 port={proxy.port} user=app password=x dbname={role.database}"
    expected = await _psycopg_pipeline(straight, autocommit)
    assert "PipelineAborted" in expected  # the case this test is about
    async with competitor(proxy, role):
        assert await asyncio.wait_for(_psycopg_pipeline(through, autocommit), 30) == expected


# --- the bookkeeping alone (sans I/O) ------------------------------------------------


def _send(pipe: Pipeline, data: bytes) -> bytes:
    out: list[bytes] = []
    pipe.client_frames(data, frames_of(data), ClientStatements(), out)
    return b"".join(out)


def _answer(pipe: Pipeline, data: bytes) -> bytes:
    out: list[bytes] = []
    pipe.server_frames(data, frames_of(data), out)
    return b"".join(out)


def test_segment_states() -> None:
    pipe = Pipeline(StatementNames(), {})
    assert pipe.segment == CLOSED
    _send(pipe, parse("SELECT 1") + DESCRIBE + FLUSH)
    assert pipe.segment == OPEN
    _answer(pipe, m.PARSE_COMPLETE + m.message(b"t", b"\0\0") + m.message(b"n"))
    assert not pipe.queue and not between_transactions(pipe, b"I")  # Flush: still open
    _send(pipe, bind() + EXECUTE + m.SYNC)
    assert pipe.segment == CLOSED and not between_transactions(pipe, b"I")
    _answer(pipe, m.message(b"2") + m.message(b"C", b"SELECT 1\0") + m.ready_for_query(b"I"))
    assert between_transactions(pipe, b"I")
    _send(pipe, m.SYNC + FLUSH)  # a Flush alone opens nothing
    _answer(pipe, m.ready_for_query(b"I"))
    assert between_transactions(pipe, b"I")


def test_error_before_its_sync_ignores_up_to_the_sync() -> None:
    pipe = Pipeline(StatementNames(), {})
    _send(pipe, parse("x", "named") + bind("named") + FLUSH)
    error = m.error_response("42601", "syntax error", "ERROR")
    assert _answer(pipe, error) == error
    assert pipe.segment == FAILED and not pipe.queue and not between_transactions(pipe, b"I")
    # ignored by the server: forwarded as they are, never queued, Parse not remembered
    later = parse("SELECT 1", "other") + bind("other") + EXECUTE + m.query("SELECT 1")
    assert _send(pipe, later) == later
    assert not pipe.queue and pipe.segment == FAILED
    assert _send(pipe, m.SYNC + m.query("SELECT 2")) == m.SYNC + m.query("SELECT 2")
    assert pipe.segment == CLOSED and len(pipe.queue) == 2
    _answer(pipe, m.ready_for_query(b"I"))
    _answer(pipe, m.message(b"C", b"SELECT 1\0") + m.ready_for_query(b"I"))
    assert between_transactions(pipe, b"I")
    assert not pipe.prepared  # the failed Parse was forgotten, the ignored one never seen


def test_parse_skipped_after_an_error_is_not_prepared() -> None:
    """A named Parse queued behind the failing request never ran on the server: the
    next client with that text must get a real Parse, not a faked ParseComplete."""
    names = StatementNames()
    pipe = Pipeline(names, {})
    _send(pipe, run("SELECT 1/0") + parse("SELECT 7", "st") + m.SYNC)
    error = m.error_response("22012", "division by zero", "ERROR")
    _answer(pipe, m.PARSE_COMPLETE + m.message(b"2") + m.message(b"n") + error)
    _answer(pipe, m.ready_for_query(b"I"))
    assert not pipe.prepared
    assert _send(pipe, parse("SELECT 7", "mine")) == parse(
        "SELECT 7", names.name_for(b"SELECT 7\0\0\0")
    )


# --- finding 10: hangs are not silent --------------------------------------------------


def _records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


async def test_an_overdue_answer_is_logged_and_counted(
    make_proxy: ProxyFactory,
    postgres: PostgresCluster,
    role: Role,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A query stuck behind a lock: past hang_warning_timeout, one log line and one count."""
    proxy = await make_proxy(hang_warning_timeout="200ms")
    overdue = metrics.overdue_answers_total
    before = overdue._value.get()
    admin = await connect_direct(postgres, role)
    client = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        await admin.execute("CREATE TABLE IF NOT EXISTS hang_lock (x int)")
        locker = admin.transaction()
        await locker.start()
        await admin.execute("LOCK TABLE hang_lock")
        stuck = asyncio.create_task(client.fetchval("SELECT count(*) FROM hang_lock"))
        await wait_until(lambda: overdue._value.get() > before, what="overdue answer counted")
        [record] = _records(caplog, "proxy_answer_overdue")
        assert record.db == role.database and record.outstanding >= 1  # type: ignore[attr-defined]
        assert record.waited_s >= 0.2 and record.status == "I"  # type: ignore[attr-defined]
        assert role.password not in repr(record.__dict__)
        await locker.rollback()
        assert await asyncio.wait_for(stuck, 20) == 0
        assert overdue._value.get() == before + 1  # once per stall
    finally:
        await asyncio.wait_for(client.close(), 20)
        await admin.close()


@pytest.mark.parametrize("mode", MODES)
async def test_an_idle_transaction_is_logged_then_closed(
    make_proxy: ProxyFactory,
    postgres: PostgresCluster,
    role: Role,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    """A client silent inside a transaction: warned at hang_warning_timeout, then at
    idle_transaction_timeout it gets 25P03 and its server connection is closed."""
    proxy = await make_proxy(
        pool_mode=mode, hang_warning_timeout="100ms", idle_transaction_timeout="400ms"
    )
    idle = metrics.idle_transactions_total
    warned, closed = idle.labels("warned")._value.get(), idle.labels("closed")._value.get()
    async with proxied(proxy, role) as client:
        client.send(m.query("BEGIN; SELECT pg_backend_pid()"))
        answer = await client.until(b"Z")
        assert answer[-1] == m.ready_for_query(b"T")
        pid = int(answer[-3][11:])  # the DataRow's one text value
        await wait_until(
            lambda: idle.labels("closed")._value.get() > closed, what="idle transaction closed"
        )
        assert idle.labels("warned")._value.get() == warned + 1
        assert _records(caplog, "proxy_idle_in_transaction")
        [record] = _records(caplog, "proxy_idle_transaction_timeout")
        assert record.backend_pid == pid  # type: ignore[attr-defined]
        error = await client.message()
        assert b"SFATAL\0" in error and b"C25P03\0" in error
        assert await client.reader.read() == b""  # and the connection is closed
    admin = await connect_direct(postgres)
    try:

        async def gone() -> bool:
            found = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid=$1", pid)
            return bool(found == 0)

        await wait_until(gone, what="the server connection closed")
    finally:
        await admin.close()


class _Stub:
    """Just what the watchdog reads of a session and its server connection."""

    def __init__(self, status: bytes = b"I", queued: int = 0) -> None:
        self.reads = 0
        self.peer = "stub"
        self.client_paused = False
        self.closed = False
        self.database = "db"
        self.backend_key = None
        self.pipeline = Pipeline(StatementNames(), {})
        self.pipeline.queue.extend([_FWD_QUERY] * queued)
        self.proto = SimpleNamespace(transaction_status=status)
        self.conn = self
        self.ended: list[str] = []
        self.sessions: set[_Stub] = set()

    def fatal(self, sqlstate: str, text: str) -> None:
        self.ended.append(sqlstate)
        self.conn = None  # type: ignore[assignment]
        self.sessions.discard(self)  # as ClientSession.close unregisters itself


def test_watchdog_judges_stalls_not_traffic() -> None:
    owed, busy, idle, free = _Stub(queued=1), _Stub(queued=1), _Stub(b"T"), _Stub()
    sessions = {owed, busy, idle, free}
    for stub in sessions:
        stub.sessions = sessions
    server = SimpleNamespace(
        sessions=sessions,
        config=SimpleNamespace(hang_warning_timeout=1.0, idle_transaction_timeout=3.0),
    )
    dog = Watchdog(server)  # type: ignore[arg-type]
    assert dog.interval == 0.25
    before = metrics.overdue_answers_total._value.get()
    warned = metrics.idle_transactions_total.labels("warned")._value.get()
    for now in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
        busy.reads += 1  # answers keep coming: never a stall
        dog.tick(now)
    assert metrics.overdue_answers_total._value.get() == before + 1  # owed: once
    assert metrics.idle_transactions_total.labels("warned")._value.get() == warned + 1
    assert idle.ended == ["25P03"] and not owed.ended and not free.ended
    assert tick_interval(0, 0) is None and tick_interval(0.1, 0) == MIN_TICK


def test_hang_settings_are_checked(tmp_path: Path) -> None:
    raw = {"credentials": {"file": "db.json"}, "idle_transaction_timeout": "soon"}
    with pytest.raises(ProxyConfigError) as caught:
        parse_proxy_config({**raw, "hang_warning_timeout": -1}, tmp_path)
    assert caught.value.problems == [
        "proxy.hang_warning_timeout: -1 is negative",
        'proxy.idle_transaction_timeout: "soon" is not a duration (use 200ms, 30s, 5m, 1h)',
    ]
    defaults = parse_proxy_config({"credentials": {"file": "db.json"}}, tmp_path)
    assert (defaults.hang_warning_timeout, defaults.idle_transaction_timeout) == (60.0, 0.0)


# --- COPY: a message streaming through stays with its server connection --------------


def copy_data(payload: bytes) -> bytes:
    return m.message(b"d", payload)


async def test_copy_data_tail_after_the_error_stays_on_its_connection(
    make_proxy: ProxyFactory, postgres: PostgresCluster, role: Role
) -> None:
    """The server fails a COPY while a big CopyData is half forwarded. Its tail must
    follow its head: on another server connection the tail's bytes would be read as
    messages, and a client's data would run as SQL (here a CREATE TABLE)."""
    admin = await connect_direct(postgres, role)
    await admin.execute("CREATE TABLE IF NOT EXISTS copy_check (x int CHECK (x >= 0))")
    await admin.execute("DROP TABLE IF EXISTS injected_by_copy")
    proxy = await make_proxy(pool_size=1)
    other = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        async with proxied(proxy, role) as client:
            client.send(m.query("COPY copy_check FROM STDIN"))
            assert kinds(await client.until(b"G")) == "G"
            competing = asyncio.create_task(other.fetchval("SELECT 1"))
            await wait_until(
                lambda: proxy.server.status()["pools"][0]["waiting"] == 1, what="competitor waits"
            )
            injected = m.query("CREATE TABLE injected_by_copy ()")
            head_part = b"#" * 65536
            tail = injected + m.SYNC * 80_000  # well past message_buffer: it streams
            big = copy_data(head_part + tail)
            client.send(copy_data(b"-1\n") + big[: 5 + len(head_part)])
            got = await client.until(b"Z")
            assert kinds(got) == "EZ" and b"C23514\0" in got[0]  # check_violation
            client.send(big[5 + len(head_part) :] + m.message(b"c"))
            assert await asyncio.wait_for(competing, 20) == 1
            client.send(run("SELECT 2") + m.SYNC)
            assert kinds(await client.until(b"Z")) == "12TDCZ"
        exists = await admin.fetchval("SELECT to_regclass('injected_by_copy') IS NOT NULL")
        assert not exists, "COPY data reached another server connection as SQL"
    finally:
        await asyncio.wait_for(other.close(), 20)
        await admin.close()


MiB = 1 << 20


async def _copy_into_locked(client: Wire, admin: asyncpg.Connection) -> tuple[str, int, int]:
    """COPY (bad first row) into a table another session has locked, data streamed
    without waiting: (what the client read once the lock went, bytes sent by the time
    the client was paused, bytes sent when the error arrived)."""
    total = 1 << 30  # never sent whole: the client is paused, then told it failed
    sent, stop = [0], asyncio.Event()
    rows = copy_data(b"1\n" * (MiB // 2))

    async def sender() -> None:
        client.send(m.query("COPY copy_slow FROM STDIN") + copy_data(b"-1\n"))
        while sent[0] < total and not stop.is_set():
            client.send(rows)
            sent[0] += len(rows)
            await client.writer.drain()

    locker = admin.transaction()
    await locker.start()
    await admin.execute("LOCK TABLE copy_slow")
    task = asyncio.create_task(sender())
    try:
        last = [-1]

        def paused() -> bool:
            was, last[0] = last[0], sent[0]
            return sent[0] >= MiB and sent[0] == was

        await wait_until(paused, what="the client is paused")
        at_pause = sent[0]
        await locker.rollback()
        got = await client.until(b"Z")
        at_error = sent[0]
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    client.send(m.message(b"c") + run("SELECT 8") + m.SYNC)  # CopyDone: dropped
    assert kinds(await client.until(b"Z")) == "12TDCZ"
    return kinds(got), at_pause, at_error


@pytest.mark.parametrize("mode", MODES)
async def test_copy_to_a_blocked_server_is_paused_and_fails_promptly(
    postgres: PostgresCluster, role: Role, tmp_path: Path, mode: str
) -> None:
    """The server waits on a lock: the client streaming COPY data is paused (the proxy's
    peak RSS barely moves), and once the COPY fails on its first row the client hears it
    at once, long before it could have sent its stream: as with PostgreSQL directly."""
    admin = await connect_direct(postgres, role)
    try:
        await admin.execute("CREATE TABLE IF NOT EXISTS copy_slow (x int CHECK (x >= 0))")
        async with direct(postgres, role) as straight:
            expected, _, _ = await _copy_into_locked(straight, admin)
        assert expected == "GEZ"
        port = free_port()
        write_credentials(tmp_path / "db.json", role.name, role.password)
        (tmp_path / "proxy.yaml").write_text(
            "proxy:\n"
            f"  listen: 127.0.0.1:{port}\n"
            f"  upstream: {{host: 127.0.0.1, port: {postgres.port}, sslmode: disable}}\n"
            "  credentials: {file: db.json}\n"
            f"  pool_mode: {mode}\n"
        )
        proxy = StandaloneProxy(tmp_path / "proxy.yaml", port)
        async with proxy, wire(port, "app", "x", role.database) as client:
            client.send(run("SELECT 1") + m.SYNC)  # warm up
            await client.until(b"Z")
            before = proxy.peak_rss()
            got, at_pause, at_error = await _copy_into_locked(client, admin)
            after = proxy.peak_rss()
        assert proxy.returncode == 0, proxy.stderr.decode()[-2000:]
    finally:
        await admin.close()
    assert got == expected
    assert at_pause < 64 * MiB, f"{at_pause} bytes went in before the client was paused"
    assert after - before < 16 * MiB, f"peak RSS {before} -> {after}"
    assert at_error < 1 << 30


@pytest.mark.parametrize("mode", MODES)
async def test_copy_data_streamed_after_the_copy_failed_reaches_no_server(
    make_proxy: ProxyFactory, role: Role, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The COPY failed and, in transaction pooling, its connection went back to the pool
    between two CopyData messages; the client still streams one too big to be held. Its
    head and every piece after it are dropped, as the server would drop them: sent to
    a server connection, a piece would be read as a message of its own (FATAL 08P01)."""
    caplog.set_level(logging.INFO, logger="credsidecar.proxy")
    proxy = await make_proxy(pool_mode=mode, pool_size=1)
    connects = metrics.server_connects_total.labels("ok")
    async with proxied(proxy, role) as client:
        client.send(m.query("CREATE TABLE IF NOT EXISTS copy_tail (x int CHECK (x >= 0))"))
        await client.until(b"Z")
        before = connects._value.get()
        client.send(m.query("COPY copy_tail FROM STDIN") + copy_data(b"-1\n"))
        assert kinds(await client.until(b"Z")) == "GEZ"
        # several reads whatever the socket buffers: the pieces after the first
        client.send(copy_data(b"1\n" * (2 * MiB)))
        client.send(m.message(b"c") + run("SELECT 8") + m.SYNC)  # CopyDone: dropped
        assert kinds(await client.until(b"Z")) == "12TDCZ"
    assert not _records(caplog, "proxy_server_ended_session")
    assert connects._value.get() == before  # the one connection served it all


async def hold_the_only_connection(proxy: RunningProxy, holder: asyncpg.Connection) -> None:
    """``holder`` takes the pool's one server connection into a transaction; from then
    on the proxy's pool_timeout is 300 ms. Not before: opening that connection (a
    PostgreSQL login, the client's login waits for it) can take longer than that on a
    loaded machine, and the test would fail before it began."""
    await holder.execute("BEGIN")
    proxy.server.config = replace(proxy.server.config, pool_timeout=0.3)


async def test_the_rest_of_a_refused_query_reaches_no_server(
    make_proxy: ProxyFactory, role: Role, caplog: pytest.LogCaptureFixture
) -> None:
    """A Query too big to be held was refused (no server connection within
    pool_timeout) while its head was in; what follows of it once a connection is free
    is dropped, not sent as if it were a message of its own."""
    caplog.set_level(logging.INFO, logger="credsidecar.proxy")
    proxy = await make_proxy(pool_size=1)
    holder = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        async with proxied(proxy, role) as client:
            await hold_the_only_connection(proxy, holder)
            big = m.query("SELECT 1 -- " + "x" * MiB)
            client.send(big[:4096])
            refused = await client.until(b"Z")
            assert kinds(refused) == "EZ" and b"C08006\0" in refused[0]
            await holder.execute("ROLLBACK")
            client.send(big[4096:] + run("SELECT 4") + m.SYNC)
            assert kinds(await client.until(b"Z")) == "12TDCZ"
    finally:
        await asyncio.wait_for(holder.close(), 20)
    assert not _records(caplog, "proxy_server_ended_session")


async def test_segments_the_proxy_refuses_are_answered_like_failed_ones(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """No server connection within pool_timeout: each segment in flight gets its error
    and its Sync's ReadyForQuery, a segment still open swallows what follows up to its
    Sync, and the session carries on once a connection is free."""
    proxy = await make_proxy(pool_size=1)
    holder = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        async with proxied(proxy, role) as client:
            await hold_the_only_connection(proxy, holder)
            client.send(run("SELECT 1") + m.SYNC + run("SELECT 2"))
            first = await client.until(b"E", 2)
            client.send(bind() + EXECUTE + m.SYNC + run("SELECT 3") + m.SYNC)
            second = await client.until(b"Z", 2)
            assert kinds(first) + kinds(second) == "EZE" + "ZEZ"
            assert all(b"C08006\0" in x for x in first + second if x[:1] == b"E")
            await holder.execute("ROLLBACK")
            client.send(run("SELECT 4") + m.SYNC)
            assert kinds(await client.until(b"Z")) == "12TDCZ"
    finally:
        await asyncio.wait_for(holder.close(), 20)


async def _executemany_with_an_early_error(conn: asyncpg.Connection) -> list[str]:
    """A long executemany whose third row breaks a CHECK: what asyncpg reports."""
    seen = []
    rows = [(i,) for i in range(20_000)]
    rows[2] = (-1,)
    try:
        await conn.executemany("INSERT INTO many_check VALUES ($1)", rows)
        seen.append("inserted")
    except asyncpg.PostgresError as exc:
        seen.append(type(exc).__name__)
    seen.append(repr(await conn.fetchval("SELECT count(*) FROM many_check WHERE x < 0")))
    return seen


@pytest.mark.parametrize("mode", MODES)
async def test_a_long_executemany_with_an_early_error(
    make_proxy: ProxyFactory, postgres: PostgresCluster, role: Role, mode: str
) -> None:
    """asyncpg pipelines the Bind/Execute pairs of executemany behind one Sync: the
    error ends the segment, the rest is ignored, and the connection carries on."""
    admin = await connect_direct(postgres, role)
    try:
        await admin.execute("CREATE TABLE IF NOT EXISTS many_check (x int CHECK (x >= 0))")
        expected = await _executemany_with_an_early_error(admin)
    finally:
        await admin.close()
    assert expected == ["CheckViolationError", "0"]
    proxy = await make_proxy(pool_mode=mode, pool_size=1 if mode == "transaction" else 2)
    async with competitor(proxy, role):
        conn = await asyncpg.connect(proxy.dsn(db=role.database))
        try:
            assert await asyncio.wait_for(_executemany_with_an_early_error(conn), 30) == expected
        finally:
            await asyncio.wait_for(conn.close(), 20)
