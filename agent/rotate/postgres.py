"""PostgreSQL role passwords: one role (``postgres-password``) or two alternating
users (``postgres-dual-user``, ``<role>_a`` / ``<role>_b``).

Passwords are set as SCRAM-SHA-256 verifiers computed here, so the plaintext
never reaches the server (nor its statement log). Utility statements take no bind
parameters, so identifiers and literals are quoted here, the way PostgreSQL's
``quote_ident`` / ``quote_literal`` do.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from typing import Any

import asyncpg

from agent.logs import event
from agent.rotate.base import (
    Fields,
    RotationError,
    Rotator,
    RotatorContext,
    alternate,
    new_password,
)
from agent.rotate.config import RotateConfig
from agent.rotate.store import Record
from agent.taskset import TaskSet

SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
__all__ = ["new_password", "quote_ident", "quote_literal", "scram_verifier"]


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` (RFC 5802, RFC 7677).

    Our passwords are ASCII letters and digits, which SASLprep leaves unchanged.
    """
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def quote_ident(name: str) -> str:
    if "\x00" in name:
        raise RotationError("a role name cannot contain a NUL character")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    if "\x00" in value:
        raise RotationError("a literal cannot contain a NUL character")
    # E'' with doubled backslashes is right whatever standard_conforming_strings says
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class _PostgresRotator(Rotator):
    @property
    def role(self) -> str:
        assert self.config.role is not None
        return self.config.role

    async def connect_admin(self) -> Any:
        user, password = self.admin_login()
        return await self._connect(user, password, "admin login")

    async def _connect(self, user: str, password: str, what: str) -> Any:
        try:
            return await asyncpg.connect(
                host=self.admin.host,
                port=self.admin.port,
                user=user,
                password=password,
                database=self.admin.database,
                timeout=10,
            )
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            raise RotationError(f"{what} as {user!r} at {self._where()}: {_reason(exc)}") from None

    def _where(self) -> str:
        return f"{self.admin.host}:{self.admin.port}/{self.admin.database}"

    async def set_password(self, conn: Any, user: str, password: str, login: bool) -> None:
        verifier = scram_verifier(password, iterations=SCRAM_ITERATIONS)
        attrs = "LOGIN " if login else ""
        await _execute(
            conn,
            f"ALTER ROLE {quote_ident(user)} WITH {attrs}PASSWORD {quote_literal(verifier)}",
            f"set the password of {user!r}",
        )

    async def verify(self, new: Mapping[str, Any]) -> None:
        user, password = str(new["username"]), str(new["password"])
        conn = await self._connect(user, password, "verification login")
        try:
            if self.config.verify_query:
                await _execute(conn, self.config.verify_query, "verify_query", fetch=True)
        finally:
            await conn.close()

    def fields(self, user: str, password: str) -> Fields:
        return {
            "username": user,
            "password": password,
            "host": self.admin.host,
            "port": self.admin.port,
            "database": self.admin.database,
        }


class PasswordRotator(_PostgresRotator):
    """One role, a new password in place. ``grace`` cannot keep the old password valid
    (a role has one password); sessions already open are not affected."""

    async def create(self, record: Record) -> Fields:
        password = new_password(self.config.password_length)
        conn = await self.connect_admin()
        try:
            await self.set_password(conn, self.role, password, login=False)
        finally:
            await conn.close()
        return self.fields(self.role, password)

    async def rollback(self, record: Record, new: Mapping[str, Any]) -> bool:
        old = (record.current or {}).get("password")
        if old is None:
            return False  # the first rotation: there is no old password to go back to
        conn = await self.connect_admin()
        try:
            await self.set_password(conn, self.role, str(old), login=False)
        finally:
            await conn.close()
        return True


class DualUserRotator(_PostgresRotator):
    """``<role>_a`` and ``<role>_b`` take turns: the idle one gets a new password and
    the active one's grants, is published, and the other is set NOLOGIN after grace."""

    def __init__(self, config: RotateConfig, context: RotatorContext) -> None:
        super().__init__(config, context)
        self._tasks = TaskSet()  # session terminations, owned here

    def users(self) -> tuple[str, str]:
        return f"{self.role}_a", f"{self.role}_b"

    def next_user(self, record: Record) -> tuple[str, str | None]:
        return alternate(self.users(), record)

    async def create(self, record: Record) -> Fields:
        user, active = self.next_user(record)
        password = new_password(self.config.password_length)
        conn = await self.connect_admin()
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user)
            if not exists:
                verifier = quote_literal(scram_verifier(password, iterations=SCRAM_ITERATIONS))
                await _execute(
                    conn,
                    f"CREATE ROLE {quote_ident(user)} LOGIN PASSWORD {verifier}",
                    f"create role {user!r}",
                )
            else:
                await self.set_password(conn, user, password, login=True)
            if active is not None:
                await copy_privileges(conn, active, user)
            elif await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", self.role):
                # the first user joins the group role that holds the application's grants
                await _execute(
                    conn,
                    f"GRANT {quote_ident(self.role)} TO {quote_ident(user)}",
                    f"grant {self.role!r} to {user!r}",
                )
        finally:
            await conn.close()
        return self.fields(user, password)

    async def rollback(self, record: Record, new: Mapping[str, Any]) -> bool:
        # the idle user goes back to idle: no login, no usable password
        conn = await self.connect_admin()
        try:
            await _execute(
                conn,
                f"ALTER ROLE {quote_ident(str(new['username']))} WITH NOLOGIN PASSWORD NULL",
                "disable the new user",
            )
        finally:
            await conn.close()
        return True

    def keep_previous(self, current: Mapping[str, Any]) -> Fields:
        return {k: v for k, v in current.items() if k != "password"}  # retiring needs the name

    async def retire(self, previous: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        user = str(previous["username"])
        if user == current.get("username"):
            return
        conn = await self.connect_admin()
        try:
            await _execute(conn, f"ALTER ROLE {quote_ident(user)} WITH NOLOGIN", "set NOLOGIN")
        finally:
            await conn.close()
        if self.config.terminate_after is not None:
            later = self._terminate_later(user, self.config.terminate_after)
            self._tasks.spawn(later, f"terminate-{user}")

    async def aclose(self) -> None:
        """Pending session terminations end with the agent (a restart does not resume them)."""
        await self._tasks.aclose()

    async def _terminate_later(self, user: str, delay: float) -> None:
        # sessions drain on their own; past the deadline they are ended
        await asyncio.sleep(delay)
        try:
            await self.terminate(user)
        except RotationError as exc:
            event(
                "sessions_terminate_failed",
                logging.WARNING,
                secret=self.config.name,
                error=str(exc),
            )

    async def terminate(self, user: str) -> int:
        conn = await self.connect_admin()
        try:
            ended = await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                "FROM pg_stat_activity WHERE usename = $1",
                user,
            )
        finally:
            await conn.close()
        event("sessions_terminated", secret=self.config.name, user=user, count=int(ended or 0))
        return int(ended or 0)


# ----------------------------------------------------------------------- privileges

_COPY_QUERIES = {
    # (object text, privilege, grantable) for each kind of object the role was granted
    "TABLE": """
        SELECT c.oid::regclass::text, a.privilege_type, a.is_grantable
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE a.grantee = $1::regrole AND c.relkind IN ('r', 'v', 'm', 'p', 'f')""",
    "SEQUENCE": """
        SELECT c.oid::regclass::text, a.privilege_type, a.is_grantable
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE a.grantee = $1::regrole AND c.relkind = 'S'""",
    "SCHEMA": """
        SELECT quote_ident(n.nspname), a.privilege_type, a.is_grantable
        FROM pg_namespace n, aclexplode(n.nspacl) a WHERE a.grantee = $1::regrole""",
    "DATABASE": """
        SELECT quote_ident(d.datname), a.privilege_type, a.is_grantable
        FROM pg_database d, aclexplode(d.datacl) a WHERE a.grantee = $1::regrole""",
    "FUNCTION": """
        SELECT p.oid::regprocedure::text, a.privilege_type, a.is_grantable
        FROM pg_proc p, aclexplode(p.proacl) a WHERE a.grantee = $1::regrole""",
}
_DEFAULT_OBJECTS = {"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS", "T": "TYPES", "n": "SCHEMAS"}
_DEFAULT_ACLS = """
    SELECT quote_ident(pg_get_userbyid(d.defaclrole)), d.defaclnamespace::regnamespace::text,
           d.defaclnamespace = 0, d.defaclobjtype::text, a.privilege_type, a.is_grantable,
           CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee))
           END, a.grantee = $1::regrole
    FROM pg_default_acl d, aclexplode(d.defaclacl) a
    WHERE a.grantee = $1::regrole OR d.defaclrole = $1::regrole"""


async def copy_privileges(conn: Any, source: str, target: str) -> None:
    """Give ``target`` the memberships, object privileges (in this database and on
    databases) and default privileges ``source`` has. Additive: nothing is revoked."""
    to = quote_ident(target)
    statements = []
    memberships = await conn.fetch(
        "SELECT quote_ident(r.rolname), m.admin_option FROM pg_auth_members m "
        "JOIN pg_roles r ON r.oid = m.roleid WHERE m.member = $1::regrole",
        source,
    )
    for group, admin in memberships:
        statements.append(f"GRANT {group} TO {to}" + (" WITH ADMIN OPTION" if admin else ""))
    for kind, query in _COPY_QUERIES.items():
        for obj, privilege, grantable in await conn.fetch(query, source):
            option = " WITH GRANT OPTION" if grantable else ""
            statements.append(f"GRANT {privilege} ON {kind} {obj} TO {to}{option}")
    for (
        owner,
        schema,
        everywhere,
        objtype,
        privilege,
        grantable,
        grantee,
        to_source,
    ) in await conn.fetch(_DEFAULT_ACLS, source):
        objects = _DEFAULT_OBJECTS.get(objtype)
        if objects is None:
            continue
        where = "" if everywhere else f" IN SCHEMA {schema}"
        option = " WITH GRANT OPTION" if grantable else ""
        if to_source:  # objects others create are granted to the source: to the target too
            statements.append(
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner}{where} "
                f"GRANT {privilege} ON {objects} TO {to}{option}"
            )
        else:  # objects the source creates are granted to someone: so are the target's
            statements.append(
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {to}{where} "
                f"GRANT {privilege} ON {objects} TO {grantee}{option}"
            )
    for statement in statements:
        await _execute(conn, statement, f"copy the privileges of {source!r} to {target!r}")


async def _execute(conn: Any, sql: str, what: str, *, fetch: bool = False) -> None:
    try:
        if fetch:
            await conn.fetch(sql)
        else:
            await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        raise RotationError(f"{what}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    # server messages name roles and objects, never the statement text (where a verifier is)
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return f"{text} (SQLSTATE {sqlstate})" if sqlstate else text
