"""The listening sockets (TCP and unix), the accept loop, and the open-file budget.

The proxy accepts with a loop of its own rather than asyncio's server, so that an
accept error (EMFILE and the like: out of file descriptors) backs off with the shared
:class:`~proxy.backoff.Backoff` instead of spinning, and is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import resource
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy import metrics
from proxy.backoff import Backoff
from proxy.clientauth import secure_socket
from proxy.config import ProxyConfig, ProxyConfigError
from proxy.transport import Link

log = logging.getLogger("credsidecar.proxy")

Accepted = Callable[[Link, bool], None]  # (link, unix)
# out of a resource: wait for connections to end rather than retry at once
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# descriptors besides client and server connections: listeners, the credentials file
# watcher, the agent's HTTP servers and files, TLS files, logs, refused connections
RESERVED_FILES = 96


def open_file_budget(config: ProxyConfig, server_connections: int) -> int:
    """Open files the proxy may need at once: every client, every server connection
    (plus one cancel connection each), and the reserve."""
    return config.max_client_conn + 2 * server_connections + RESERVED_FILES


def raise_open_file_limit(config: ProxyConfig, server_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; refuse a config that cannot fit.

    Returns the soft limit now in force. Raises :class:`ProxyConfigError` naming
    ``proxy.max_client_conn`` when the budget exceeds even the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    need = open_file_budget(config, server_connections)
    if need > soft:
        raise ProxyConfigError(
            [
                f"proxy.max_client_conn: {config.max_client_conn} clients + "
                f"{server_connections} server connections (x2 for cancels) + "
                f"{RESERVED_FILES} reserved need {need} open files, but the open-file "
                f"limit (RLIMIT_NOFILE) is {soft}: lower max_client_conn or raise the limit "
                "(ulimit -n, or the container runtime's nofile)"
            ]
        )
    return soft


def _tcp_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of ``host``."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            if port == 0:  # every address on the same port
                port = sock.getsockname()[1]
            sock.listen(1024)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listeners:
    """Binds ``listen`` and ``listen_unix``; every accepted link goes to ``on_accept``."""

    def __init__(self, config: ProxyConfig, on_accept: Accepted) -> None:
        self.config = config
        self.on_accept = on_accept
        self._sockets: list[tuple[socket.socket, bool]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.addresses: list[Any] = []
        self.socket_path: Path | None = None

    def _link(self, unix: bool) -> Link:
        link = Link()
        link.on_made = lambda lk: self.on_accept(lk, unix)
        return link

    async def open(self) -> None:
        """Bind every listener and start accepting; on failure nothing stays bound."""
        try:
            self._bind()
        except BaseException:
            self.close()
            raise
        for sock, unix in self._sockets:
            name = "proxy-accept-unix" if unix else "proxy-accept"
            self._tasks.append(asyncio.create_task(self._accept(sock, unix), name=name))

    def _bind(self) -> None:
        if self.config.listen is not None:
            host, port = self.config.listen
            for sock in _tcp_sockets(host, port):
                self._sockets.append((sock, False))
                self.addresses.append(sock.getsockname())
        path = self.config.unix_socket_path
        if path is not None and self.config.listen is not None and self.config.listen[1] == 0:
            path = path.with_name(f".s.PGSQL.{self.port}")  # same port number as TCP
        self.socket_path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sockets.append((sock, True))
            sock.bind(str(path))
            secure_socket(path, self.config.unix_socket_mode, self.config.unix_socket_group)
            sock.listen(1024)
            sock.setblocking(False)
            self.addresses.append(str(path))

    async def _accept(self, listener: socket.socket, unix: bool) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(0.1, 2.0, random.Random())
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                delay = backoff.next()
                metrics.accept_errors_total.labels(errno.errorcode.get(exc.errno, "?")).inc()
                log.warning("proxy_accept_failed", extra={"error": exc.strerror, "retry_in": delay})
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            try:
                await loop.connect_accepted_socket(lambda: self._link(unix), sock)
            except OSError:
                sock.close()  # the client left before its transport was set up

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with ``listen: 127.0.0.1:0``)."""
        for addr in self.addresses:
            if isinstance(addr, tuple):
                return int(addr[1])
        raise RuntimeError("no TCP listener")

    def close(self) -> None:
        """Stop accepting (the unix socket file goes too)."""
        for task in self._tasks:
            task.cancel()
        for sock, _ in self._sockets:
            sock.close()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
