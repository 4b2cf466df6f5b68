"""The proxy as a whole: listeners, client sessions, the pool manager, cancel keys.

Thin owner of the parts, split by job: :mod:`proxy.listener` (sockets, accept),
:mod:`proxy.login` (startup, TLS, client auth), :mod:`proxy.session` (one client:
attach, forward, release), :mod:`proxy.migrate` (session mode across generations),
:mod:`proxy.cancel` (cancel keys), :mod:`proxy.tls` (the client-facing TLS files).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from proxy import build, login, metrics, upstream
from proxy.cancel import CancelKeys, send_cancel
from proxy.clientauth import UsersFile
from proxy.config import ProxyConfig
from proxy.credentials import CredentialProvider
from proxy.deadlines import Deadlines
from proxy.listener import Listeners, raise_open_file_limit
from proxy.pool import PoolManager
from proxy.protocol import messages as m
from proxy.protocol.parameters import resets_settings
from proxy.protocol.states import CLOSED, SESSION_STATES
from proxy.session import ClientSession
from proxy.tls import TLSFiles
from proxy.transport import Link
from proxy.upstream import ServerConn
from proxy.watchdog import Watchdog

log = logging.getLogger("credsidecar.proxy")
MAX_REFUSING = 32  # connections past max_client_conn being told so (in the file budget)


def _login_too_slow(session: ClientSession) -> None:
    session.login_too_slow()


class ProxyServer:
    """The proxy: listeners, sessions, the pool manager; see ``proxy/__init__``."""

    def __init__(
        self,
        config: ProxyConfig,
        provider: CredentialProvider,
        registry: Any = None,
    ) -> None:
        self.config = config
        self.provider = provider
        self.manager = PoolManager(config, provider)
        self.manager.on_drain_timeout = self._drain_timeout
        self.sessions: set[ClientSession] = set()
        self.keys = CancelKeys()
        self.listeners = Listeners(config, self._accepted)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refusing: set[Link] = set()
        self.tls = TLSFiles(config.tls) if config.tls is not None else None
        self.users = (
            UsersFile(config.client_auth.users_file) if config.client_auth.users_file else None
        )
        self.stopping = False
        # what a server connection runs when its client leaves (session pooling, as
        # PgBouncer; "" otherwise), and whether that takes every setting back to its
        # default (DISCARD ALL, RESET ALL): both read as each session ends
        self.reset_query = "" if config.transaction_pooling else config.server_reset_query
        self.reset_clears_settings = resets_settings(self.reset_query)
        self.ignored_startup_parameters = frozenset(config.ignore_startup_parameters)
        # settings read at every accept and login, kept as attributes of this native
        # class: ProxyConfig is a Python dataclass, each read of it a generic lookup
        self.max_client_conn = config.max_client_conn
        self.message_buffer = config.message_buffer
        self.transaction_mode = config.transaction_pooling
        self.client_auth_method = config.client_auth.method
        # the loop start() ran in: asyncio.get_running_loop() makes a syscall (getpid)
        self.loop: asyncio.AbstractEventLoop | None = None
        # client_login_timeout of every session logging in: one timer for all of them
        self.logins: Deadlines[ClientSession] | None = None
        # made by stop(), done when the last session is gone (not an Event to clear on
        # every accepted connection: its methods are Python code)
        self._all_gone: asyncio.Future[None] | None = None
        self._registry = registry if registry is not None else metrics.REGISTRY
        self._collector = metrics.StateCollector(self.status)
        self.watchdog = Watchdog(self)

    @property
    def addresses(self) -> list[Any]:
        return self.listeners.addresses

    @property
    def socket_path(self) -> Path | None:
        return self.listeners.socket_path

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with ``listen: 127.0.0.1:0``)."""
        return self.listeners.port

    async def start(self) -> None:
        """Start the provider and the listeners; on failure nothing is left running."""
        if self.tls is not None:
            self.tls.context()  # a certificate that does not load is a startup error
        raise_open_file_limit(self.config, self.config.max_db_connections or self.config.pool_size)
        self.loop = asyncio.get_running_loop()
        self.logins = Deadlines(self.loop, self.config.client_login_timeout, _login_too_slow)
        await self.provider.start()
        await self.manager.start()
        try:
            await self.listeners.open()
        except BaseException as exc:  # bound: a bare raise after await breaks under mypyc
            await self.manager.close()
            await self.provider.close()
            raise exc
        self._registry.register(self._collector)
        self.spawn(self.watchdog.run())
        log.info(
            "proxy_started",
            extra={
                "listen": [str(a) for a in self.addresses],
                "pool_mode": self.config.pool_mode,
                "upstream": upstream.where(self.config.upstream),
                "build": build.mode(),  # compiled (mypyc) or pure Python: proxy/build.py
            },
        )

    def _accepted(self, link: Link, unix: bool) -> None:
        if self.stopping:
            link.abort()
            return
        if len(self.sessions) >= self.max_client_conn:
            # counted from accept, logged in or not; a few refusals read the startup
            # packet first (so that clients show the error), the rest are cut at once
            metrics.clients_total.inc("refused")
            if len(self._refusing) < MAX_REFUSING:
                self._refusing.add(link)
                self.spawn(self._refuse(link))
            else:
                link.write(login.TOO_MANY)
                link.close()
            return
        session = ClientSession(self, link, unix)
        self.sessions.add(session)
        session.begin()

    async def _refuse(self, link: Link) -> None:
        try:
            await login.refuse_too_many(self, link)
        finally:
            self._refusing.discard(link)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of the proxy's: cancelled and awaited by stop()."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def register(self, session: ClientSession) -> tuple[int, int]:
        """A BackendKeyData of the proxy's own for this client."""
        return self.keys.register(session)

    def unregister(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        self.keys.unregister(session.process_id, session)
        if not self.sessions and self._all_gone is not None and not self._all_gone.done():
            self._all_gone.set_result(None)

    def cancel(self, request: m.CancelRequest) -> None:
        target = self.keys.target(request)
        if target is not None:
            self.spawn(send_cancel(self.config.upstream, *target))

    def _drain_timeout(self, conn: ServerConn) -> None:
        owner = conn.owner
        if isinstance(owner, ClientSession):
            owner.fatal(
                "57P01",
                "terminating connection: the database credentials were rotated and this "
                f"session did not reach a transaction boundary within drain_timeout "
                f"({self.config.drain_timeout:g}s)",
            )

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - agreed interface
        """Stop accepting, let transactions finish until ``timeout``, then 57P01 the rest."""
        if self.stopping:
            return
        self.stopping = True
        self.listeners.close()
        for session in list(self.sessions):
            session.shutdown()
        if self.sessions:
            self._all_gone = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_gone, timeout)
        for session in list(self.sessions):
            session.fatal("57P01", "terminating connection: the proxy is shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.manager.close()
        await self.provider.close()
        await self.listeners.wait_closed()
        if self.logins is not None:
            self.logins.close()
        with contextlib.suppress(KeyError):
            self._registry.unregister(self._collector)
        log.info("proxy_stopped", extra={})

    def status(self) -> dict[str, Any]:
        clients = {s.value: 0 for s in SESSION_STATES if s is not CLOSED}
        for session in self.sessions:
            if session.state is not CLOSED:
                clients[session.state.value] += 1
        creds = self.manager.creds
        return {
            "listen": [str(a) for a in self.addresses],
            "pool_mode": self.config.pool_mode,
            "upstream": upstream.where(self.config.upstream),
            "generation": self.manager.generation,
            "user": creds.username if creds else None,
            "clients": clients,
            "pools": self.manager.status(),
            "prepared_statements": len(self.manager.names),
        }
