"""Dynamic credentials from OpenBao's database engine for MariaDB (``mysql-database-plugin``)
and Redis (``redis-database-plugin``) through the existing ``database`` kind: leases are
renewed, then replaced at their max TTL, and a consumer that always logs in with the
latest published credentials never fails."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiomysql
import pymysql
import pytest
import redis.asyncio as aioredis
from devservers import AUDIT, MariaDBServer, OpenBaoServer, RedisServer
from redis.exceptions import RedisError

Login = Callable[[str, str], Awaitable[bool]]


@pytest.fixture
def plugin_mount(openbao: OpenBaoServer, unique: str) -> Iterator[Callable[..., str]]:
    """``plugin_mount(plugin, creation_statements, **connection)`` -> a database mount of
    this test's own with role ``app`` (TTL 8 s, max 16 s); disabled afterwards."""
    client = openbao.client()
    mount = f"dbp-{unique}"
    client.sys.enable_secrets_engine("database", path=mount)

    def make(plugin: str, creation: list[str], **connection: Any) -> str:
        client.secrets.database.configure(
            name="target",
            plugin_name=plugin,
            allowed_roles="*",
            verify_connection=True,
            mount_point=mount,
            **connection,
        )
        client.secrets.database.create_role(
            name="app",
            db_name="target",
            creation_statements=creation,
            # long enough that a renewal delayed by a loaded machine still lands in time
            default_ttl="8s",
            max_ttl="16s",
            mount_point=mount,
        )
        return mount

    yield make
    client.sys.disable_secrets_engine(mount)  # revokes what is left


Check = Callable[[str, Login], Awaitable[None]]


@pytest.fixture
def no_failed_logins(make_source: Any, vault: Any, events: Any, until: Any) -> Check:
    """``no_failed_logins(mount, login)``: run a ``database`` source on ``mount``'s role
    through renewals and a replacement while a consumer logs in with ``login``."""

    async def check(mount: str, login: Login) -> None:
        await _no_failed_logins(make_source, vault, mount, events, until, login)

    return check


async def _no_failed_logins(
    make_source: Any, vault: Any, mount: str, events: Any, until: Any, login: Login
) -> None:
    source, published = make_source("db", "database", f"{mount}/creds/app", vault=vault)
    first = await source.start()
    published.values.append(first)
    failures: list[str] = []
    logins: list[str] = []  # the version of each successful login

    async def consumer() -> None:
        while True:
            value = published.values[-1]
            user, password = str(value.data["username"]), str(value.data["password"])
            AUDIT.secret(password)
            if await login(user, password):
                logins.append(value.version)
            else:
                failures.append(value.version)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(source.run())
    consuming = asyncio.create_task(consumer())
    try:
        await until(lambda: events.named("replaced", secret="db"), 30, "a replacement")
        replacement = published.values[-1].version
        await until(lambda: logins.count(replacement) >= 5, 15, "logins with the replacement")
    finally:
        for t in (consuming, task):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await source.close(revoke=True)
    assert len(events.named("renewed", secret="db")) >= 2  # renewed before it was replaced
    assert first.version != replacement and logins.count(first.version) >= 5
    renew_errors = [r.error for r in events.named("renew_failed", secret="db")]
    assert failures == [], (failures, renew_errors)


async def test_mariadb_dynamic_credentials_renew_and_replace_without_a_failed_login(
    mariadb: MariaDBServer, plugin_mount: Callable[..., str], no_failed_logins: Check
) -> None:
    mount = plugin_mount(
        "mysql-database-plugin",
        [
            "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'",
            "GRANT SELECT ON *.* TO '{{name}}'@'%'",
        ],
        connection_url=f"{{{{username}}}}:{{{{password}}}}@tcp(127.0.0.1:{mariadb.port})/",
        username="admin",
        password=mariadb.admin_password,
    )

    async def login(user: str, password: str) -> bool:
        try:
            conn = await aiomysql.connect(
                host="127.0.0.1", port=mariadb.port, user=user, password=password, connect_timeout=5
            )
        except pymysql.MySQLError:
            return False
        await conn.ensure_closed()
        return True

    await no_failed_logins(mount, login)


async def test_redis_dynamic_credentials_renew_and_replace_without_a_failed_login(
    redis_server: RedisServer, plugin_mount: Callable[..., str], no_failed_logins: Check
) -> None:
    mount = plugin_mount(
        "redis-database-plugin",
        [json.dumps(["~*", "+@read", "+@connection"])],
        host="127.0.0.1",
        port=redis_server.port,
        username="admin",
        password=redis_server.admin_password,
    )

    async def login(user: str, password: str) -> bool:
        client = aioredis.Redis(port=redis_server.port, username=user, password=password)
        try:
            return bool(await client.ping())
        except RedisError:
            return False
        finally:
            await client.aclose()

    await no_failed_logins(mount, login)
