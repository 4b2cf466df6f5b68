"""Helpers for the proxy tests (a uniquely named module: several conftest.py exist).

psql and pgbench must run as asyncio subprocesses (:func:`run`): the proxy lives in
the same event loop as the test and would starve behind a blocking ``subprocess.run``.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from devservers import PostgresCluster, pg_bindir
from waiting import wait_until  # the proxy tests import it from here too

from proxy.config import ProxyConfig
from proxy.protocol import messages as m
from proxy.protocol.auth import ScramSecret
from proxy.protocol.backend import ServerConnection
from proxy.protocol.messages import startup_message
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


def write_credentials(
    path: Path, username: str, password: str, expires_at: float | None = None
) -> None:
    """Atomic replace, like the agent's renders."""
    tmp = path.with_name(path.name + ".tmp")
    record: dict[str, object] = {"username": username, "password": password}
    if expires_at is not None:
        record["expires_at"] = expires_at
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


async def connect_direct(pg: PostgresCluster, role: Role | None = None) -> asyncpg.Connection:
    """asyncpg straight to the cluster: as ``role`` to its database, else as superuser."""
    if role is None:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=pg.port,
            user=pg.superuser,
            password=pg.password,
            database="postgres",
        )
    return await asyncpg.connect(
        host="127.0.0.1",
        port=pg.port,
        user=role.name,
        password=role.password,
        database=role.database,
    )


def frames_of(data: bytes) -> list[tuple[int, int, int]]:
    """(type, start, end) of each whole message in ``data``, as the frame readers give."""
    frames, pos = [], 0
    while pos < len(data):
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        frames.append((data[pos], pos, end))
        pos = end
    return frames


def standalone_config(
    tmp_path: Path, upstream_port: int, role: Role, port: int, extra: str = ""
) -> Path:
    """A config file for :class:`StandaloneProxy`: trust auth on ``port``, the role's
    credentials in a file; ``extra`` holds more ``proxy:`` lines (indented)."""
    write_credentials(tmp_path / "db.json", role.name, role.password)
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "proxy:\n"
        f"  listen: 127.0.0.1:{port}\n"
        f"  upstream: {{host: 127.0.0.1, port: {upstream_port}, sslmode: disable}}\n"
        "  credentials: {file: db.json}\n" + extra
    )
    return path


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


class StandaloneProxy:
    """``python -m proxy -c FILE`` as a process of its own (to measure its memory).

    ``async with StandaloneProxy(path, port) as proxy`` waits until it accepts; at exit
    it is stopped with SIGTERM and ``returncode`` / ``stderr`` are set.
    """

    def __init__(self, config: Path, port: int) -> None:
        self.config, self.port = config, port
        self.proc: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None
        self.stderr = b""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def peak_rss(self) -> int:
        """VmHWM of the proxy process, in bytes (the kernel's high-water mark)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    async def __aenter__(self) -> StandaloneProxy:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "-c", str(self.config), stderr=asyncio.subprocess.PIPE
        )

        async def accepts() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        try:
            await wait_until(accepts, what="standalone proxy accepting")
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        _, self.stderr = await asyncio.wait_for(self.proc.communicate(), 30)
        self.returncode = self.proc.returncode
        if exc and exc[0] is not None:
            # the test failed inside: its report shows what the proxy logged meanwhile
            print(self.stderr.decode(errors="replace")[-4000:], file=sys.stderr)


class WireClient:
    """A bare PostgreSQL client (trust auth) that streams big requests and answers
    instead of holding them, so a test can push hundreds of MiB through the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, user: str, database: str) -> WireClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(startup_message({"user": user, "database": database}))
        while (await client.message())[0] != b"Z":
            pass
        return client

    async def header(self) -> tuple[bytes, int]:
        head = await self.reader.readexactly(5)
        return head[:1], int.from_bytes(head[1:], "big") - 4

    async def message(self) -> tuple[bytes, bytes]:
        kind, size = await self.header()
        body = await self.reader.readexactly(size)
        if kind == b"E":
            raise AssertionError(f"server error: {body!r}")
        return kind, body

    async def send_query(self, parts: Iterable[bytes], size: int) -> None:
        """A simple Query of ``size`` bytes of SQL text given in ``parts``, written with
        backpressure (the client never holds more than one part)."""
        self.writer.write(b"Q" + (size + 5).to_bytes(4, "big"))
        for part in parts:
            self.writer.write(part)
            await self.writer.drain()
        self.writer.write(b"\0")
        await self.writer.drain()

    async def rows(self, on_value: Callable[[bytes], None], chunk: int = 1 << 20) -> int:
        """Read the answer to a query up to ReadyForQuery; each column value of each
        DataRow is fed to ``on_value`` in pieces. Returns the number of rows."""
        count = 0
        while True:
            kind, size = await self.header()
            if kind == b"Z":
                await self.reader.readexactly(size)
                return count
            if kind != b"D":
                body = await self.reader.readexactly(size)
                if kind == b"E":
                    raise AssertionError(f"server error: {body!r}")
                continue
            count += 1
            columns = int.from_bytes(await self.reader.readexactly(2), "big")
            for _ in range(columns):
                left = int.from_bytes(await self.reader.readexactly(4), "big", signed=True)
                while left > 0:
                    piece = await self.reader.read(min(chunk, left))
                    if not piece:
                        raise ConnectionError("closed in the middle of a row")
                    on_value(piece)
                    left -= len(piece)

    async def close(self) -> None:
        self.writer.write(b"X\0\0\0\4")
        self.writer.close()
        await self.writer.wait_closed()


def scram_verifier(password: str) -> str:
    """A users-file verifier for ``password``, in pg_authid's SCRAM-SHA-256 text form."""
    secret = ScramSecret.from_password(password)
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${secret.iterations}:{b64(secret.salt).decode()}$"
        f"{b64(secret.stored_key).decode()}:{b64(secret.server_key).decode()}"
    )


def ready_server() -> ServerConnection:
    """The proxy's side of a server connection that has logged in (trust), no I/O."""
    server = ServerConnection()
    server.send(m.StartupMessage({"user": "u"}))
    server.receive_data(m.authentication(0) + m.ready_for_query(b"I"))
    while server.next_event() is not None:
        pass
    return server
