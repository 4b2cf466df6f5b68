"""``redis-acl`` against Debian's redis-server: two valid passwords during grace, hashes
only on the wire, ACL SAVE, refusals and roll back, on the shared KV store in OpenBao."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from devservers import AUDIT, FaultRelay, RedisServer
from redis.exceptions import AuthenticationError, ResponseError
from rotatehelpers import config, kv_record, rotation, step_until

from agent.rotate.config import AdminConfig
from agent.rotate.redis import password_sha256
from agent.secret import SecretValue


def admin_of(server: RedisServer) -> SecretValue:
    return SecretValue(
        name="redis_admin",
        data={"username": "admin", "password": server.admin_password},
        version="1",
    )


def acl_config(name: str, store: str, port: int, user: str, **kw: Any) -> Any:
    admin = AdminConfig("redis_admin", port=port, database="")
    return config(name, "redis-acl", store, admin=admin, user=user, every=3600.0, **kw)


async def can_auth(server: RedisServer, user: str, password: str) -> bool:
    client = aioredis.Redis(port=server.port, username=user, password=password)
    try:
        return bool(await client.ping())
    except (AuthenticationError, ResponseError):
        return False
    finally:
        await client.aclose()


def hashes(server: RedisServer, user: str) -> set[str]:
    out = server.command("ACL", "GETUSER", user).splitlines()
    start = out.index("passwords") + 1
    end = out.index("commands")
    return set(out[start:end])


async def test_both_passwords_work_during_grace_and_only_hashes_cross_the_wire(
    redis_server: RedisServer, vault: Any, openbao: Any, unique: str, events: Any, until: Any
) -> None:
    user = f"app-{unique}"
    boot = f"boot-{unique}-password"
    AUDIT.secret(boot)
    redis_server.command("ACL", "SETUSER", user, "on", f">{boot}", "~*", "+@all")
    tap = FaultRelay(redis_server.port)  # every byte the sidecar sends passes through here
    store = f"secret/data/rot-redis-{unique}"
    try:
        rot, published = rotation(
            acl_config("cache", store, tap.port, user, grace=1.0),
            vault,
            admin=admin_of(redis_server),
        )
        first = await rot.rotate_now()
        assert first.ok, first
        one = published.last.data["password"]
        assert published.last.data["username"] == user
        assert await can_auth(redis_server, user, one)
        assert not await can_auth(redis_server, user, boot)  # the first rotation takes over

        second = await rot.rotate_now()
        assert second.ok and second.version == 2, second
        two = published.last.data["password"]
        # within grace the previous password still logs in: consumers switch at leisure
        assert await can_auth(redis_server, user, one) and await can_auth(redis_server, user, two)
        assert hashes(redis_server, user) == {password_sha256(one), password_sha256(two)}
        record = kv_record(openbao, store)
        assert "password" not in record["previous"]  # the store keeps only the old hash
        assert record["previous"]["password_sha256"] == password_sha256(one)

        await step_until(
            until,
            rot,
            lambda: hashes(redis_server, user) == {password_sha256(two)},
            "the previous password to be removed",
        )
        assert not await can_auth(redis_server, user, one)
        assert await can_auth(redis_server, user, two)
        assert events.named("rotation_retired", secret="cache", version=1)

        admin_streams = [bytes(s) for s in tap.sent if b"SETUSER" in s]
        assert admin_streams, "the tap saw no ACL SETUSER"
        wire = b"".join(admin_streams)
        assert password_sha256(two).encode() in wire  # what was sent: the hash
        for password in (one, two):
            assert password.encode() not in wire
    finally:
        tap.close()
        redis_server.command("ACL", "DELUSER", user)


async def test_acl_save_writes_the_acl_file(vault: Any, unique: str) -> None:
    server = RedisServer(aclfile=True).start()
    AUDIT.secret(server.admin_password)
    try:
        server.command("ACL", "SETUSER", "app", "on", "nopass", "~*", "+@all")
        rot, published = rotation(
            acl_config("acl", f"secret/data/rot-redis-file-{unique}", server.port, "app"),
            vault,
            admin=admin_of(server),
        )
        assert (await rot.rotate_now()).ok
        digest = password_sha256(published.last.data["password"])
        saved = server.acl_path.read_text()
        assert f"user app on #{digest}" in saved and "nopass" not in saved
    finally:
        server.remove()


async def test_the_admin_account_and_missing_users_are_refused(
    redis_server: RedisServer, vault: Any, unique: str
) -> None:
    admin = admin_of(redis_server)
    rot, published = rotation(
        acl_config("self", f"secret/data/rot-redis-self-{unique}", redis_server.port, "admin"),
        vault,
        admin=admin,
    )
    outcome = await rot.rotate_now()
    assert outcome.result == "failed" and "the admin secret logs in with" in (outcome.error or "")
    assert await can_auth(redis_server, "admin", redis_server.admin_password)

    missing = f"nobody-{unique}"
    rot, published = rotation(
        acl_config("missing", f"secret/data/rot-redis-none-{unique}", redis_server.port, missing),
        vault,
        admin=admin,
    )
    outcome = await rot.rotate_now()
    assert outcome.result == "failed" and "does not exist" in (outcome.error or "")
    assert not published.values
    assert "User " + missing not in redis_server.command("ACL", "LIST")  # nothing was created


async def test_a_failed_verification_removes_the_new_password(
    redis_server: RedisServer, vault: Any, unique: str, events: Any
) -> None:
    user = f"app-{unique}"
    redis_server.command("ACL", "SETUSER", user, "on", "nopass", "~*", "+@all")
    try:
        rot, published = rotation(
            acl_config("broken", f"secret/data/rot-redis-bad-{unique}", redis_server.port, user),
            vault,
            admin=admin_of(redis_server),
        )
        assert (await rot.rotate_now()).ok
        one = published.last.data["password"]
        redis_server.command("ACL", "SETUSER", user, "off")  # no login can succeed now
        outcome = await rot.rotate_now()
        assert outcome.result == "failed" and "verification" in (outcome.error or "")
        assert events.named("rotation_rolled_back", secret="broken", version=2, undone=True)
        assert hashes(redis_server, user) == {password_sha256(one)}  # the new one is gone
        assert published.last.data["password"] == one and len(published.values) == 1
    finally:
        redis_server.command("ACL", "DELUSER", user)


async def test_tls_to_redis_is_verified(vault: Any, unique: str, tmp_path: Any) -> None:
    from devservers import make_test_pki

    server = RedisServer(tls=True).start()
    AUDIT.secret(server.admin_password)
    try:
        server.command("ACL", "SETUSER", "app", "on", "nopass", "~*", "+@all")
        store = f"secret/data/rot-redis-tls-{unique}"
        admin = AdminConfig("redis_admin", port=server.port, tls=True, ca_cert=server.pki["ca"])
        cfg = config("tls", "redis-acl", store, admin=admin, user="app", every=3600.0)
        rot, published = rotation(cfg, vault, admin=admin_of(server))
        assert (await rot.rotate_now()).ok  # admin and verification logins over TLS
        assert hashes(server, "app") == {password_sha256(published.last.data["password"])}

        other_ca = make_test_pki(tmp_path / "other")["ca"]  # a CA that did not sign it
        wrong = AdminConfig("redis_admin", port=server.port, tls=True, ca_cert=other_ca)
        rot, _ = rotation(
            config("tls2", "redis-acl", store + "-2", admin=wrong, user="app"),
            vault,
            admin=admin_of(server),
        )
        outcome = await rot.rotate_now()
        assert outcome.result == "failed" and "certificate verify failed" in (outcome.error or "")
    finally:
        server.remove()


async def test_a_failed_first_rotation_puts_the_old_passwords_back(
    redis_server: RedisServer, vault: Any, unique: str, events: Any
) -> None:
    user, boot = f"app-{unique}", f"boot-{unique}-password"
    AUDIT.secret(boot)
    redis_server.command("ACL", "SETUSER", user, "off", f">{boot}", "~*", "+@all")
    try:
        cfg = acl_config("first", f"secret/data/rot-redis-first-{unique}", redis_server.port, user)
        rot, published = rotation(cfg, vault, admin=admin_of(redis_server))
        outcome = await rot.rotate_now()  # the user is off: verification cannot succeed
        assert outcome.result == "failed" and not published.values
        assert events.named("rotation_rolled_back", secret="first", version=1, undone=True)
        assert hashes(redis_server, user) == {password_sha256(boot)}
    finally:
        redis_server.command("ACL", "DELUSER", user)
