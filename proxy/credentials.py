"""Where the proxy's upstream credentials come from.

The design follows asyncpg's "password may be a callable resolved on each connect":
the pool asks :meth:`CredentialProvider.current` whenever it opens a server
connection, and waits on :meth:`CredentialProvider.changed` to learn about a new
generation. A generation number increases only when the username or the password
actually changes, so server connections can be tagged with the one they used.

* :class:`StaticCredentialProvider` - the agent pushes into it with ``update()``.
* :class:`FileCredentialProvider` - watches a JSON file ``{"username", "password"}``
  (optionally ``"expires_at"``, epoch seconds); a half-written or invalid file is
  logged and ignored, never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Protocol

import watchfiles

log = logging.getLogger("credsidecar.proxy")

# watchfiles' thread sleeps a step at a time and takes the GIL after each one; a
# change is seen within two steps. At 20 ms that was 50 wake-ups a second, 3.9 ms of
# CPU a second on an idle proxy (and a GIL hand-off from the busy loop each time);
# at 100 ms it is 0.7 ms.
WATCH_STEP_MS: Final = 100


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    generation: int
    # wall clock (epoch seconds) when the credential stops working (a lease's end);
    # no server connection outlives it. None: no known end.
    expires_at: float | None = None


class CredentialProvider(Protocol):
    def current(self) -> Credentials | None:
        """The newest credentials, or ``None`` before any are known."""

    async def changed(self, after: int | None = None) -> Credentials:
        """Wait for credentials of a generation newer than ``after`` (default: current)."""

    async def start(self) -> None:
        """Begin watching (no-op for pushed credentials)."""

    async def close(self) -> None:
        """Stop watching."""


class StaticCredentialProvider:
    """Credentials held in memory; ``update()`` bumps the generation on a real change."""

    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self._current: Credentials | None = None
        self._changed = asyncio.Event()
        if username is not None and password is not None:
            self.update(username, password)

    def current(self) -> Credentials | None:
        return self._current

    def update(self, username: str, password: str, expires_at: float | None = None) -> bool:
        """Set new credentials; True when they differ from the current ones. The same
        ones with another ``expires_at`` (a renewed lease) keep their generation."""
        cur = self._current
        if cur is not None and cur.username == username and cur.password == password:
            if cur.expires_at != expires_at:
                self._current = replace(cur, expires_at=expires_at)
            return False
        generation = (cur.generation if cur else 0) + 1
        self._current = Credentials(username, password, generation, expires_at)
        log.info("proxy_credentials_changed", extra={"user": username, "generation": generation})
        # wake every waiter, then arm a fresh event for the next change
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def changed(self, after: int | None = None) -> Credentials:
        if after is None:
            after = self._current.generation if self._current else 0
        while self._current is None or self._current.generation <= after:
            await self._changed.wait()
        return self._current

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class FileCredentialProvider(StaticCredentialProvider):
    """Credentials from a JSON file, re-read whenever the file changes."""

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self.path = Path(path)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def reload(self) -> bool:
        """Read the file; True if it held new credentials. Bad content is logged, not used."""
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            log.warning(
                "proxy_credentials_unreadable",
                extra={"path": str(self.path), "error": exc.strerror or type(exc).__name__},
            )
            return False
        try:
            data = json.loads(raw)
            username, password = data["username"], data["password"]
            if not isinstance(username, str) or not isinstance(password, str) or not username:
                raise TypeError("username and password must be strings")
            expires_at = data.get("expires_at")  # optional: epoch seconds
            if expires_at is not None and (
                isinstance(expires_at, bool) or not isinstance(expires_at, int | float)
            ):
                raise TypeError("expires_at must be a number")
        except (ValueError, KeyError, TypeError) as exc:
            # the reason only: the content itself may hold a password
            log.warning(
                "proxy_credentials_invalid",
                extra={"path": str(self.path), "error": type(exc).__name__, "bytes": len(raw)},
            )
            return False
        return self.update(username, password, None if expires_at is None else float(expires_at))

    async def start(self) -> None:
        self.reload()
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._watch(), name="proxy-credentials-watch")
            # let the task arm its watch (awatch creates the inotify watches before its
            # first await): a change written right after start() is then never missed
            await asyncio.sleep(0)

    async def _watch(self) -> None:
        # watch the directory: an atomic replace swaps the inode the file name points to
        directory = self.path.parent
        name = self.path.name
        while not self._stop.is_set():
            try:
                async for changes in watchfiles.awatch(
                    directory,
                    stop_event=self._stop,
                    debounce=50,
                    step=WATCH_STEP_MS,
                    recursive=False,
                ):
                    if any(Path(p).name == name for _, p in changes):
                        self.reload()
            except FileNotFoundError:
                log.warning("proxy_credentials_dir_missing", extra={"path": str(directory)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
            else:
                # awatch also ends when the directory disappears; retry unless stopping
                if not self._stop.is_set():
                    await asyncio.sleep(0.5)
                self.reload()

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
