"""The agent's side of the in-process PostgreSQL proxy: one small typed bridge.

The proxy learns its upstream credentials either from a rendered JSON file it watches
(``proxy.credentials.file``) or from the agent, which pushes a secret's ``username``
and ``password`` after every render pass (``proxy.credentials.secret``). The bridge
builds that provider once, runs the server as a supervised part (a server that fails
to start is retried with backoff while the rest of the agent serves), and stops it
first at shutdown: stop accepting, let transactions end, then 57P01 the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from agent.secret import SecretValue
from proxy.config import ProxyConfig
from proxy.credentials import FileCredentialProvider, StaticCredentialProvider
from proxy.server import ProxyServer


class ProxyBridge:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.secret = config.credentials.secret  # None: the proxy reads a file itself
        self.provider: StaticCredentialProvider | FileCredentialProvider
        if config.credentials.file is not None:
            self.provider = FileCredentialProvider(config.credentials.file)
        else:
            self.provider = StaticCredentialProvider()
        self.server: ProxyServer | None = None  # while it listens
        self._stopped = asyncio.Event()

    def push(self, values: Mapping[str, SecretValue]) -> None:
        """Hand the proxy the current credentials of its secret (a pipeline consumer)."""
        value = values.get(self.secret) if self.secret is not None else None
        if value is not None and isinstance(self.provider, StaticCredentialProvider):
            self.provider.update(
                str(value.data.get("username", "")),
                str(value.data.get("password", "")),
                value.expires_at,  # the lease's end: no server connection outlives it
            )

    async def run(self) -> None:
        """Start the server and serve until :meth:`stop` (the supervised part)."""
        if self._stopped.is_set():
            return
        server = ProxyServer(self.config, self.provider)
        await server.start()  # a failure leaves nothing running; the supervisor retries
        self.server = server
        try:
            await self._stopped.wait()
        finally:
            if not server.stopping:  # cancelled without stop(): close at once
                await server.stop(timeout=0.0)
            self.server = None

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - the proxy's drain deadline
        """Stop accepting, wait up to ``timeout`` for transactions to end, close the rest."""
        self._stopped.set()
        if self.server is not None:
            await self.server.stop(timeout=timeout)

    def not_ready(self) -> list[str]:
        return [] if self.server is not None else ["proxy: not listening"]

    def status(self) -> dict[str, Any]:
        return self.server.status() if self.server is not None else {"listening": False}

    @staticmethod
    def registry() -> CollectorRegistry:
        from proxy.metrics import REGISTRY

        return REGISTRY
