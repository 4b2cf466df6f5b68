"""Credential rotation under load: generations, trial logins, draining."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from devservers import OpenBaoServer, PostgresCluster, configure_database_engine
from proxyhelpers import (
    ProxyFactory,
    Result,
    Role,
    RunningProxy,
    pgbench,
    pgbench_counts,
    wait_until,
    write_credentials,
)
from proxyhelpers import psql as run_psql

from proxy import metrics


async def psql(pg: PostgresCluster, sql: str, db: str = "postgres") -> str:
    """Run ``sql`` as the cluster's superuser; stdout (tuples only)."""
    argv = ("-q", "-v", "ON_ERROR_STOP=1", "-c", sql)
    result = await run_psql(
        "127.0.0.1", pg.port, pg.superuser, db, *argv, env={"PGPASSWORD": pg.password}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def rotate_under_load(
    proxy: RunningProxy, load: asyncio.Task[Result], rotate: Callable[[], Awaitable[None]]
) -> None:
    """Rotate three times while ``load`` runs; it must finish with 0 failed transactions.

    ``rotate`` changes the credentials (and rewrites the proxy's file); each change must
    become the proxy's next generation.
    """
    await wait_until(lambda: proxy.server.status()["pools"], what="pgbench connected")
    for generation in range(2, 5):
        await asyncio.sleep(1.5)
        await rotate()
        await wait_until(
            lambda gen=generation: proxy.server.status()["generation"] == gen, what="switch"
        )
    result = await load
    assert result.returncode == 0, result.stderr + result.stdout
    done, failed = pgbench_counts(result.stdout)
    assert done > 0
    assert failed == 0


def only_current_generation(proxy: RunningProxy) -> list[dict[str, Any]]:
    conns = [c for p in proxy.server.status()["pools"] for c in p["connections"]]
    assert all(c["current"] for c in conns), conns
    return conns


async def rotation_role(pg: PostgresCluster, db_owner: Role) -> tuple[str, str]:
    name = "rot_" + secrets.token_hex(4)
    password = "pw-" + secrets.token_hex(12)
    await psql(pg, f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE pg_read_all_data")
    await psql(pg, f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {name}", db_owner.database)
    return name, password


@pytest.mark.parametrize(
    ("mode", "workload"),
    [("transaction", "-S"), ("session", "-S"), ("transaction", "tpcb")],
)
async def test_alter_role_rotation_under_pgbench(
    make_proxy: ProxyFactory, postgres: PostgresCluster, pgbench_db: Role, mode: str, workload: str
) -> None:
    user, password = await rotation_role(postgres, pgbench_db)
    proxy = await make_proxy(
        creds=(user, password), pool_mode=mode, pool_size=16, drain_timeout="4s"
    )
    args = ["-S"] if workload == "-S" else []
    load = asyncio.create_task(pgbench(proxy.port, pgbench_db.database, *args, seconds=8))

    async def alter_role() -> None:
        password = "pw-" + secrets.token_hex(8)
        await psql(postgres, f"ALTER ROLE {user} PASSWORD '{password}'")
        write_credentials(proxy.creds_file, user, password)

    await rotate_under_load(proxy, load, alter_role)
    # after drain_timeout nothing of an old generation is left, in the proxy or upstream
    await asyncio.sleep(4.5)
    conns = only_current_generation(proxy)
    # a backend the proxy closed may take a moment to leave pg_stat_activity
    sql = f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'"

    async def only_current() -> bool:
        return int(await psql(postgres, sql)) == len(conns)

    await wait_until(only_current, what="no old-generation backend left")


async def test_rejected_credentials_keep_old_generation(
    make_proxy: ProxyFactory, postgres: PostgresCluster, pgbench_db: Role
) -> None:
    user, password = await rotation_role(postgres, pgbench_db)
    proxy = await make_proxy(creds=(user, password))
    before = metrics.generation_rejections_total._value.get()
    conn = await asyncpg.connect(proxy.dsn(db=pgbench_db.database))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        new_password = "pw-new-" + secrets.token_hex(8)
        write_credentials(proxy.creds_file, user, new_password)  # the server does not know it
        await wait_until(
            lambda: metrics.generation_rejections_total._value.get() > before, what="rejection"
        )
        assert proxy.server.status()["generation"] == 1
        assert await conn.fetchval("SELECT 2") == 2  # still served by generation 1
        other = await asyncpg.connect(proxy.dsn(db=pgbench_db.database))
        assert await other.fetchval("SELECT current_user") == user
        await other.close()
        # once the server accepts it, the retry switches
        await psql(postgres, f"ALTER ROLE {user} PASSWORD '{new_password}'")
        await wait_until(lambda: proxy.server.status()["generation"] == 2, what="switch")
        assert await conn.fetchval("SELECT 3") == 3
    finally:
        await conn.close()


async def test_switch_to_another_user(
    make_proxy: ProxyFactory, postgres: PostgresCluster, pgbench_db: Role
) -> None:
    first = await rotation_role(postgres, pgbench_db)
    second = await rotation_role(postgres, pgbench_db)
    proxy = await make_proxy(creds=first)
    conn = await asyncpg.connect(proxy.dsn(db=pgbench_db.database))
    try:
        assert await conn.fetchval("SELECT current_user") == first[0]
        write_credentials(proxy.creds_file, *second)
        await wait_until(lambda: proxy.server.status()["generation"] == 2, what="switch")
        assert await conn.fetchval("SELECT current_user") == second[0]
    finally:
        await conn.close()


async def test_invalid_credentials_file_is_ignored(
    make_proxy: ProxyFactory,
    postgres: PostgresCluster,
    pgbench_db: Role,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="credsidecar.proxy")
    user, password = await rotation_role(postgres, pgbench_db)
    other = await rotation_role(postgres, pgbench_db)
    proxy = await make_proxy(creds=(user, password))
    provider = proxy.server.provider

    def invalid() -> int:
        return sum(r.getMessage() == "proxy_credentials_invalid" for r in caplog.records)

    proxy.creds_file.write_text('{"username": "x", "passw')  # half-written
    await wait_until(lambda: invalid() >= 1, what="half-written file seen")
    proxy.creds_file.write_text('["not", "an", "object"]')
    await wait_until(lambda: invalid() >= 2, what="invalid file seen")
    assert provider.current() is not None
    assert provider.current().generation == 1
    write_credentials(proxy.creds_file, user, password)  # same content: no new generation
    write_credentials(proxy.creds_file, *other)  # then a real change
    await wait_until(lambda: proxy.server.status()["generation"] >= 2, what="switch")
    assert provider.current().generation == 2
    conn = await asyncpg.connect(proxy.dsn(db=pgbench_db.database))
    assert await conn.fetchval("SELECT current_user") == other[0]
    await conn.close()


async def test_session_mode_client_moves_with_its_state(
    make_proxy: ProxyFactory, postgres: PostgresCluster, pgbench_db: Role
) -> None:
    user, password = await rotation_role(postgres, pgbench_db)
    proxy = await make_proxy(creds=(user, password), pool_mode="session", drain_timeout="3s")
    mover = await asyncpg.connect(proxy.dsn(db=pgbench_db.database))
    stayer = await asyncpg.connect(proxy.dsn(db=pgbench_db.database))
    try:
        await mover.execute("SET work_mem = '7MB'")
        await mover.execute("PREPARE sqlprep AS SELECT 40 + $1::int")
        stmt = await mover.prepare("SELECT $1::int * 2")
        await stayer.execute("CREATE TEMP TABLE keep (x int)")
        mover_pid = await mover.fetchval("SELECT pg_backend_pid()")
        stayer_pid = await stayer.fetchval("SELECT pg_backend_pid()")

        password = "pw-moved-" + secrets.token_hex(8)
        await psql(postgres, f"ALTER ROLE {user} PASSWORD '{password}'")
        write_credentials(proxy.creds_file, user, password)
        await wait_until(lambda: proxy.server.status()["generation"] == 2, what="switch")

        # the first transaction after the switch may still run on the old connection;
        # the move happens at a transaction boundary
        async def moved() -> bool:
            return await mover.fetchval("SELECT pg_backend_pid()") != mover_pid

        await wait_until(moved, what="session moved")
        assert await mover.fetchval("SHOW work_mem") == "7MB"
        assert await mover.fetchval("EXECUTE sqlprep(2)") == 42
        assert await stmt.fetchval(21) == 42
        # a session with a temporary table stays where it is, until drain_timeout
        assert await stayer.fetchval("SELECT pg_backend_pid()") == stayer_pid
        assert await stayer.fetchval("SELECT count(*) FROM keep") == 0
        # a query still running at the deadline ends with 57P01 and the reason
        ended = (asyncpg.exceptions.AdminShutdownError, asyncpg.ConnectionDoesNotExistError)
        with pytest.raises(ended, match="drain_timeout"):
            await stayer.fetchval("SELECT pg_sleep(60)")
    finally:
        await mover.close()
        await stayer.close()


async def test_dynamic_openbao_credentials_under_pgbench(
    make_proxy: ProxyFactory, postgres: PostgresCluster, pgbench_db: Role, openbao: OpenBaoServer
) -> None:
    """New users from OpenBao's database engine every ~1.5 s while pgbench -S runs."""
    mount = "dbproxy" + secrets.token_hex(3)
    # long TTLs: revocation (which terminates the user's backends) is the agent's business
    await asyncio.to_thread(
        configure_database_engine,
        openbao,
        postgres,
        role="proxyapp",
        ttl="5m",
        max_ttl="10m",
        mount=mount,
    )
    client = openbao.client()

    async def issue() -> tuple[str, str]:
        secret = await asyncio.to_thread(
            client.secrets.database.generate_credentials, name="proxyapp", mount_point=mount
        )
        return secret["data"]["username"], secret["data"]["password"]

    proxy = await make_proxy(creds=await issue(), pool_size=16, drain_timeout="3s")
    load = asyncio.create_task(pgbench(proxy.port, pgbench_db.database, "-S", seconds=7))
    users = []

    async def new_lease() -> None:
        user, password = await issue()
        users.append(user)
        write_credentials(proxy.creds_file, user, password)

    await rotate_under_load(proxy, load, new_lease)
    await asyncio.sleep(3.5)
    assert proxy.server.status()["user"] == users[-1]
    only_current_generation(proxy)
    old = ", ".join(f"'{u}'" for u in users[:-1])
    sql = f"SELECT count(*) FROM pg_stat_activity WHERE usename IN ({old})"

    async def none_old() -> bool:
        return int(await psql(postgres, sql)) == 0

    await wait_until(none_old, what="no backend of an old user left")


async def test_static_provider_generations_and_repr() -> None:
    from proxy.credentials import StaticCredentialProvider

    provider = StaticCredentialProvider()
    assert provider.current() is None
    waiter = asyncio.create_task(provider.changed())
    await asyncio.sleep(0)
    assert provider.update("u", "hidden-pw")
    got = await asyncio.wait_for(waiter, 5)
    assert (got.username, got.generation) == ("u", 1)
    assert "hidden-pw" not in repr(got)
    assert not provider.update("u", "hidden-pw")  # no change, no new generation
    assert provider.update("u", "other")
    assert provider.current() is not None
    assert provider.current().generation == 2
