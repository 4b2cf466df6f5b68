"""Finding 1: the proxy's memory stays bounded under big answers, big requests and
oversized messages before login (peak RSS of a proxy process of its own, from /proc)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from devservers import PostgresCluster, free_port
from prometheus_client import CollectorRegistry
from proxyhelpers import (
    ProxyFactory,
    Role,
    StandaloneProxy,
    WireClient,
    scram_verifier,
    standalone_config,
    wait_until,
    write_credentials,
)

from proxy.config import parse_proxy_config
from proxy.credentials import FileCredentialProvider
from proxy.protocol import messages as m
from proxy.server import ProxyServer
from proxy.transport import SETUP_INBOX, Link

MiB = 1 << 20
ROW = 200_000_000  # bytes in one column of one row
QUERY = 300 * MiB  # bytes of SQL text in one Query
GROWTH = 16 * MiB  # what either may add to the proxy's peak RSS


PERIOD = 1_000_003  # letters repeat with a period no read or buffer size divides


def _pattern(seed: int) -> bytes:
    return bytes(random.Random(seed).choices(b"abcdefghijklmnopqrstuvwxyz", k=PERIOD))


def _blocks(total: int, seed: int) -> Iterator[bytes]:
    """``total`` bytes: the pattern of ``seed`` repeated (a shifted piece would show)."""
    pattern = _pattern(seed)
    for _ in range(total // PERIOD):
        yield pattern
    yield pattern[: total % PERIOD]


async def test_big_row_and_big_query_add_little_to_peak_rss(
    postgres: PostgresCluster, role: Role, tmp_path: Path
) -> None:
    port = free_port()
    config = standalone_config(tmp_path, postgres.port, role, port)
    async with StandaloneProxy(config, port) as proxy:
        client = await WireClient.connect(port, "app", role.database)
        # warm up: a login and a query have run, so only the big messages remain
        client.writer.write(m.query("SELECT 1"))
        await client.rows(lambda _: None)
        before = proxy.peak_rss()

        # a 200 MB row (server -> client), intact
        expected, got = hashlib.md5(), hashlib.md5()
        for block in _blocks(ROW, 1):
            expected.update(block)
        pattern = _pattern(1).decode()
        client.writer.write(
            m.query(f"SELECT left(repeat('{pattern}', {-(-ROW // PERIOD)}), {ROW})")
        )
        assert await client.rows(got.update) == 1
        assert got.hexdigest() == expected.hexdigest()
        after_row = proxy.peak_rss()

        # a 300 MiB Query (client -> server), intact: the server hashes what it got
        sent = hashlib.md5()
        parts = (b"SELECT md5('", *_blocks(QUERY, 2), b"')")
        for part in parts[1:-1]:
            sent.update(part)
        answer: list[bytes] = []
        await client.send_query(iter(parts), sum(map(len, parts)))
        assert await client.rows(answer.append) == 1
        assert b"".join(answer).decode() == sent.hexdigest()
        after_query = proxy.peak_rss()
        await client.close()
    assert proxy.returncode == 0, proxy.stderr.decode()[-2000:]
    assert after_row - before < GROWTH, f"row: {before} -> {after_row}"
    assert after_query - after_row < GROWTH, f"query: {after_row} -> {after_query}"


def _scram_users(tmp_path: Path) -> Path:
    users = tmp_path / "users.txt"
    verifier = scram_verifier("client-secret")
    users.write_text(f'"alice" "{verifier}"\n')
    return users


async def test_oversized_message_before_login_gets_08p01(
    make_proxy: ProxyFactory, role: Role, tmp_path: Path
) -> None:
    """A password message announcing 1 GiB is refused at its header, not buffered."""
    proxy = await make_proxy(
        client_auth={"method": "scram", "users_file": str(_scram_users(tmp_path))}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(m.startup_message({"user": "alice", "database": role.database}))
        head = await reader.readexactly(5)
        assert head[:1] == b"R"  # AuthenticationSASL
        await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
        writer.write(b"p" + (1 << 30).to_bytes(4, "big") + b"n,,n=alice,r=" + b"x" * 4096)
        answer = await reader.read()  # the error, then the proxy closes
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer[:1] == b"E"
    assert b"C08P01\0" in answer


async def test_reading_pauses_while_a_login_waits(make_proxy: ProxyFactory, role: Role) -> None:
    """Bytes a client sends while its login waits for a server connection stay unread
    in the socket beyond a small inbox (before: all of it in the proxy's memory)."""
    proxy = await make_proxy(pool_size=1, pool_timeout="60s")
    holder = await WireClient.connect(proxy.port, "app", role.database)
    holder.writer.write(m.query("BEGIN"))
    await holder.rows(lambda _: None)  # the one server connection is now held
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(m.startup_message({"user": "app", "database": role.database}))
        writer.write(m.query("SELECT 1") * (8 * MiB // 14))  # far beyond any inbox

        def waiting_session_paused() -> bool:
            for session in proxy.server.sessions:
                transport = session.link.transport
                if session.state.value == "login" and transport is not None:
                    return not transport.is_reading()
            return False

        await wait_until(waiting_session_paused, what="login inbox full: reading paused")
        (session,) = [s for s in proxy.server.sessions if s.state.value == "login"]
        assert len(session.link._inbox) < SETUP_INBOX + 512 * 1024
    finally:
        writer.transport.abort()  # megabytes still unsent: do not wait for them
        await writer.wait_closed()
        await holder.close()


def _left_for_the_cycle_collector() -> Counter[str]:
    """The proxy's objects that are unreachable but not yet freed: only the cycle
    collector frees them (a reference cycle), a few hundred logins' worth at a time."""
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collection finds stays in gc.garbage
    try:
        gc.collect()
        return Counter(
            f"{type(o).__module__}.{type(o).__qualname__}"
            for o in gc.garbage
            if type(o).__module__.startswith("proxy.")
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_an_ended_session_is_freed_by_reference_counting(
    postgres: PostgresCluster, role: Role, tmp_path: Path, pool_mode: str
) -> None:
    """A login costs a few dozen objects; if a session and its link, its protocol
    state and its handlers kept each other alive, every login would leave them to the
    cycle collector, whose passes cost more than the rest of a login (callgrind, pgbench
    -S -C: 14,000 of 117,000 instructions). Logins that run in callbacks and logins that
    wait in a task (a setting the server has not yet accepted), each ending with a
    query and a Terminate: none may leave anything behind."""
    creds = tmp_path / "db.json"
    write_credentials(creds, role.name, role.password)
    upstream = {"host": "127.0.0.1", "port": postgres.port, "sslmode": "disable"}
    raw = {"listen": "127.0.0.1:0", "upstream": upstream, "credentials": {"file": str(creds)}}
    config = parse_proxy_config({**raw, "pool_mode": pool_mode, "pool_size": 2}, tmp_path)

    links: list[Link] = []  # the proxy's side of each client, until it is lost

    async def login(server: ProxyServer, application_name: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        client = WireClient(reader, writer)
        user = {"user": role.name, "database": role.database}
        writer.write(m.startup_message({**user, "application_name": application_name}))
        while (await client.message())[0] != b"Z":
            pass
        links.extend(session.link for session in server.sessions)
        writer.write(m.query("SELECT 1"))
        await client.rows(lambda _: None)
        await client.close()

    async def settled(server: ProxyServer) -> None:
        """Every client's link lost and every server connection back in its pool (the
        session mode reset done): nothing of an ended session is still in use."""
        pool = server.manager.pool(role.database)
        await wait_until(lambda: all(link.closed for link in links), what="the links lost")
        await wait_until(lambda: len(pool.idle) == len(pool.conns), what="the pool idle")
        links.clear()  # from here on, only a cycle can keep them

    async def logins() -> Counter[str]:
        server = ProxyServer(config, FileCredentialProvider(creds), CollectorRegistry())
        await server.start()
        try:
            await login(server, "app")  # the pool's connections, opened once
            await login(server, "app")
            await settled(server)
            gc.collect()
            gc.disable()  # no collection may free, unseen, what the test looks for
            for n in range(12):
                # every third client with a setting of its own: a login that waits
                await login(server, f"app{n}" if n % 3 == 0 else "app")
            await settled(server)
            return _left_for_the_cycle_collector()
        finally:
            gc.enable()
            await server.stop(timeout=2.0)

    # the event loop the proxy runs on (proxy/__main__.py)
    assert uvloop.run(logins()) == Counter()
