"""Helpers for the rotation tests: configs, an in-process Rotation, a webhook receiver."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from devservers import AUDIT, ROOT_TOKEN, OpenBaoServer, PostgresCluster, free_port

from agent.rotate.base import RotatorContext, create_rotator
from agent.rotate.config import AdminConfig, RotateConfig
from agent.rotate.manager import Rotation
from agent.rotate.store import Record, Store
from agent.secret import SecretValue
from agent.vault.client import VaultClient

TEMPLATE = (
    '{"username": {{ secrets["db-password"].username | tojson }}, '
    '"password": {{ secrets["db-password"].password | tojson }}, '
    '"version": {{ secrets["db-password"].lease.version | tojson }}}'
)


def rotate_config(
    openbao: OpenBaoServer,
    postgres: PostgresCluster,
    shm: Path,
    unique: str,
    out: Path | None,
    *,
    name: str = "db-password",
    kind: str = "postgres-dual-user",
    database: str = "postgres",
    **entry: Any,
) -> dict[str, Any]:
    """An agent config rotating ``name`` (default: dual-user ``e2e<unique>``, store
    ``secret/data/rot-e2e-<unique>``, grace 3s) with a superuser admin secret; rendered to
    ``out/db.json`` (TEMPLATE, for ``db-password``) unless ``out`` is None. ``entry``
    overrides keys of the rotate entry."""
    token_file = shm / "token"
    token_file.write_text(ROOT_TOKEN)
    admin = shm / "admin.json"
    admin.write_text(json.dumps({"username": postgres.superuser, "password": postgres.password}))
    admin.chmod(0o600)
    config: dict[str, Any] = {
        "vault": {
            "address": openbao.address,
            "auth": {"method": "token", "token_file": str(token_file)},
        },
        "secrets": {"db_admin": {"kind": "file", "path": str(admin)}},
        "rotate": {
            name: {
                "kind": kind,
                "admin": {
                    "secret": "db_admin",
                    "host": "127.0.0.1",
                    "port": postgres.port,
                    "database": database,
                },
                "role": f"e2e{unique}",
                "store": {"vault_kv": f"secret/data/rot-e2e-{unique}"},
                "every": "1h",
                "grace": "3s",
                "poll": "500ms",
                **entry,
            }
        },
    }
    if out is not None:
        out.mkdir(exist_ok=True)
        config["templates"] = [{"destination": str(out / "db.json"), "contents": TEMPLATE}]
    return config


class Published:
    """The ``publish`` callback of a Rotation: records every value (and audits secrets)."""

    def __init__(self) -> None:
        self.values: list[SecretValue] = []

    async def __call__(self, value: SecretValue) -> None:
        for field in ("password", "private_key", "api_key"):
            if value.data.get(field):
                AUDIT.secret(value.data[field])
        self.values.append(value)

    @property
    def last(self) -> SecretValue:
        return self.values[-1]


def admin_value(pg: PostgresCluster) -> SecretValue:
    """The agent's admin secret for ``pg`` (its superuser)."""
    return SecretValue(
        name="db_admin", data={"username": pg.superuser, "password": pg.password}, version="1"
    )


def config(name: str, kind: str, store: str, **kw: Any) -> RotateConfig:
    kw.setdefault("retry_initial", 0.2)
    kw.setdefault("retry_max", 1.0)
    return RotateConfig(name=name, kind=kind, store=store, **kw)


def pg_config(name: str, kind: str, store: str, pg: PostgresCluster, **kw: Any) -> RotateConfig:
    return config(name, kind, store, admin=AdminConfig("db_admin", port=pg.port), **kw)


def rotation(
    cfg: RotateConfig,
    vault: VaultClient,
    pg: PostgresCluster | None = None,
    owner: str = "test-replica",
    *,
    admin: SecretValue | None = None,
) -> tuple[Rotation, Published]:
    """A Rotation of ``cfg``; its admin secret (``cfg.admin.secret``) is ``admin``, or
    the superuser of ``pg``."""
    admin = admin if admin is not None else admin_value(pg) if pg is not None else None
    name = cfg.admin.secret if cfg.admin is not None else "db_admin"
    context = RotatorContext(vault=vault, lookup=lambda n: admin if n == name else None)
    published = Published()
    store = Store(vault, cfg.store)
    return Rotation(cfg, create_rotator(cfg, context), store, published, owner), published


@asynccontextmanager
async def looping(rot: Rotation) -> AsyncIterator[Rotation]:
    """Run ``rot.run()`` in the background for the block; fail if it stopped."""
    task = asyncio.create_task(rot.run())
    try:
        yield rot
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def step_until(
    until: Any, rot: Rotation, done: Callable[[], Awaitable[bool] | bool], what: str
) -> None:
    """Step ``rot`` as its loop would (it retires once grace has passed) until ``done``;
    ``until`` is the fixture of that name."""

    async def stepped() -> bool:
        await rot.step()
        result = done()
        return bool(await result if inspect.isawaitable(result) else result)

    await until(stepped, 20, what)


def but(cfg: RotateConfig, **changes: Any) -> RotateConfig:
    return dataclasses.replace(cfg, **changes)


async def read_record(vault: VaultClient, path: str) -> Record:
    return await Store(vault, path).read()


def kv_raw(openbao: OpenBaoServer, path: str) -> dict[str, Any]:
    """The KV data at ``path``, read with the root token (``secret/data/x`` -> data)."""
    mount, _, rest = path.partition("/data/")
    response = openbao.client().secrets.kv.v2.read_secret_version(
        path=rest, mount_point=mount, raise_on_deleted_version=True
    )
    data: dict[str, Any] = response["data"]["data"]
    return data


def kv_record(openbao: OpenBaoServer, path: str) -> dict[str, Any]:
    """The stored rotation record: the bookkeeping under ``_credsidecar``, with the flat
    fields around it as ``current`` (decoded here, not with the agent's code)."""
    data = kv_raw(openbao, path)
    assert "_credsidecar" in data, sorted(data)  # always the flat layout once written
    current = {k: v for k, v in data.items() if k != "_credsidecar"}
    return {**data["_credsidecar"], "current": current or None}


async def can_login(pg: PostgresCluster, user: str, password: str, sql: str | None = None) -> bool:
    try:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=pg.port,
            user=user,
            password=password,
            database="postgres",
            timeout=10,
        )
    except (asyncpg.PostgresError, OSError):
        return False
    try:
        if sql:
            await conn.execute(sql)
    finally:
        await conn.close()
    return True


class Webhook:
    """A tiny Slack-compatible receiver: collects the JSON bodies posted to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/T000/B000/not-a-real-token"

    def texts(self) -> list[str]:
        return [str(b.get("text")) for b in self.bodies]


@asynccontextmanager
async def webhook_server() -> AsyncIterator[Webhook]:
    hook = Webhook()

    async def receive(request: web.Request) -> web.Response:
        hook.bodies.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hooks/{tail:.*}", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", hook.port)
    await site.start()
    try:
        yield hook
    finally:
        await runner.cleanup()
