"""The fixtures themselves: real servers that accept real logins."""

from __future__ import annotations

import asyncpg
import pytest
from devservers import OpenBaoServer, PostgresCluster, configure_database_engine, leases_under


async def test_postgres_requires_scram(postgres: PostgresCluster) -> None:
    conn = await asyncpg.connect(postgres.dsn())
    try:
        assert await conn.fetchval("SHOW password_encryption") == "scram-sha-256"
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres.dsn(password="wrong"))


def test_openbao_issues_database_credentials(
    openbao: OpenBaoServer, postgres: PostgresCluster
) -> None:
    configure_database_engine(openbao, postgres, role="fixture", mount="db-fixture")
    creds = openbao.client().secrets.database.generate_credentials(
        "fixture", mount_point="db-fixture"
    )
    assert creds["lease_duration"] == 6
    assert leases_under(openbao, "db-fixture/creds/fixture/") == [creds["lease_id"]]
