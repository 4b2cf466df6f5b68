"""What real drivers found through the proxy (issue 10): fake pids, failed resets, clients
that leave mid-query; each against the real cluster."""

from __future__ import annotations

import asyncio
import logging
import os

import asyncpg
import psycopg
import pytest
from devservers import PostgresCluster
from proxyhelpers import ProxyFactory, Role, connect_direct, pg_tool, wait_until

from proxy import metrics
from proxy.cancel import PID_MAX_LIMIT, CancelKeys
from proxy.upstream import ServerConn


class _Client:
    process_id = 0
    secret_key = 0
    conn: ServerConn | None = None


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_reported_pid_names_no_real_process(
    make_proxy: ProxyFactory, role: Role, mode: str
) -> None:
    """The BackendKeyData pid is above PID_MAX_LIMIT; pg_backend_pid() is the real one."""
    proxy = await make_proxy(pool_mode=mode)
    a = await asyncpg.connect(proxy.dsn(db=role.database))
    dsn = f"host=127.0.0.1 port={proxy.port} user=x password=x dbname={role.database}"
    b = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        told = [a._protocol.backend_pid, b.info.backend_pid]
        assert all(PID_MAX_LIMIT < pid < 1 << 31 for pid in told), told
        assert told[0] != told[1]
        real = await a.fetchval("SELECT pg_backend_pid()")
        assert 0 < real <= PID_MAX_LIMIT
    finally:
        await a.close()
        await b.close()


def test_fake_pids_wrap_inside_their_range() -> None:
    keys = CancelKeys()
    keys._next_pid = (1 << 31) - 2
    pids = []
    for _ in range(3):
        client = _Client()
        client.process_id, client.secret_key = keys.register(client)
        pids.append(client.process_id)
    assert pids == [(1 << 31) - 2, (1 << 31) - 1, PID_MAX_LIMIT + 1]
    # a pid still in use is skipped after the wrap
    keys._next_pid = (1 << 31) - 1
    client = _Client()
    client.process_id, _ = keys.register(client)
    assert client.process_id == PID_MAX_LIMIT + 2


def test_cancel_secrets_are_31_random_bits_across_batches() -> None:
    """The secrets come from os.urandom read in batches: across several batches they
    are non-negative int32s (BackendKeyData is signed), next to never equal (3,079 of
    2^31: a repeat in 1 of ~450 runs, three in 1 of ~10^8), and each of the 31 bits is
    set in about half (a batch restarting at its first bytes, or a shift in the wrong
    place, shows as a thousand repeats or a stuck bit)."""
    keys = CancelKeys()
    secrets_seen = []
    for _ in range(3 * 1024 + 7):
        client = _Client()
        client.process_id, client.secret_key = keys.register(client)
        secrets_seen.append(client.secret_key)
    assert all(0 <= s < 1 << 31 for s in secrets_seen)
    assert len(set(secrets_seen)) >= len(secrets_seen) - 2
    for bit in range(31):
        ones = sum(s >> bit & 1 for s in secrets_seen)
        assert 0.4 < ones / len(secrets_seen) < 0.6, f"bit {bit} set in {ones}"


async def test_a_failed_reset_closes_the_server_connection(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """A reset query that fails for real: the next client gets a fresh server session."""
    proxy = await make_proxy(
        pool_mode="session", pool_size=1, server_reset_query="SELECT no_such_reset_function()"
    )
    failures = metrics.server_reset_failures_total
    before = failures._value.get()
    first = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        await first.execute("SET statement_timeout = '4321s'")
        first_pid = await first.fetchval("SELECT pg_backend_pid()")
    finally:
        await first.close()
    await wait_until(lambda: failures._value.get() == before + 1, what="reset failure counted")
    second = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        assert await second.fetchval("SHOW statement_timeout") == "0"
        assert await second.fetchval("SELECT pg_backend_pid()") != first_pid
    finally:
        await second.close()


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_a_client_killed_mid_query_gets_its_query_cancelled(
    make_proxy: ProxyFactory,
    postgres: PostgresCluster,
    role: Role,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """psql killed during pg_sleep(60): the backend stops being active (it was cancelled
    and its connection closed), instead of sleeping out the minute. The log line names
    the client's address, first looked up after its connection was gone."""
    caplog.set_level(logging.INFO, logger="credsidecar.proxy")
    proxy = await make_proxy(pool_mode=mode)
    left = metrics.cancel_requests_total.labels("client_left")
    before = left._value.get()
    admin = await connect_direct(postgres)
    psql = await asyncio.create_subprocess_exec(
        pg_tool("psql"),
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        str(proxy.port),
        "-U",
        "x",
        "-d",
        role.database,
        "-c",
        "SELECT pg_sleep(60)",
        env={**os.environ, "PGPASSWORD": "x"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )

    async def sleepers() -> int:
        count: int = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1"
            " AND state = 'active' AND query = 'SELECT pg_sleep(60)'",
            role.name,
        )
        return count

    async def no_sleepers() -> bool:
        return await sleepers() == 0

    try:
        await wait_until(sleepers, what="pg_sleep running upstream")
        psql.kill()
        await psql.wait()
        # 20 s: well before the minute the query would otherwise sleep
        await wait_until(no_sleepers, limit=20, what="the backend to stop sleeping")
        assert left._value.get() == before + 1
        (peer,) = [
            getattr(r, "peer", "")
            for r in caplog.records
            if r.getMessage() == "proxy_client_left_mid_query"
        ]
        assert peer.startswith("127.0.0.1:") and int(peer.rpartition(":")[2]) > 0
    finally:
        if psql.returncode is None:
            psql.kill()
            await psql.wait()
        await admin.close()
