"""Finding 2: connections are bounded from accept (silent sockets, the cap, open files)."""

from __future__ import annotations

import asyncio
import resource
import sys
from pathlib import Path

import asyncpg
import pytest
from devservers import PostgresCluster, free_port
from proxyhelpers import (
    ProxyFactory,
    Role,
    RunningProxy,
    psql,
    ready_server,
    wait_until,
    write_credentials,
)

from proxy import metrics
from proxy.config import ProxyConfigError, parse_proxy_config
from proxy.listener import RESERVED_FILES, open_file_budget, raise_open_file_limit
from proxy.protocol.statements import StatementNames
from proxy.session import DIRECT_AFTER_READS, ClientSession
from proxy.transport import Link
from proxy.upstream import ServerConn


async def _silent(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_silent_sockets_count_and_time_out(make_proxy: ProxyFactory, role: Role) -> None:
    """Silent sockets fill max_client_conn at once (counted from accept), the next
    connection is refused with 53300 without waiting, and client_login_timeout ends
    the silent ones so that real clients get in again."""
    proxy = await make_proxy(max_client_conn=5, client_login_timeout="1s")
    silent = [await _silent(proxy.port) for _ in range(5)]
    try:
        await wait_until(lambda: len(proxy.server.sessions) == 5, what="5 counted at accept")
        refused = await psql("127.0.0.1", proxy.port, "app", role.database, "-c", "SELECT 1")
        assert refused.returncode != 0
        assert "too many clients" in refused.stderr
        # the silent ones are ended by the login timeout (and told why)
        for reader, _ in silent:
            assert b"login did not complete in time" in await reader.read()
        ok = await asyncpg.connect(proxy.dsn(db=role.database))
        assert await ok.fetchval("SELECT 1") == 1
        await ok.close()
    finally:
        for _, writer in silent:
            writer.close()
            await writer.wait_closed()


async def test_max_client_conn_gives_53300(make_proxy: ProxyFactory, role: Role) -> None:
    proxy = await make_proxy(max_client_conn=2)
    held = [await asyncpg.connect(proxy.dsn(db=role.database)) for _ in range(2)]
    before = metrics.clients_total.counts["refused"]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await asyncpg.connect(proxy.dsn(db=role.database), ssl=False)
        assert metrics.clients_total.counts["refused"] == before + 1
        await held.pop().close()
        await wait_until(lambda: len(proxy.server.sessions) == 1, what="a slot free again")
        again = await asyncpg.connect(proxy.dsn(db=role.database))
        await again.close()
    finally:
        for conn in held:
            await conn.close()


async def _login(proxy: RunningProxy, role: Role) -> tuple[asyncpg.Connection, ClientSession]:
    before = set(proxy.server.sessions)
    conn = await asyncpg.connect(proxy.dsn(db=role.database))
    (session,) = proxy.server.sessions - before
    return conn, session


async def test_logins_wait_in_a_task_only_when_they_must(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """A login with nothing to wait for (trust, a pooled connection at hand that has the
    client's settings) runs in the connection's callbacks: a task per connection costs
    more than the rest of it. One that must wait, for the server to accept settings it
    has not seen or for a connection, goes on in a task; all end logged in."""
    proxy = await make_proxy(pool_size=1)
    # asyncpg's client_encoding 'utf-8': the server must accept it once (a round trip)
    first, session = await _login(proxy, role)
    assert session._login_task is not None
    await first.close()
    again, session = await _login(proxy, role)
    assert session._login_task is None, "a login with nothing to wait for ran a task"
    assert await again.fetchval("SHOW client_encoding") == "UTF8"
    # the only server connection is in a transaction: the next login waits for it
    tx = again.transaction()
    await tx.start()
    waiting = asyncio.create_task(_login(proxy, role))
    await wait_until(lambda: len(proxy.server.sessions) == 2, what="the second login")
    assert not waiting.done()
    await tx.commit()
    third, session = await asyncio.wait_for(waiting, 10)
    assert session._login_task is not None
    assert await third.fetchval("SELECT 1") == 1
    await third.close()
    await again.close()


def _own_attributes(link: Link) -> dict[str, object]:
    # compiled, a Link has no __dict__ until an attribute of its own makes one
    return dict(getattr(link, "__dict__", {}))


def test_a_link_lost_before_it_ran_lets_go_quietly() -> None:
    """A connection that ends before it runs (a CancelRequest, a refused login): its
    connection_lost must not raise (the loop would log it as an error each time)."""
    link = Link()
    link.connection_lost(None)  # nobody to tell yet
    assert link.closed and link.owner is None
    ran = Link()
    # an owner that runs it (as a logged-in server connection does): the shortcut is
    # taken, the owner hears of the end, and both are let go of
    conn = ServerConn(ran, ready_server(), 1, "db", False, StatementNames())
    assert ran.owner is conn and "data_received" in _own_attributes(ran)
    ran.connection_lost(None)
    assert conn.closed and ran.owner is None
    assert "data_received" not in _own_attributes(ran)


async def test_a_living_client_connection_is_read_directly_a_short_one_never(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """Setting the transport to call the session's handler directly costs what a few
    reads save: a client gets it after DIRECT_AFTER_READS reads, a connection for one
    query never does, and queries go on the same either way."""
    proxy = await make_proxy()
    conn, session = await _login(proxy, role)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert "data_received" not in _own_attributes(session.link), "direct after one query"
        for n in range(DIRECT_AFTER_READS + 1):
            assert await conn.fetchval("SELECT $1::int", n) == n
        assert _own_attributes(session.link).get("data_received") == session.link_data
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()


def test_open_file_budget_refuses_what_cannot_fit(tmp_path: Path) -> None:
    config = parse_proxy_config(
        {"credentials": {"file": "db.json"}, "max_client_conn": 10**7}, tmp_path
    )
    with pytest.raises(ProxyConfigError) as info:
        raise_open_file_limit(config, 20)
    (problem,) = info.value.problems
    assert problem.startswith("proxy.max_client_conn: 10000000 clients")
    assert "RLIMIT_NOFILE" in problem
    assert open_file_budget(config, 20) == 10**7 + 40 + RESERVED_FILES


_LOW_LIMIT = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
sys.argv = ["proxy", "-c", sys.argv[1]]
runpy.run_module("proxy", run_name="__main__")
"""


async def test_start_raises_the_soft_limit_or_refuses(
    postgres: PostgresCluster, role: Role, tmp_path: Path
) -> None:
    """At start the soft RLIMIT_NOFILE goes up to the hard one; a max_client_conn that
    cannot fit under the hard limit is refused with an error naming the key."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 4096)
    port = free_port()
    write_credentials(tmp_path / "db.json", role.name, role.password)
    for max_client_conn, ok in ((100, True), (hard, False)):
        (tmp_path / "proxy.yaml").write_text(
            "proxy:\n"
            f"  listen: 127.0.0.1:{port}\n"
            f"  upstream: {{host: 127.0.0.1, port: {postgres.port}, sslmode: disable}}\n"
            "  credentials: {file: db.json}\n"
            f"  max_client_conn: {max_client_conn}\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _LOW_LIMIT.format(soft=256, hard=hard),
            str(tmp_path / "proxy.yaml"),
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            if ok:

                def soft_limit(proc: asyncio.subprocess.Process = proc) -> int | None:
                    for line in Path(f"/proc/{proc.pid}/limits").read_text().splitlines():
                        if line.startswith("Max open files"):
                            return int(line.split()[3])
                    return None

                async def serving() -> bool:
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        return False
                    writer.close()
                    await writer.wait_closed()
                    return True

                await wait_until(serving, what="proxy serving")
                assert soft_limit() == hard
                proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if not ok:
            assert proc.returncode != 0
            assert b"proxy.max_client_conn" in err and b"RLIMIT_NOFILE" in err, err
