"""Clients through the proxy against the real cluster: asyncpg, psql, both pool modes."""

from __future__ import annotations

import asyncpg
import pytest
from proxyhelpers import ProxyFactory, Role, psql


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_asyncpg_queries_through_proxy(
    make_proxy: ProxyFactory, role: Role, mode: str
) -> None:
    proxy = await make_proxy(pool_mode=mode)
    conn = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        assert await conn.fetchval("SELECT current_user") == role.name
        assert await conn.fetchval("SELECT current_database()") == role.database
        rows = await conn.fetch("SELECT g, g * $1::int AS d FROM generate_series(1, 100) g", 3)
        assert [r["d"] for r in rows] == [g * 3 for g in range(1, 101)]
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
            await conn.executemany("INSERT INTO t VALUES ($1)", [(i,) for i in range(10)])
            assert await conn.fetchval("SELECT sum(x) FROM t") == 45
    finally:
        await conn.close()


async def test_psql_through_proxy(make_proxy: ProxyFactory, role: Role) -> None:
    proxy = await make_proxy()
    result = await psql(
        "127.0.0.1",
        str(proxy.port),
        "someone",
        role.database,
        "-c",
        "SELECT current_user",
        "-c",
        "SHOW application_name",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [role.name, "psql"]
