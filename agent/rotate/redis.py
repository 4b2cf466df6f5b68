"""Redis ACL passwords with real overlap (``redis-acl``).

A Redis ACL user may hold several passwords at once. A rotation adds the new one
(``ACL SETUSER <user> #<sha256>``: only its SHA-256 crosses the wire), proves it with
``AUTH`` on a new connection, and after ``grace`` removes the previous one
(``!<sha256>``), so both are valid in between; ``CONFIG SET requirepass`` would end
the old password at once. The first rotation takes the account over: it replaces
whatever passwords it had (``resetpass``), like ``postgres-password`` does. ``ACL
SAVE`` follows each change when the server keeps its users in an ACL file. A first
rotation that fails verification puts the replaced passwords back (by their hashes).

redis-py's asyncio client is imported here only, so only configs with this kind load it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from agent.rotate.base import Fields, RotationError, Rotator, new_password
from agent.rotate.store import Record

_TIMEOUT = 10.0
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def password_sha256(password: str) -> str:
    """The form ``ACL SETUSER`` accepts after ``#`` (and ``ACL GETUSER`` lists)."""
    return hashlib.sha256(password.encode()).hexdigest()


def _reason(exc: BaseException) -> str:
    # Redis echoes the rule it refused, hash included: show neither hash nor anything long
    text = _HEX64.sub("<sha256>", str(exc).splitlines()[0] if str(exc) else "")
    return text[:200] or type(exc).__name__


class AclRotator(Rotator):
    _taken_over: tuple[list[str], bool] | None = None  # before the first rotation

    @property
    def user(self) -> str:
        assert self.config.user is not None
        return self.config.user

    @asynccontextmanager
    async def _connect(self, user: str, password: str, what: str) -> AsyncIterator[Any]:
        tls = self.admin.tls
        client = aioredis.Redis(
            host=self.admin.host,
            port=self.admin.port,
            username=user,
            password=password,
            socket_timeout=_TIMEOUT,
            socket_connect_timeout=_TIMEOUT,
            retry=Retry(NoBackoff(), 0),  # the manager retries whole rotations, with backoff
            ssl=tls,
            ssl_cert_reqs="required",
            ssl_ca_certs=str(self.admin.ca_cert) if tls and self.admin.ca_cert else None,
            ssl_check_hostname=tls,
            single_connection_client=True,
        )
        try:
            await client.ping()  # logs in: a bad password fails here, not in the next step
        except (RedisError, OSError) as exc:
            await client.aclose()
            where = f"{self.admin.host}:{self.admin.port}"
            raise RotationError(f"{what} as {user!r} at {where}: {_reason(exc)}") from None
        try:
            yield client
        finally:
            await client.aclose()

    @asynccontextmanager
    async def _admin(self) -> AsyncIterator[Any]:
        user, password = self.admin_login()
        if user == self.user:
            raise RotationError(
                f"rotate.{self.config.name}.user: {self.user!r} is the account the admin "
                "secret logs in with; rotate another user"
            )
        async with self._connect(user, password, "admin login") as client:
            yield client

    async def _command(self, client: Any, what: str, *args: str) -> Any:
        try:
            return await client.execute_command(*args)
        except (RedisError, OSError) as exc:
            raise RotationError(f"{what} of Redis user {self.user!r}: {_reason(exc)}") from None

    async def _hashes(self, client: Any) -> list[str]:
        """The SHA-256 of every password the user has; RotationError if there is no user."""
        return (await self._passwords(client))[0]

    async def _passwords(self, client: Any) -> tuple[list[str], bool]:
        """(the user's password hashes, whether it is ``nopass``); RotationError if none."""
        answer = await self._command(client, "ACL GETUSER", "ACL", "GETUSER", self.user)
        if answer is None:
            raise RotationError(
                f"Redis user {self.user!r} does not exist; create it with its permissions "
                "first (ACL SETUSER ... or the ACL file)"
            )
        if isinstance(answer, dict):  # RESP3 map
            fields = answer
        else:
            fields = dict(zip(answer[::2], answer[1::2], strict=False))

        def text(values: Any) -> list[str]:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in values or []]

        flags = text(fields.get(b"flags", fields.get("flags")))
        return text(fields.get(b"passwords", fields.get("passwords"))), "nopass" in flags

    async def _set(self, client: Any, *rules: str) -> None:
        await self._command(client, "ACL SETUSER", "ACL", "SETUSER", self.user, *rules)
        try:
            await client.execute_command("ACL", "SAVE")
        except RedisError as exc:
            if "not configured to use an ACL file" not in str(exc):
                raise RotationError(
                    f"ACL SAVE after changing {self.user!r}: {_reason(exc)}"
                ) from None

    def fields(self, password: str) -> Fields:
        return {
            "username": self.user,
            "password": password,
            "host": self.admin.host,
            "port": self.admin.port,
        }

    async def create(self, record: Record) -> Fields:
        password = new_password(self.config.password_length)
        async with self._admin() as client:
            before = await self._passwords(client)  # the user must exist, with its permissions
            if record.current is None:
                self._taken_over = before  # what a failed first rotation puts back
                await self._set(client, "resetpass", f"#{password_sha256(password)}")
            else:
                await self._set(client, f"#{password_sha256(password)}")
        return self.fields(password)

    async def verify(self, new: Mapping[str, Any]) -> None:
        async with self._connect(str(new["username"]), str(new["password"]), "verification"):
            pass

    async def rollback(self, record: Record, new: Mapping[str, Any]) -> bool:
        if record.current is None:  # the first rotation: the passwords it replaced come back
            if self._taken_over is None:
                return False
            hashes, nopass = self._taken_over
            rules = ["resetpass", *(f"#{h}" for h in hashes)] + (["nopass"] if nopass else [])
            async with self._admin() as client:
                await self._set(client, *rules)
            return True
        await self._remove(password_sha256(str(new["password"])))
        return True

    def keep_previous(self, current: Mapping[str, Any]) -> Fields:
        # retiring needs only the hash: the store never keeps the old plaintext
        password = current.get("password")
        kept = {k: v for k, v in current.items() if k != "password"}
        if password is not None:
            kept["password_sha256"] = password_sha256(str(password))
        return kept

    async def retire(self, previous: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        digest = previous.get("password_sha256")
        if digest is None and previous.get("password") is not None:
            digest = password_sha256(str(previous["password"]))
        if digest is None or digest == password_sha256(str(current.get("password", ""))):
            return
        await self._remove(str(digest))

    async def _remove(self, digest: str) -> None:
        async with self._admin() as client:
            if digest in await self._hashes(client):  # already gone counts as removed
                await self._set(client, f"!{digest}")
