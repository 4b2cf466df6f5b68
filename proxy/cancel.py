"""Cancel keys: the proxy's own BackendKeyData per client, and forwarding a CancelRequest
to whichever server connection is running that client's query."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
from typing import Final, Protocol

from proxy import metrics, upstream
from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError
from proxy.protocol import messages as m
from proxy.transport import Link
from proxy.upstream import ServerConn

log = logging.getLogger("credsidecar.proxy")

# Fake pids live above PostgreSQL's PID_MAX_LIMIT (Linux's largest pid, 2^22), so a
# client's pg_terminate_backend(<its reported pid>) can never name a real backend;
# BackendKeyData carries an int32, hence the top.
PID_MAX_LIMIT: Final = 4_194_304
_PID_LOW: Final = PID_MAX_LIMIT + 1
_PID_HIGH: Final = (1 << 31) - 1


class Cancellable(Protocol):
    process_id: int
    secret_key: int
    conn: ServerConn | None


class CancelKeys:
    """Process ids unique among the connected clients (in ``_PID_LOW.._PID_HIGH``), each
    with a random secret."""

    def __init__(self) -> None:
        self.by_pid: dict[int, Cancellable] = {}
        self._random = b""  # os.urandom bytes for the secrets, used from _random_at on
        self._random_at = 0
        self._next_pid = _PID_LOW + secrets.randbelow(_PID_HIGH - _PID_LOW + 1)

    def _advance(self) -> None:
        self._next_pid = self._next_pid + 1 if self._next_pid < _PID_HIGH else _PID_LOW

    def register(self, client: Cancellable) -> tuple[int, int]:
        while self._next_pid in self.by_pid:
            self._advance()
        pid = self._next_pid
        self._advance()
        self.by_pid[pid] = client
        return pid, self._secret()

    def _secret(self) -> int:
        """31 random bits, as secrets.randbits(31): from os.urandom, read for 1,024
        secrets at a time (a system call and two Python calls per login, otherwise)."""
        at = self._random_at
        if at + 4 > len(self._random):
            self._random = os.urandom(4 * 1024)
            at = 0
        self._random_at = at + 4
        r = self._random
        return (r[at] & 0x7F) << 24 | r[at + 1] << 16 | r[at + 2] << 8 | r[at + 3]

    def unregister(self, pid: int, client: Cancellable) -> None:
        """``client`` no longer holds ``pid`` (its process_id: passed, not read through
        the Protocol, which compiled is an attribute lookup by name)."""
        if self.by_pid.get(pid) is client:
            del self.by_pid[pid]

    def target(self, request: m.CancelRequest) -> tuple[int, int] | None:
        """The upstream key to cancel for ``request``, or None (counted) if nothing runs."""
        client = self.by_pid.get(request.process_id)
        if client is None or not hmac.compare_digest(
            client.secret_key.to_bytes(4, "big", signed=True),
            request.secret_key.to_bytes(4, "big", signed=True),
        ):
            metrics.cancel_requests_total.labels("unknown").inc()
            return None
        key = running_key(client.conn)
        metrics.cancel_requests_total.labels("idle" if key is None else "forwarded").inc()
        return key


def running_key(conn: ServerConn | None) -> tuple[int, int] | None:
    """The upstream cancel key of ``conn`` while it runs a request, else None."""
    if conn is None or conn.closed or conn.pipeline.idle or conn.backend_key is None:
        return None
    return conn.backend_key.process_id, conn.backend_key.secret_key


async def send_cancel(cfg: UpstreamConfig, process_id: int, secret_key: int) -> None:
    """One CancelRequest on a connection of its own, as PostgreSQL wants it."""
    loop = asyncio.get_running_loop()
    link: Link | None = None
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            _, link = await loop.create_connection(Link, cfg.host, cfg.port)
            if cfg.sslmode in ("require", "verify-ca", "verify-full"):
                await upstream._negotiate_tls(link, cfg)
            link.write(m.cancel_request(process_id, secret_key))
            with contextlib.suppress(ConnectionError):
                await link.recv()  # the server closes when done
    except (OSError, TimeoutError, UpstreamError) as exc:
        log.warning("proxy_cancel_failed", extra={"error": str(exc) or type(exc).__name__})
    finally:
        if link is not None:
            link.close()
