"""The listening sockets (TCP and unix) and the open-file budget.

Accepting stays with the event loop's own server (uvloop's runs in C): an accept error
for lack of descriptors does not spin there either (asyncio stops accepting for a
second, libuv drains the backlog with a reserved descriptor). What keeps the proxy
from running out of descriptors is the budget checked at start and
``max_client_conn`` counted from accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

from proxy.clientauth import secure_socket
from proxy.config import ProxyConfig, ProxyConfigError
from proxy.transport import Link

Accepted = Callable[[Link, bool], None]  # (link, unix)
# descriptors besides client and server connections: listeners, the credentials file
# watcher, the agent's HTTP servers and files, TLS files, logs, refused connections
RESERVED_FILES = 96


class AcceptedLink(Link):
    """A link a listener accepted: it goes to ``on_accept`` once its transport is there."""

    def __init__(self, on_accept: Accepted, unix: bool) -> None:
        super().__init__()
        self.on_accept = on_accept
        self.unix = unix

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.use(transport)
        self.on_accept(self, self.unix)


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


class Listeners:
    """Binds ``listen`` and ``listen_unix``; every accepted link goes to ``on_accept``."""

    def __init__(self, config: ProxyConfig, on_accept: Accepted) -> None:
        self.config = config
        self.on_accept = on_accept
        self._servers: list[asyncio.Server] = []
        self.addresses: list[Any] = []
        self.socket_path: Path | None = None

    async def open(self) -> None:
        """Bind every listener; on failure the ones already bound are closed again."""
        try:
            await self._open()
        except BaseException as exc:  # bound: a bare raise after await breaks under mypyc
            self.close()
            raise exc

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.listen is not None:
            host, port = self.config.listen
            srv = await loop.create_server(
                partial(AcceptedLink, self.on_accept, False),
                host,
                port,
                reuse_address=True,
                backlog=1024,
            )
            self._servers.append(srv)
            # uvloop's sockets are a list, typeshed's a tuple: Any, or compiled code checks it
            self.addresses += [s.getsockname() for s in cast(Any, srv).sockets]
        path = self.config.unix_socket_path
        if path is not None and self.config.listen is not None and self.config.listen[1] == 0:
            path = path.with_name(f".s.PGSQL.{self.port}")  # same port number as TCP
        self.socket_path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            srv = await loop.create_unix_server(
                partial(AcceptedLink, self.on_accept, True), str(path)
            )
            secure_socket(path, self.config.unix_socket_mode, self.config.unix_socket_group)
            self._servers.append(srv)
            self.addresses.append(str(path))

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with ``listen: 127.0.0.1:0``)."""
        for addr in self.addresses:
            if isinstance(addr, tuple):
                return int(addr[1])
        raise RuntimeError("no TCP listener")

    def close(self) -> None:
        """Stop accepting (the unix socket file goes too)."""
        for srv in self._servers:
            srv.close()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()

    async def wait_closed(self) -> None:
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
