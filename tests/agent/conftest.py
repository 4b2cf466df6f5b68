"""Fixtures for the agent's Vault layer and sources, on the session's real servers.

Each test gets its own mounts (secrets engines, auth methods) on the shared
OpenBao dev server, so tests never see each other's leases. Faults come from a
TCP relay between the agent and OpenBao that a test can cut and restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from devservers import OpenBaoServer, PostgresCluster, configure_database_engine, free_port
from waiting import wait_until

from agent.config import AuthConfig, SecretConfig, VaultConfig
from agent.ledger import Ledger
from agent.secret import SecretValue
from agent.sources.base import Source, SourceContext
from agent.vault.client import VaultClient

ROOT = "devroot"


class Published:
    """A ``publish`` callback that records every value a source publishes."""

    def __init__(self) -> None:
        self.values: list[SecretValue] = []

    async def __call__(self, value: SecretValue) -> None:
        self.values.append(value)

    async def wait_for(
        self, predicate: Callable[[SecretValue], bool], limit: float = 30.0, what: str = "value"
    ) -> SecretValue:
        found: list[SecretValue] = []

        def check() -> bool:
            found[:] = [v for v in self.values if predicate(v)]
            return bool(found)

        await wait_until(check, limit, what)
        return found[0]


class Events:
    """The agent's JSON-log events captured through logging (names and fields)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def named(self, name: str, **fields: Any) -> list[logging.LogRecord]:
        return [
            r
            for r in self.caplog.records
            if r.name == "credsidecar"
            and r.getMessage() == name
            and all(getattr(r, k, None) == v for k, v in fields.items())
        ]


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Events:
    caplog.set_level(logging.DEBUG, logger="credsidecar")
    return Events(caplog)


class Relay:
    """A TCP relay to ``target_port`` that can be cut (connections dropped, port closed)."""

    def __init__(self, target_port: int, tls: ssl.SSLContext | None = None) -> None:
        self.target_port = target_port
        self.tls = tls  # terminate TLS here: OpenBao behind an https:// address
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self.tls
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.close()

    async def restore(self) -> None:
        await self.start()


@pytest.fixture
async def relay(openbao: OpenBaoServer) -> AsyncIterator[Relay]:
    r = Relay(openbao.port)
    await r.start()
    yield r
    await r.cut()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


def vault_config(address: str, auth: AuthConfig | None = None) -> VaultConfig:
    return VaultConfig(
        address=address,
        auth=auth or AuthConfig(method="token", token=ROOT),
        timeout=3.0,
        retry_initial=0.1,
        retry_max=1.0,
    )


@pytest.fixture
async def vault(openbao: OpenBaoServer) -> AsyncIterator[VaultClient]:
    client = VaultClient(vault_config(openbao.address))
    await client.login()
    yield client
    await client.close()


@pytest.fixture
def database_mount(
    openbao: OpenBaoServer, postgres: PostgresCluster, unique: str
) -> Iterator[Callable[..., str]]:
    """``database_mount(ttl=..., max_ttl=...)`` -> the mount of a database secrets engine of
    this test's own, role ``app``; disabled (what is left revoked) after the test."""
    mount = f"db-{unique}"
    configured = False

    def make(**ttls: str) -> str:
        nonlocal configured
        configure_database_engine(openbao, postgres, role="app", mount=mount, **ttls)
        configured = True
        return mount

    yield make
    if configured:
        openbao.client().sys.disable_secrets_engine(mount)  # revokes what is left


@pytest.fixture
def db_mount(database_mount: Callable[..., str]) -> str:
    """A database secrets engine of this test's own, role ``app`` (TTL 6 s, max 20 s)."""
    return database_mount()


def secret(name: str, kind: str, path: str, **kw: Any) -> SecretConfig:
    return SecretConfig(name=name, kind=kind, path=path, **kw)


class Clock:
    """An injected wall clock that moves only when a test moves it."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def context(
    vault: VaultClient | None, ledger: Ledger | None = None, clock: Clock | None = None
) -> tuple[SourceContext, Published]:
    published = Published()
    ctx = SourceContext(publish=published, vault=vault, ledger=ledger)
    if clock is not None:
        ctx.clock = clock
    return ctx, published


@contextlib.asynccontextmanager
async def running(source: Source) -> AsyncIterator[Source]:
    """Run ``source.run()`` in the background for the block; fail if it crashed."""
    task = asyncio.create_task(source.run())
    try:
        yield source
        if task.done():
            task.result()  # surface a crash inside run()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def can_login(postgres: PostgresCluster, user: str, password: str) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(postgres.dsn(user, password), timeout=10)
    except (asyncpg.PostgresError, OSError):
        return False
    await conn.close()
    return True


# Test modules reach the helpers through fixtures: with rootless test directories
# several conftest modules share the name "conftest", so importing one is fragile.


@pytest.fixture
def until() -> Callable[..., Awaitable[None]]:
    return wait_until


@pytest.fixture
def run() -> Callable[[Source], contextlib.AbstractAsyncContextManager[Source]]:
    return running


@pytest.fixture
def pg_login(postgres: PostgresCluster) -> Callable[[str, str], Awaitable[bool]]:
    async def check(user: str, password: str) -> bool:
        return await can_login(postgres, user, password)

    return check


Make = Callable[..., tuple[Source, Published]]


@pytest.fixture
def make_source() -> Make:
    """``make_source(name, kind, path, vault=, ledger=, clock=, **config)``: (source, published)."""
    from agent.sources import create

    def make(
        name: str,
        kind: str,
        path: str,
        *,
        vault: VaultClient | None = None,
        ledger: Ledger | None = None,
        clock: Clock | None = None,
        **kw: Any,
    ) -> tuple[Source, Published]:
        ctx, published = context(vault, ledger, clock)
        return create(secret(name, kind, path, **kw), ctx), published

    return make


@pytest.fixture
def new_vault() -> Callable[..., VaultClient]:
    """``new_vault(address, auth=None, clock=None)``: a client (not logged in), fast retries."""

    def make(
        address: str, auth: AuthConfig | None = None, clock: Clock | None = None
    ) -> VaultClient:
        if clock is None:
            return VaultClient(vault_config(address, auth))
        return VaultClient(vault_config(address, auth), clock=clock)

    return make


@pytest.fixture
def relay_class() -> type[Relay]:
    return Relay


@pytest.fixture
def clock() -> Clock:
    return Clock()
