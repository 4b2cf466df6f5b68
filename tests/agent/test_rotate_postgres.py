"""PostgreSQL rotations against a real cluster and a real KV v2 store in OpenBao."""

from __future__ import annotations

import time
from typing import Any

import pytest
from devservers import AUDIT, OpenBaoServer, PostgresCluster
from rotatehelpers import (
    but,
    can_login,
    kv_record,
    looping,
    pg_config,
    rotation,
    webhook_server,
)

from agent import metrics
from agent.rotate.postgres import quote_ident, quote_literal, scram_verifier


def sql_ident(name: str) -> str:
    return quote_ident(name)


def role_attr(pg: PostgresCluster, role: str, column: str) -> str:
    return pg.psql(f"SELECT {column} FROM pg_roles WHERE rolname = {quote_literal(role)}").strip()


def failures(name: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "credsidecar_rotations_total", {"name": name, "result": "failed"}
    )
    return value or 0.0


def test_scram_verifier_matches_the_rfc_7677_example() -> None:
    # RFC 7677 section 3: user "user", password "pencil", this salt, 4096 iterations
    import base64

    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = scram_verifier("pencil", salt=salt, iterations=4096)
    iterations_salt, keys = verifier.split("$")[1:]
    assert iterations_salt == "4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    stored, server = keys.split(":")
    # ServerSignature of the RFC's exchange = HMAC(ServerKey, AuthMessage)
    import hashlib
    import hmac

    auth_message = (
        b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    signature = hmac.digest(base64.b64decode(server), auth_message, hashlib.sha256)
    assert base64.b64encode(signature).decode() == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    assert len(base64.b64decode(stored)) == 32


def test_quoting() -> None:
    assert quote_ident('we"ird role') == '"we""ird role"'
    assert quote_literal("it's a \\ test") == "E'it''s a \\\\ test'"


async def test_password_rotation_sends_only_a_verifier(
    vault: Any, openbao: OpenBaoServer, unique: str, events: Any
) -> None:
    pg = PostgresCluster(settings={"log_statement": "'all'"}).start()
    AUDIT.secret(pg.password)
    try:
        role = f'we"ird role {unique}'
        initial = f"initial-{unique}"
        AUDIT.secret(initial)
        pg.psql(f"CREATE ROLE {sql_ident(role)} LOGIN PASSWORD {quote_literal(initial)}")
        store = f"secret/data/rot-pw-{unique}"
        cfg = pg_config("dbpw", "postgres-password", store, pg, role=role, every=3600.0)
        rot, published = rotation(cfg, vault, pg)

        first = await rot.rotate_now()
        assert first.ok and first.version == 1, first
        one = published.last.data["password"]
        assert published.last.data["username"] == role and published.last.version == "1"
        assert await can_login(pg, role, one)
        assert not await can_login(pg, role, initial)
        stored = role_attr(pg, role, "(SELECT rolpassword FROM pg_authid WHERE oid = pg_roles.oid)")
        assert stored.startswith("SCRAM-SHA-256$4096:")

        second = await rot.rotate_now()
        assert second.ok and second.version == 2
        two = published.last.data["password"]
        assert two != one and await can_login(pg, role, two)
        assert not await can_login(pg, role, one)

        record = kv_record(openbao, store)
        assert record["version"] == 2 and record["current"]["password"] == two
        assert record["claim"] is None

        log = pg.log_path.read_text()
        assert "ALTER ROLE" in log and "SCRAM-SHA-256$" in log  # statements are logged
        for password in (one, two):
            assert password not in log
        assert events.named("rotation_published", secret="dbpw", version=2)
    finally:
        pg.remove()


async def test_dual_user_copies_privileges_and_retires_the_previous_user(
    vault: Any, postgres: PostgresCluster, unique: str, events: Any, until: Any
) -> None:
    base, table, later = f"app{unique}", f"t_{unique}", f"t2_{unique}"
    postgres.psql(f"CREATE ROLE {base} NOLOGIN")
    postgres.psql(f"CREATE TABLE {table} (x int); GRANT SELECT ON {table} TO {base}")
    store = f"secret/data/rot-dual-{unique}"
    cfg = pg_config(
        "dbdual",
        "postgres-dual-user",
        store,
        postgres,
        role=base,
        every=3600.0,
        grace=2.0,
        verify_query=f"SELECT count(*) FROM {table}",
    )
    rot, published = rotation(cfg, vault, postgres)

    first = await rot.rotate_now()
    assert first.ok, first
    a = dict(published.last.data)
    assert a["username"] == f"{base}_a"
    assert await can_login(postgres, a["username"], a["password"], f"SELECT * FROM {table}")

    # privileges given to the active user directly: the next user must get them too
    postgres.psql(f"GRANT INSERT ON {table} TO {base}_a")
    postgres.psql(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {postgres.superuser} IN SCHEMA public "
        f"GRANT SELECT ON TABLES TO {base}_a"
    )
    second = await rot.rotate_now()
    assert second.ok and second.version == 2, second
    b = dict(published.last.data)
    assert b["username"] == f"{base}_b" and b["password"] != a["password"]
    assert await can_login(
        postgres, b["username"], b["password"], f"INSERT INTO {table} VALUES (1)"
    )
    postgres.psql(f"CREATE TABLE {later} (y int)")  # default privileges apply to it
    assert await can_login(postgres, b["username"], b["password"], f"SELECT * FROM {later}")
    # within grace both users log in
    assert await can_login(postgres, a["username"], a["password"])

    async with looping(rot):
        await until(
            lambda: role_attr(postgres, f"{base}_a", "rolcanlogin") == "f", 30, "a set NOLOGIN"
        )
        await until(lambda: events.named("rotation_retired", secret="dbdual", version=1), 10)
    assert role_attr(postgres, f"{base}_a", "rolname") == f"{base}_a"  # not dropped
    assert not await can_login(postgres, a["username"], a["password"])
    assert await can_login(postgres, b["username"], b["password"])
    assert len(published.values) == 2  # retiring a user changes nothing the app sees

    # the third rotation goes back to _a: LOGIN again, new password
    third = await rot.rotate_now()
    assert third.ok and published.last.data["username"] == f"{base}_a"
    assert await can_login(postgres, f"{base}_a", published.last.data["password"])


async def test_dual_user_terminates_remaining_sessions_when_asked(
    vault: Any, postgres: PostgresCluster, unique: str, events: Any, until: Any
) -> None:
    import asyncpg

    base = f"term{unique}"
    cfg = pg_config(
        "dbterm",
        "postgres-dual-user",
        f"secret/data/rot-term-{unique}",
        postgres,
        role=base,
        every=3600.0,
        grace=1.0,
        terminate_after=1.0,
    )
    rot, published = rotation(cfg, vault, postgres)
    assert (await rot.rotate_now()).ok
    a = dict(published.last.data)
    session = await asyncpg.connect(
        host="127.0.0.1",
        port=postgres.port,
        user=a["username"],
        password=a["password"],
        database="postgres",
    )
    try:
        assert (await rot.rotate_now()).ok
        async with looping(rot):
            await until(lambda: events.named("sessions_terminated", secret="dbterm"), 30)
        assert events.named("sessions_terminated", secret="dbterm")[0].count == 1
        with pytest.raises((asyncpg.PostgresError, ConnectionError, asyncpg.InterfaceError)):
            await session.fetchval("SELECT 1")
    finally:
        await session.close()


async def test_failed_verification_rolls_back_and_keeps_the_old_credential(
    vault: Any, openbao: OpenBaoServer, postgres: PostgresCluster, unique: str, events: Any
) -> None:
    base, probe = f"rb{unique}", f"probe_{unique}"
    postgres.psql(f"CREATE TABLE {probe} (x int); GRANT SELECT ON {probe} TO PUBLIC")
    store = f"secret/data/rot-rb-{unique}"
    async with webhook_server() as hook:
        cfg = pg_config(
            "dbrb",
            "postgres-dual-user",
            store,
            postgres,
            role=base,
            every=3600.0,
            verify_query=f"SELECT * FROM {probe}",
            notify_webhook=hook.url,
            retry_initial=30.0,
            retry_max=60.0,
        )
        rot, published = rotation(cfg, vault, postgres)
        assert (await rot.rotate_now()).ok
        good = dict(published.last.data)
        assert any("rotated dbrb to version 1" in t for t in hook.texts())

        postgres.psql(f"DROP TABLE {probe}")  # the verify query now fails for any new user
        before = failures("dbrb")
        outcome = await rot.rotate_now()
        assert outcome.result == "failed" and outcome.version == 2
        assert probe in (outcome.error or "")

        assert len(published.values) == 1  # nothing published
        assert kv_record(openbao, store)["version"] == 1
        assert kv_record(openbao, store)["claim"] is None  # released for the next attempt
        assert await can_login(postgres, good["username"], good["password"])
        assert role_attr(postgres, f"{base}_b", "rolcanlogin") == "f"  # undone
        assert events.named("rotation_rolled_back", secret="dbrb", version=2, undone=True)
        failed = events.named("rotation_failed", secret="dbrb", version=2)
        assert failed and failed[0].retry_in >= 30.0
        assert failures("dbrb") == before + 1
        assert any("dbrb to version 2 failed" in t for t in hook.texts())
        assert not any(good["password"] in str(b) for b in hook.bodies)

        # the schedule backs off: even once due, no attempt before retry_in
        rot2 = but(cfg, every=0.5)
        rot.config = rot2
        rot.rotator.config = rot2
        rot.clock = lambda: time.time() + 0.6  # past the (shortened) period, inside the backoff
        assert (await rot.step()).result == "not_due"


async def test_single_user_rollback_restores_the_old_password(
    vault: Any, postgres: PostgresCluster, unique: str, events: Any
) -> None:
    role = f"single{unique}"
    postgres.psql(f"CREATE ROLE {role} LOGIN")
    cfg = pg_config(
        "dbsingle",
        "postgres-password",
        f"secret/data/rot-single-{unique}",
        postgres,
        role=role,
        every=3600.0,
        verify_query=f"SELECT * FROM missing_{unique}",
    )
    rot, published = rotation(cfg, vault, postgres)
    # the first rotation has no old password to go back to: it fails, not undone
    first = await rot.rotate_now()
    assert first.result == "failed"
    assert events.named("rotation_rolled_back", secret="dbsingle", undone=False)

    postgres.psql(
        f"CREATE TABLE missing_{unique} (x int); GRANT SELECT ON missing_{unique} TO {role}"
    )
    assert (await rot.rotate_now()).ok
    good = published.last.data["password"]
    postgres.psql(f"DROP TABLE missing_{unique}")
    outcome = await rot.rotate_now()
    assert outcome.result == "failed" and outcome.version == 2
    assert events.named("rotation_rolled_back", secret="dbsingle", version=2, undone=True)
    assert await can_login(postgres, role, good)  # the old password works again
    assert len(published.values) == 1
