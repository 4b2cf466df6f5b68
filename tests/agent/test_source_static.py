"""Static database roles against real OpenBao and PostgreSQL: re-read after rotation."""

from __future__ import annotations

from typing import Any

from devservers import OpenBaoServer, PostgresCluster


async def test_rotated_password_is_published(
    openbao: OpenBaoServer,
    postgres: PostgresCluster,
    database_mount: Any,
    vault: Any,
    unique: str,
    run: Any,
    make_source: Any,
    pg_login: Any,
) -> None:
    user = f"static_{unique}"
    mount = database_mount()
    postgres.psql(f"CREATE ROLE {user} LOGIN PASSWORD 'initial-{unique}'")
    openbao.client().secrets.database.create_static_role(
        "st",
        db_name="pg",
        username=user,
        rotation_statements=["ALTER ROLE \"{{name}}\" WITH PASSWORD '{{password}}';"],
        # long enough that a loaded machine checks the logins below before the next one
        rotation_period=8,
        mount_point=mount,
    )
    try:
        source, published = make_source(
            "st", "database-static", f"{mount}/static-creds/st", vault=vault
        )
        first = await source.start()
        assert first.data["username"] == user
        assert first.expires_at is not None
        assert await pg_login(user, first.data["password"])
        async with run(source):
            second = await published.wait_for(
                lambda v: v.data["password"] != first.data["password"], 40, "a rotation"
            )
        assert second.version != first.version
        assert await pg_login(user, second.data["password"])
        assert not await pg_login(user, first.data["password"])
    finally:
        postgres.psql(f"DROP ROLE IF EXISTS {user}")  # the engine is disabled after the test
