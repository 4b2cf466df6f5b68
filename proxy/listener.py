"""The listening sockets (TCP and unix) and what happens at accept."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.clientauth import secure_socket
from proxy.config import ProxyConfig
from proxy.transport import Link

Accepted = Callable[[Link, bool], None]  # (link, unix)


class Listeners:
    """Binds ``listen`` and ``listen_unix``; every accepted link goes to ``on_accept``."""

    def __init__(self, config: ProxyConfig, on_accept: Accepted) -> None:
        self.config = config
        self.on_accept = on_accept
        self._servers: list[asyncio.Server] = []
        self.addresses: list[Any] = []
        self.socket_path: Path | None = None

    def _link(self, unix: bool) -> Link:
        link = Link()
        link.on_made = lambda lk: self.on_accept(lk, unix)
        return link

    async def open(self) -> None:
        """Bind every listener; on failure the ones already bound are closed again."""
        try:
            await self._open()
        except BaseException:
            self.close()
            raise

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.listen is not None:
            host, port = self.config.listen
            srv = await loop.create_server(
                lambda: self._link(unix=False), host, port, reuse_address=True, backlog=1024
            )
            self._servers.append(srv)
            self.addresses += [s.getsockname() for s in srv.sockets]
        path = self.config.unix_socket_path
        if path is not None and self.config.listen is not None and self.config.listen[1] == 0:
            path = path.with_name(f".s.PGSQL.{self.port}")  # same port number as TCP
        self.socket_path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            srv = await loop.create_unix_server(lambda: self._link(unix=True), str(path))
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
