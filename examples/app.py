"""Sample application: queries PostgreSQL with the credentials credsidecar renders.

It reads a JSON file ``{"username", "password", "host", "port", "database"}``,
writes its pid file (so a sidecar can signal it), runs ``SELECT current_user``
every ``--interval`` seconds and prints ``app query ok user=<username>``.

On SIGHUP it re-reads the file and reconnects, make-before-break: the old
connection stays in use until the new one is logged in. A failed query or a
lost connection also leads to a re-read, so the app recovers even without a
signal. SIGTERM/SIGINT stop it cleanly (exit 0). The password is never printed.

Standard library + asyncpg only, so it runs in any image that has asyncpg.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg

FIELDS = ("username", "password", "host", "port", "database")
# Errors that mean "this connection or these credentials no longer work": re-read and retry.
RETRYABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ValueError)


def say(text: str) -> None:
    # one line per event, flushed: the demo follows our stdout through the agent's
    print(text, flush=True)


def read_credentials(path: Path) -> dict[str, Any]:
    """The rendered file, checked for the fields we need (the values are never shown)."""
    raw = json.loads(path.read_text())
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a JSON object")
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise ValueError(f"{path}: missing fields {', '.join(missing)}")
    return dict(raw)


def describe(exc: BaseException) -> str:
    """Error type and SQLSTATE only: driver messages are not ours to vouch for."""
    code = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}" + (f" sqlstate={code}" if code else "")


def write_pid_file(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)  # a reader never sees an empty pid file


def remove_pid_file(path: Path) -> None:
    # only if it is still ours: a newer instance may have replaced it
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


class App:
    def __init__(self, credentials: Path, interval: float, connect_timeout: float) -> None:
        self.credentials = credentials
        self.interval = interval
        self.connect_timeout = connect_timeout
        self.conn: Any = None  # asyncpg.Connection
        self.user: str | None = None
        self.reload = False
        self.stopping = False
        self.wake = asyncio.Event()
        self._waiting_said = False

    def on_reload(self) -> None:
        say("app reloading credentials (SIGHUP)")
        self.reload = True
        self.wake.set()

    def on_stop(self) -> None:
        self.stopping = True
        self.wake.set()

    async def connect(self) -> bool:
        """Log in with the file's current credentials; keep the old connection on failure."""
        try:
            creds = read_credentials(self.credentials)
        except FileNotFoundError:
            if not self._waiting_said:
                say(f"app waiting for credentials file={self.credentials}")
                self._waiting_said = True
            return False
        except (OSError, ValueError) as exc:
            say(f"app cannot read credentials error={describe(exc)}")
            return False
        try:
            conn = await asyncpg.connect(
                host=str(creds["host"]),
                port=int(creds["port"]),
                user=str(creds["username"]),
                password=str(creds["password"]),
                database=str(creds["database"]),
                timeout=self.connect_timeout,
                ssl=creds.get("sslmode", "prefer"),
            )
        except RETRYABLE as exc:
            say(f"app connect failed user={creds['username']} error={describe(exc)}")
            return False
        old, self.conn, self.user = self.conn, conn, str(creds["username"])
        say(f"app connected user={self.user}")
        if old is not None:
            with contextlib.suppress(*RETRYABLE):
                await old.close(timeout=5)
        return True

    async def query(self) -> None:
        try:
            user = await self.conn.fetchval("SELECT current_user", timeout=10)
        except RETRYABLE as exc:
            say(f"app query failed user={self.user} error={describe(exc)}")
            # the role may have been replaced or revoked: re-read the file and log in again
            self.reload = True
            return
        say(f"app query ok user={user}")

    async def pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), self.interval)
        self.wake.clear()

    async def run(self) -> None:
        while not self.stopping:
            if self.reload or self.conn is None or self.conn.is_closed():
                # a failed reload keeps the old login and tries the file again next time
                self.reload = not await self.connect()
                if self.conn is None or self.conn.is_closed():
                    await self.pause()
                    continue
            await self.query()
            if not self.stopping:
                await self.pause()
        if self.conn is not None:
            with contextlib.suppress(*RETRYABLE):
                await self.conn.close(timeout=5)


async def main_async(args: argparse.Namespace) -> None:
    app = App(Path(args.credentials), args.interval, args.connect_timeout)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, app.on_reload)
    loop.add_signal_handler(signal.SIGTERM, app.on_stop)
    loop.add_signal_handler(signal.SIGINT, app.on_stop)
    pid_file = Path(args.pid_file) if args.pid_file else None
    if pid_file is not None:
        write_pid_file(pid_file)
    say(f"app started pid={os.getpid()}")
    try:
        await app.run()
    finally:
        if pid_file is not None:
            remove_pid_file(pid_file)
    say("app stopped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--credentials",
        default=env.get("APP_CREDENTIALS", "/dev/shm/app/db.json"),
        help="rendered credentials JSON (env APP_CREDENTIALS)",
    )
    p.add_argument(
        "--pid-file", default=env.get("APP_PID_FILE"), help="write our pid here (env APP_PID_FILE)"
    )
    p.add_argument(
        "--interval",
        type=float,
        default=float(env.get("APP_INTERVAL", "0.5")),
        help="seconds between queries (env APP_INTERVAL)",
    )
    p.add_argument("--connect-timeout", type=float, default=10.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    asyncio.run(main_async(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
