"""``mysql-password`` and ``mysql-dual-user``: MariaDB runs for real (general log on, grepped
for plaintext); the MySQL 8 statements are checked on a recording session, since no
MySQL 8 server runs here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiomysql
import pymysql
import pytest
from devservers import AUDIT, MariaDBServer
from rotatehelpers import Published, but, config, kv_record, rotation, step_until

from agent.rotate.base import RotatorContext
from agent.rotate.config import AdminConfig
from agent.rotate.manager import Rotation
from agent.rotate.mysql import PasswordRotator, Server, grants_for, native_hash
from agent.rotate.store import Store
from agent.secret import SecretValue


def admin_of(server: MariaDBServer) -> SecretValue:
    return SecretValue(
        name="my_admin", data={"username": "admin", "password": server.admin_password}, version="1"
    )


def my_config(name: str, kind: str, store: str, port: int, user: str, **kw: Any) -> Any:
    admin = AdminConfig("my_admin", port=port, database="")
    return config(name, kind, store, admin=admin, user=user, every=3600.0, **kw)


async def can_login(server: MariaDBServer, user: str, password: str, sql: str = "") -> bool:
    try:
        conn = await aiomysql.connect(
            host="127.0.0.1",
            port=server.port,
            user=user,
            password=password,
            connect_timeout=10,
            autocommit=True,
        )
    except pymysql.MySQLError:
        return False
    try:
        if sql:
            async with conn.cursor() as cursor:
                await cursor.execute(sql)
    finally:
        await conn.ensure_closed()
    return True


def test_native_hash_matches_the_server(mariadb: MariaDBServer) -> None:
    assert native_hash("pencil") == mariadb.sql("SELECT PASSWORD('pencil')")


def test_versions_without_two_passwords_are_refused_by_name() -> None:
    Server.parse("10.11.19-MariaDB-0+deb12u1-log").require_two_passwords()
    Server.parse("8.0.14").require_two_passwords()
    for text, needs in (("10.3.39-MariaDB", "10.4"), ("8.0.13", "8.0.14"), ("5.7.44-log", "8.0")):
        with pytest.raises(Exception, match=rf"{text}.*needs .*{needs}") as info:
            Server.parse(text).require_two_passwords()
        assert text in str(info.value)


async def test_mariadb_holds_both_passwords_during_grace_and_never_sees_plaintext(
    mariadb: MariaDBServer, vault: Any, openbao: Any, unique: str, until: Any, events: Any
) -> None:
    user, boot = f"app{unique}", f"boot-{unique}-pw"
    AUDIT.secret(boot)
    mariadb.sql(f"CREATE USER '{user}'@'%' IDENTIFIED BY PASSWORD '{native_hash(boot)}'")
    store = f"secret/data/rot-my-{unique}"
    cfg = my_config("mydb", "mysql-password", store, mariadb.port, user, grace=1.0)
    rot, published = rotation(cfg, vault, admin=admin_of(mariadb))
    try:
        assert (await rot.rotate_now()).ok
        one = published.last.data["password"]
        assert published.last.data["username"] == user
        assert await can_login(mariadb, user, one)
        assert not await can_login(mariadb, user, boot)  # the first rotation takes over

        second = await rot.rotate_now()
        assert second.ok and second.version == 2, second
        two = published.last.data["password"]
        assert await can_login(mariadb, user, one) and await can_login(mariadb, user, two)
        assert "password" not in kv_record(openbao, store)["previous"]

        async def refused() -> bool:
            return not await can_login(mariadb, user, one)

        await step_until(until, rot, refused, "the previous password to stop working")
        assert await can_login(mariadb, user, two)
        assert events.named("rotation_retired", secret="mydb", version=1)

        log = mariadb.general_log_path.read_text(errors="replace")
        assert native_hash(two) in log and "IDENTIFIED VIA mysql_native_password" in log
        for password in (one, two):
            assert password not in log
    finally:
        mariadb.sql(f"DROP USER IF EXISTS '{user}'@'%'")


async def test_a_failed_verification_leaves_only_the_old_password(
    mariadb: MariaDBServer, vault: Any, unique: str, events: Any
) -> None:
    user = f"app{unique}"
    mariadb.sql(f"CREATE USER '{user}'@'%' IDENTIFIED BY PASSWORD '{native_hash(unique)}'")
    cfg = my_config(
        "mybad", "mysql-password", f"secret/data/rot-mybad-{unique}", mariadb.port, user
    )
    rot, published = rotation(cfg, vault, admin=admin_of(mariadb))
    try:
        assert (await rot.rotate_now()).ok
        one = published.last.data["password"]
        rot.rotator.config = but(cfg, verify_query="SELECT * FROM nope")
        outcome = await rot.rotate_now()
        assert outcome.result == "failed" and "verify_query" in (outcome.error or "")
        assert events.named("rotation_rolled_back", secret="mybad", version=2, undone=True)
        assert await can_login(mariadb, user, one) and len(published.values) == 1
        show = mariadb.sql(f"SHOW CREATE USER '{user}'@'%'")
        assert " OR " not in show and native_hash(one) in show  # one password: the old one
    finally:
        mariadb.sql(f"DROP USER IF EXISTS '{user}'@'%'")


async def test_the_admin_account_is_refused(
    mariadb: MariaDBServer, vault: Any, unique: str
) -> None:
    cfg = my_config(
        "myself", "mysql-password", f"secret/data/rot-mys-{unique}", mariadb.port, "admin"
    )
    rot, _ = rotation(cfg, vault, admin=admin_of(mariadb))
    outcome = await rot.rotate_now()
    assert outcome.result == "failed" and "the admin secret logs in with" in (outcome.error or "")


async def test_dual_user_copies_grants_and_locks_the_previous_user(
    mariadb: MariaDBServer, vault: Any, unique: str, until: Any
) -> None:
    base, db = f"svc{unique}", f"db{unique}"
    mariadb.sql(
        f"CREATE DATABASE {db}; CREATE TABLE {db}.t (x int); "
        f"CREATE USER '{base}'@'%' ACCOUNT LOCK; GRANT SELECT ON {db}.* TO '{base}'@'%'"
    )
    cfg = my_config(
        "mydual",
        "mysql-dual-user",
        f"secret/data/rot-mydual-{unique}",
        mariadb.port,
        base,
        grace=1.0,
        verify_query=f"SELECT count(*) FROM {db}.t",
    )
    rot, published = rotation(cfg, vault, admin=admin_of(mariadb))
    try:
        assert (await rot.rotate_now()).ok
        a = dict(published.last.data)
        assert a["username"] == f"{base}_a"
        mariadb.sql(f"GRANT INSERT ON {db}.t TO '{base}_a'@'%'")  # given to the active user
        second = await rot.rotate_now()
        assert second.ok, second
        b = dict(published.last.data)
        assert b["username"] == f"{base}_b"
        assert await can_login(
            mariadb, b["username"], b["password"], f"INSERT INTO {db}.t VALUES (1)"
        )
        assert await can_login(mariadb, a["username"], a["password"])  # within grace

        async def locked() -> bool:
            return not await can_login(mariadb, a["username"], a["password"])

        await step_until(until, rot, locked, "the previous user to be locked")
        assert "ACCOUNT LOCK" in mariadb.sql(f"SHOW CREATE USER '{base}_a'@'%'")  # never dropped
        assert await can_login(mariadb, b["username"], b["password"], f"SELECT * FROM {db}.t")
        log = mariadb.general_log_path.read_text(errors="replace")
        assert a["password"] not in log and b["password"] not in log
    finally:
        mariadb.sql(
            f"DROP USER IF EXISTS '{base}'@'%', '{base}_a'@'%', '{base}_b'@'%'; "
            f"DROP DATABASE IF EXISTS {db}"
        )


HASH = "*0123456789ABCDEF0123456789ABCDEF01234567"


def test_grants_are_rewritten_for_the_other_user() -> None:
    lines = [
        f"GRANT USAGE ON *.* TO `app_a`@`%` IDENTIFIED BY PASSWORD '{HASH}'",
        "GRANT SELECT, INSERT ON `db`.* TO `app_a`@`%` WITH GRANT OPTION",
        "GRANT `reader` TO `app_a`@`%`",
        "SET DEFAULT ROLE `reader` FOR `app_a`@`%`",
        f"GRANT PROCESS ON *.* TO `app_a`@`%` IDENTIFIED VIA mysql_native_password USING '{HASH}'",
    ]
    assert grants_for(lines, "app_a", "app_b", "%") == [
        "GRANT SELECT, INSERT ON `db`.* TO `app_b`@`%` WITH GRANT OPTION",
        "GRANT `reader` TO `app_b`@`%`",
        "SET DEFAULT ROLE `reader` FOR `app_b`@`%`",
        "GRANT PROCESS ON *.* TO `app_b`@`%`",
    ]


# ----------------------------------------------------------------- MySQL 8 (not run here)


class RecordingSession:
    """Answers like MySQL 8 would and records every statement (no MySQL 8 server here)."""

    def __init__(self, log: list[str], version: str, plugin: str, tls: bool) -> None:
        self.log, self._version, self.plugin, self.tls = log, version, plugin, tls

    async def execute(self, sql: str, what: str, args: Sequence[Any] | None = None) -> None:
        await self.rows(sql, what, args)

    async def rows(self, sql: str, what: str, args: Sequence[Any] | None = None) -> list[Any]:
        self.log.append(sql if args is None else f"{sql} {tuple(args)}")
        if sql == "SELECT VERSION()":
            return [(self._version,)]
        if sql.startswith("SELECT plugin"):
            return [(self.plugin, "*" + "0" * 40)]
        return []

    async def version(self) -> Server:
        return Server.parse(str((await self.rows("SELECT VERSION()", "version"))[0][0]))

    async def close(self) -> None:
        pass


class MySQL8Rotator(PasswordRotator):
    version, plugin, tls = "8.0.36", "mysql_native_password", False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.statements: list[str] = []

    async def connect(self, user: str, password: str, what: str) -> Any:
        self.statements.append(f"-- login {user}")
        return RecordingSession(self.statements, self.version, self.plugin, self.tls)


def mysql8(vault: Any, unique: str, **attrs: Any) -> tuple[Rotation, MySQL8Rotator, Published]:
    cfg = my_config("my8", "mysql-password", f"secret/data/rot-my8-{unique}", 3306, "app")
    admin = SecretValue(name="my_admin", data={"username": "root", "password": "x"}, version="1")
    rotator = MySQL8Rotator(cfg, RotatorContext(vault=vault, lookup=lambda _: admin))
    for key, value in attrs.items():
        setattr(rotator, key, value)
    published = Published()
    return Rotation(cfg, rotator, Store(vault, cfg.store), published, "r"), rotator, published


async def test_mysql8_statements_retain_then_discard(vault: Any, unique: str) -> None:
    rot, rotator, published = mysql8(vault, unique)
    assert (await rot.rotate_now()).ok
    one = published.last.data["password"]
    acct = "'app'@'%'"
    plugin = (
        "SELECT plugin, authentication_string FROM mysql.user WHERE user = %s AND host = %s "
        "('app', '%')"
    )
    assert rotator.statements == [
        "-- login root",
        "SELECT VERSION()",
        plugin,
        f"ALTER USER {acct} IDENTIFIED WITH mysql_native_password AS '{native_hash(one)}'",
        f"ALTER USER {acct} DISCARD OLD PASSWORD",  # the first rotation takes over
        "-- login app",
    ]
    rotator.statements.clear()
    assert (await rot.rotate_now()).ok
    two = published.last.data["password"]
    assert rotator.statements[3] == (
        f"ALTER USER {acct} IDENTIFIED WITH mysql_native_password AS '{native_hash(two)}' "
        "RETAIN CURRENT PASSWORD"
    )
    assert len(rotator.statements) == 5  # no discard until grace has passed
    rotator.statements.clear()
    await rotator.retire({"username": "app"}, published.last.data)
    assert rotator.statements[-1] == f"ALTER USER {acct} DISCARD OLD PASSWORD"
    assert not any(p in s for s in rotator.statements for p in (one, two))


async def test_mysql8_caching_sha2_needs_tls_and_old_servers_are_refused(
    vault: Any, unique: str
) -> None:
    rot, rotator, _ = mysql8(vault, unique, plugin="caching_sha2_password")
    outcome = await rot.rotate_now()
    assert outcome.result == "failed" and "set admin.tls" in (outcome.error or "")
    assert not any(s.startswith("ALTER") for s in rotator.statements)

    rot, rotator, _ = mysql8(vault, unique + "t", plugin="caching_sha2_password", tls=True)
    assert (await rot.rotate_now()).ok
    assert rotator.statements[3].startswith(
        "ALTER USER 'app'@'%' IDENTIFIED WITH caching_sha2_password BY '"
    )

    rot, rotator, _ = mysql8(vault, unique + "o", version="8.0.13")
    outcome = await rot.rotate_now()
    assert outcome.result == "failed" and "MySQL 8.0.13" in (outcome.error or "")
    assert not any(s.startswith("ALTER") for s in rotator.statements)


async def test_tls_to_mariadb_is_verified(vault: Any, unique: str, tmp_path: Any) -> None:
    from devservers import make_test_pki

    server = MariaDBServer(tls=True).start()
    AUDIT.secret(server.admin_password)
    try:
        # both logins refuse to work without TLS: a rotation that succeeds used it
        server.sql(
            f"CREATE USER 'tlsadmin'@'%' IDENTIFIED BY PASSWORD "
            f"'{native_hash(server.admin_password)}' REQUIRE SSL; "
            "GRANT ALL PRIVILEGES ON *.* TO 'tlsadmin'@'%' WITH GRANT OPTION; "
            f"CREATE USER 'app'@'%' IDENTIFIED BY PASSWORD '{native_hash(unique)}' REQUIRE SSL"
        )
        admin = SecretValue(
            name="my_admin",
            data={"username": "tlsadmin", "password": server.admin_password},
            version="1",
        )
        store = f"secret/data/rot-my-tls-{unique}"
        good = AdminConfig(
            "my_admin", port=server.port, database="", tls=True, ca_cert=server.pki["ca"]
        )
        cfg = config("mytls", "mysql-password", store, admin=good, user="app", every=3600.0)
        rot, _ = rotation(cfg, vault, admin=admin)
        assert (await rot.rotate_now()).ok

        plain = AdminConfig("my_admin", port=server.port, database="")
        rot, _ = rotation(but(cfg, admin=plain, store=store + "-plain"), vault, admin=admin)
        assert (await rot.rotate_now()).result == "failed"  # REQUIRE SSL: TLS was needed

        other_ca = make_test_pki(tmp_path / "other")["ca"]
        wrong = AdminConfig("my_admin", port=server.port, database="", tls=True, ca_cert=other_ca)
        rot, _ = rotation(but(cfg, admin=wrong, store=store + "-wrong"), vault, admin=admin)
        outcome = await rot.rotate_now()
        assert (
            outcome.result == "failed"
            and "CERTIFICATE_VERIFY_FAILED" in (outcome.error or "").upper()
        )
    finally:
        server.remove()


async def test_a_failed_first_rotation_puts_the_old_password_back(
    mariadb: MariaDBServer, vault: Any, unique: str, events: Any
) -> None:
    user, boot = f"app{unique}", f"boot-{unique}-pw"
    AUDIT.secret(boot)
    mariadb.sql(f"CREATE USER '{user}'@'%' IDENTIFIED BY PASSWORD '{native_hash(boot)}'")
    store = f"secret/data/rot-myfirst-{unique}"
    cfg = my_config("myfirst", "mysql-password", store, mariadb.port, user)
    rot, published = rotation(
        but(cfg, verify_query="SELECT * FROM nope"), vault, admin=admin_of(mariadb)
    )
    try:
        outcome = await rot.rotate_now()
        assert outcome.result == "failed" and not published.values
        assert events.named("rotation_rolled_back", secret="myfirst", version=1, undone=True)
        assert await can_login(mariadb, user, boot)
        assert " OR " not in mariadb.sql(f"SHOW CREATE USER '{user}'@'%'")
    finally:
        mariadb.sql(f"DROP USER IF EXISTS '{user}'@'%'")
