"""MySQL and MariaDB account passwords with real overlap: one account with two valid
passwords during ``grace`` (``mysql-password``), or two alternating accounts
(``mysql-dual-user``, ``<user>_a`` / ``<user>_b``). The account is
``'<user>'@'<host>'`` (``host:`` defaults to ``'%'``).

``mysql-password`` holds both passwords the way each server can:

- MariaDB >= 10.4: ``IDENTIFIED VIA mysql_native_password USING '<new>' OR
  mysql_native_password USING '<old>'``, then only the new one after grace;
- MySQL >= 8.0.14: ``IDENTIFIED WITH mysql_native_password AS '<new>' RETAIN CURRENT
  PASSWORD``, then ``DISCARD OLD PASSWORD`` after grace. An account on
  ``caching_sha2_password`` has a salted hash we do not compute; its password goes in
  ``BY '<password>'``, which is refused unless the admin connection uses TLS.

Hashes are ``mysql_native_password``'s ``*`` + hex(SHA1(SHA1(password))), computed here,
so no plaintext reaches the server, its general log or its binlog. A server with
neither feature is refused before anything changes, naming its version.

aiomysql is imported here only, so only configs with these kinds load it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiomysql
import pymysql

from agent.rotate.base import Fields, RotationError, Rotator, alternate, new_password
from agent.rotate.store import Record

_TIMEOUT = 30.0
_NATIVE = "mysql_native_password"
_HASH = re.compile(r"\*[0-9A-Fa-f]{40}")


def native_hash(password: str) -> str:
    """``mysql_native_password``'s stored form: ``*`` + upper hex(SHA1(SHA1(password)))."""
    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()


def quote_string(text: str) -> str:
    """A string literal that means the same with or without NO_BACKSLASH_ESCAPES."""
    if "\\" in text or "\x00" in text:
        raise RotationError("account names and hosts cannot contain a backslash or NUL")
    return "'" + text.replace("'", "''") + "'"


def account(user: str, host: str) -> str:
    return f"{quote_string(user)}@{quote_string(host)}"


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


@dataclass(frozen=True)
class Server:
    flavor: Literal["mariadb", "mysql"]
    version: tuple[int, ...]
    text: str  # what VERSION() said, for messages

    @classmethod
    def parse(cls, text: str) -> Server:
        numbers = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
        if numbers is None:
            raise RotationError(f"cannot read the server version {text[:60]!r}")
        flavor: Literal["mariadb", "mysql"] = "mariadb" if "mariadb" in text.lower() else "mysql"
        return cls(flavor, tuple(int(n) for n in numbers.groups()), text)

    def require_two_passwords(self) -> None:
        """MariaDB >= 10.4 (authentication chains) or MySQL >= 8.0.14 (dual passwords)."""
        if self.flavor == "mariadb" and self.version < (10, 4):
            raise RotationError(
                f"MariaDB {self.text} cannot hold two passwords for one account "
                "(IDENTIFIED VIA ... OR ... needs MariaDB 10.4 or later)"
            )
        if self.flavor == "mysql" and self.version < (8, 0, 14):
            raise RotationError(
                f"MySQL {self.text} cannot hold two passwords for one account "
                "(RETAIN CURRENT PASSWORD needs MySQL 8.0.14 or later)"
            )


def _reason(exc: BaseException) -> str:
    # server messages quote statements, which may hold a hash: never show one
    args: tuple[Any, ...] = getattr(exc, "args", ())
    code = args[0] if len(args) > 1 and isinstance(args[0], int) else None
    text = str(args[1]) if code is not None else str(exc) or type(exc).__name__
    text = _HASH.sub("<hash>", text.splitlines()[0] if text else "")[:200]
    if isinstance(exc.__cause__, OSError):  # aiomysql keeps why it could not connect here
        text += f": {str(exc.__cause__)[:200]}"
    return f"{text} (error {code})" if code is not None else text


class Session:
    """One admin or verification connection: statements with a deadline, errors
    turned into RotationError naming the step (never the statement)."""

    def __init__(self, conn: Any, tls: bool) -> None:
        self.conn, self.tls = conn, tls

    async def execute(self, sql: str, what: str, args: Sequence[Any] | None = None) -> None:
        await self.rows(sql, what, args)

    async def rows(self, sql: str, what: str, args: Sequence[Any] | None = None) -> list[Any]:
        try:
            async with asyncio.timeout(_TIMEOUT):
                cursor = await self.conn.cursor()
                try:
                    await cursor.execute(sql, args)
                    return list(await cursor.fetchall())
                finally:
                    await cursor.close()
        except (pymysql.MySQLError, OSError, TimeoutError) as exc:
            raise RotationError(f"{what}: {_reason(exc)}") from None

    async def version(self) -> Server:
        rows = await self.rows("SELECT VERSION()", "read the server version")
        return Server.parse(str(rows[0][0]))

    async def close(self) -> None:
        try:  # COM_QUIT first, so the server ends the session (and its locks) at once
            async with asyncio.timeout(5):
                await self.conn.ensure_closed()
        except (pymysql.MySQLError, OSError, TimeoutError):
            self.conn.close()


class _MySQLRotator(Rotator):
    @property
    def user(self) -> str:
        assert self.config.user is not None
        return self.config.user

    def account(self, user: str | None = None) -> str:
        return account(user or self.user, self.config.account_host)

    async def connect(self, user: str, password: str, what: str) -> Session:
        tls = self.admin_tls()
        try:
            async with asyncio.timeout(_TIMEOUT):
                conn = await aiomysql.connect(
                    host=self.admin.host,
                    port=self.admin.port,
                    user=user,
                    password=password,
                    db=self.admin.database or None,
                    connect_timeout=10,
                    ssl=tls,
                    autocommit=True,
                )
        except (pymysql.MySQLError, OSError, TimeoutError) as exc:
            where = f"{self.admin.host}:{self.admin.port}"
            raise RotationError(f"{what} as {user!r} at {where}: {_reason(exc)}") from None
        return Session(conn, tls is not None)

    async def admin_session(self) -> Session:
        user, password = self.admin_login()
        if user == self.user or user in self.users():
            raise RotationError(
                f"rotate.{self.config.name}.user: {user!r} is the account the admin secret "
                "logs in with; rotate another user"
            )
        return await self.connect(user, password, "admin login")

    def users(self) -> tuple[str, ...]:
        return (self.user,)

    async def verify(self, new: Mapping[str, Any]) -> None:
        session = await self.connect(str(new["username"]), str(new["password"]), "verification")
        try:
            if self.config.verify_query:
                await session.rows(self.config.verify_query, "verify_query")
        finally:
            await session.close()

    def keep_previous(self, current: Mapping[str, Any]) -> Fields:
        return {k: v for k, v in current.items() if k != "password"}  # no old plaintext kept

    def fields(self, user: str, password: str) -> Fields:
        fields: Fields = {
            "username": user,
            "password": password,
            "host": self.admin.host,
            "port": self.admin.port,
        }
        if self.admin.database:
            fields["database"] = self.admin.database
        return fields


class PasswordRotator(_MySQLRotator):
    """One account, two valid passwords from publish until ``grace`` has passed."""

    _taken_over: str | None = None  # the hash a failed first rotation puts back

    async def _account_auth(self, session: Session) -> tuple[str, str]:
        """(the account's authentication plugin, its stored authentication string)."""
        rows = await session.rows(
            "SELECT plugin, authentication_string FROM mysql.user WHERE user = %s AND host = %s",
            f"read the authentication of {self.account()}",
            (self.user, self.config.account_host),
        )
        if not rows:
            raise RotationError(f"account {self.account()} does not exist")
        return str(rows[0][0]), str(rows[0][1] or "")

    async def create(self, record: Record) -> Fields:
        password = new_password(self.config.password_length)
        old = (record.current or {}).get("password")
        session = await self.admin_session()
        try:
            server = await session.version()
            server.require_two_passwords()
            plugin, stored = await self._account_auth(session)
            if old is None:  # the first rotation takes the account over
                native = plugin == _NATIVE and _HASH.fullmatch(stored)
                self._taken_over = stored if native else None
            if server.flavor == "mariadb":
                old_hash = None if old is None else native_hash(str(old))
                await self._mariadb_set(session, native_hash(password), old_hash)
            else:
                await self._mysql_set(session, plugin, password, first=old is None)
        finally:
            await session.close()
        return self.fields(self.user, password)

    async def _mariadb_set(self, session: Session, new: str, old: str | None) -> None:
        using = f"{_NATIVE} USING {quote_string(new)}"
        if old is not None:  # both, new first: most logins match on the first try
            using += f" OR {_NATIVE} USING {quote_string(old)}"
        await session.execute(
            f"ALTER USER {self.account()} IDENTIFIED VIA {using}", f"set {self.account()}"
        )

    async def _mysql_set(self, session: Session, plugin: str, password: str, first: bool) -> None:
        if plugin == _NATIVE:
            auth = f"IDENTIFIED WITH {_NATIVE} AS {quote_string(native_hash(password))}"
        elif plugin in ("caching_sha2_password", "sha256_password"):
            if not session.tls:
                raise RotationError(
                    f"account {self.account()} uses {plugin}, whose hash the sidecar does "
                    "not compute: its password would be sent in plaintext; set admin.tls"
                )
            auth = f"IDENTIFIED WITH {plugin} BY {quote_string(password)}"
        else:
            raise RotationError(f"account {self.account()} uses {plugin}: no password to rotate")
        # the first rotation takes the account over: no older password stays valid
        retain = "" if first else " RETAIN CURRENT PASSWORD"
        await session.execute(f"ALTER USER {self.account()} {auth}{retain}", "set the password")
        if first:
            await session.execute(
                f"ALTER USER {self.account()} DISCARD OLD PASSWORD", "discard old passwords"
            )

    async def rollback(self, record: Record, new: Mapping[str, Any]) -> bool:
        old = (record.current or {}).get("password")
        hashed = native_hash(str(old)) if old is not None else self._taken_over
        if hashed is None:
            return False  # a first rotation of an account whose old hash we could not keep
        await self._only(hashed)
        return True

    async def retire(self, previous: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        await self._only(native_hash(str(current["password"])))

    async def _only(self, hashed: str) -> None:
        """Leave the password whose native hash is ``hashed`` as the account's only one."""
        session = await self.admin_session()
        try:
            server = await session.version()
            if server.flavor == "mariadb":
                await self._mariadb_set(session, hashed, None)
                return
            plugin, _ = await self._account_auth(session)
            if plugin == _NATIVE:
                # a roll back: that password again (a retire: it is already the primary)
                auth = f"IDENTIFIED WITH {_NATIVE} AS {quote_string(hashed)}"
                await session.execute(f"ALTER USER {self.account()} {auth}", "restore the password")
            await session.execute(
                f"ALTER USER {self.account()} DISCARD OLD PASSWORD", "discard the old password"
            )
        finally:
            await session.close()


class DualUserRotator(_MySQLRotator):
    """``<user>_a`` and ``<user>_b`` take turns: the idle one gets a new password, the
    active one's grants (``SHOW GRANTS``) and is unlocked; the other is locked
    (``ACCOUNT LOCK``, never dropped) once ``grace`` has passed. The first one copies
    the grants of ``'<user>'@'<host>'`` when that account exists (a template)."""

    def users(self) -> tuple[str, str]:
        return f"{self.user}_a", f"{self.user}_b"

    def next_user(self, record: Record) -> tuple[str, str | None]:
        return alternate(self.users(), record)

    async def _exists(self, session: Session, user: str) -> bool:
        rows = await session.rows(
            "SELECT 1 FROM mysql.user WHERE user = %s AND host = %s",
            f"look up {self.account(user)}",
            (user, self.config.account_host),
        )
        return bool(rows)

    async def create(self, record: Record) -> Fields:
        user, active = self.next_user(record)
        password = new_password(self.config.password_length)
        auth = f"IDENTIFIED WITH {_NATIVE} AS {quote_string(native_hash(password))}"
        target = self.account(user)
        session = await self.admin_session()
        try:
            if await self._exists(session, user):
                await session.execute(f"ALTER USER {target} {auth} ACCOUNT UNLOCK", f"set {target}")
            else:
                await session.execute(f"CREATE USER {target} {auth}", f"create {target}")
            source = active or self.user
            if active is not None or await self._exists(session, self.user):
                await copy_grants(session, source, user, self.config.account_host)
        finally:
            await session.close()
        return self.fields(user, password)

    async def rollback(self, record: Record, new: Mapping[str, Any]) -> bool:
        await self._lock(str(new["username"]))
        return True

    async def retire(self, previous: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        if previous.get("username") != current.get("username"):
            await self._lock(str(previous["username"]))

    async def _lock(self, user: str) -> None:
        session = await self.admin_session()
        try:
            target = self.account(user)
            await session.execute(f"ALTER USER {target} ACCOUNT LOCK", f"lock {target}")
        finally:
            await session.close()


_IDENTIFIED = re.compile(
    r"\s+IDENTIFIED\s+(?:BY\s+PASSWORD|VIA|WITH)\s.*?(?=\s+WITH\s+(?:GRANT|ADMIN)\s+OPTION|$)",
    re.IGNORECASE,
)


def grants_for(lines: Sequence[str], source: str, target: str, host: str) -> list[str]:
    """``SHOW GRANTS`` of ``source`` rewritten for ``target``: same privileges, roles and
    default roles; no authentication clause; the bare USAGE line left out."""
    src = f"{quote_ident(source)}@{quote_ident(host)}"
    dst = f"{quote_ident(target)}@{quote_ident(host)}"
    out = []
    for line in lines:
        statement = _IDENTIFIED.sub("", line.strip())
        if re.fullmatch(r"GRANT USAGE ON \*\.\* TO " + re.escape(src), statement):
            continue  # every account has it
        rewritten = re.sub(
            r"(\s(?:TO|FOR)\s)" + re.escape(src), lambda m: m.group(1) + dst, statement
        )
        if rewritten == statement:
            continue  # not a grant to the source (nothing we know how to copy)
        out.append(rewritten)
    return out


async def copy_grants(session: Session, source: str, target: str, host: str) -> None:
    """Give ``target`` every grant ``source`` has. Additive: nothing is revoked."""
    rows = await session.rows(
        f"SHOW GRANTS FOR {account(source, host)}", f"read the grants of {source!r}"
    )
    for statement in grants_for([str(r[0]) for r in rows], source, target, host):
        await session.execute(statement, f"copy the grants of {source!r} to {target!r}")
