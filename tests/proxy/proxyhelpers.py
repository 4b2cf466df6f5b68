"""Helpers for the proxy tests (a uniquely named module: several conftest.py exist).

psql and pgbench must run as asyncio subprocesses (:func:`run`): the proxy lives in
the same event loop as the test and would starve behind a blocking ``subprocess.run``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from devservers import PostgresCluster, pg_bindir
from waiting import wait_until  # noqa: F401 - the proxy tests import it from here

from proxy.config import ProxyConfig
from proxy.server import ProxyServer


@dataclass
class Role:
    name: str
    password: str
    database: str


def make_role(pg: PostgresCluster, prefix: str = "papp") -> Role:
    suffix = secrets.token_hex(4)
    role = Role(f"{prefix}_{suffix}", "pw-" + secrets.token_hex(12), f"{prefix}db_{suffix}")
    pg.psql(f"CREATE ROLE {role.name} LOGIN PASSWORD '{role.password}'")
    pg.psql(f"CREATE DATABASE {role.database} OWNER {role.name}")
    return role


def write_credentials(path: Path, username: str, password: str) -> None:
    """Atomic replace, like the agent's renders."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"username": username, "password": password}))
    os.replace(tmp, path)


@dataclass
class RunningProxy:
    server: ProxyServer
    config: ProxyConfig
    creds_file: Path

    @property
    def port(self) -> int:
        return self.server.port

    def dsn(self, user: str = "app", db: str = "postgres", password: str = "x") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{db}"


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def run(*argv: str, env: dict[str, str] | None = None, limit: float = 60) -> Result:
    """A subprocess run without blocking the event loop the proxy lives in."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return Result(proc.returncode or 0, out.decode(), err.decode())


async def psql(
    host: str,
    port: int | str,
    user: str,
    database: str,
    *args: str,
    env: dict[str, str] | None = None,
    limit: float = 60,
) -> Result:
    """``psql -X -A -t`` as ``user`` to ``database`` at host:port; ``args`` follow (``-c SQL``)."""
    return await run(
        pg_tool("psql"),
        "-X",
        "-A",
        "-t",
        "-h",
        host,
        "-p",
        str(port),
        "-U",
        user,
        "-d",
        database,
        *args,
        env=env,
        limit=limit,
    )


def pg_tool(name: str) -> str:
    return str(pg_bindir() / name)


def pgbench_counts(output: str) -> tuple[int, int]:
    """(transactions processed, failed transactions) from pgbench's summary."""
    done = re.search(r"number of transactions actually processed: (\d+)", output)
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert done is not None, output
    return int(done.group(1)), int(failed.group(1)) if failed else 0


async def pgbench(port: int, db: str, *args: str, seconds: int = 3, clients: int = 16) -> Result:
    return await run(
        pg_tool("pgbench"),
        "-n",
        "-c",
        str(clients),
        "-j",
        "2",
        "-T",
        str(seconds),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        "app",
        *args,
        db,
        limit=seconds + 120,
    )


def imported_modules(path: Path) -> list[str]:
    """Absolute module names a Python file imports (relative imports left out)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names
