"""The HTTPS server: ``POST /mutate`` (AdmissionReview) and ``GET /healthz``.

Bounds, because every client is hostile: a TLS handshake must finish within the request
timeout; a connection that has not sent a whole request within it is closed (aiohttp's
keep-alive timer runs from the connection's start); a body is read within it and is at
most ``max_body`` bytes (413); at most ``max_connections`` connections at once. The
certificate and key are re-read when either file changes (cert-manager rotates them):
each handshake checks the files' identity and, when they changed and load cleanly, uses
the new pair; a half-written or mismatched pair keeps the previous one in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from pathlib import Path

from aiohttp import web

from agent.injector.review import MalformedReview, review
from agent.injector.settings import InjectorSettings
from agent.logs import event

Stamp = tuple[tuple[int, int, int, int], ...]


class TlsFiles:
    """A certificate and key on disk, loaded into an SSLContext; reloaded on change."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._stamp = self._stat()
        self._failed: Stamp | None = None
        self.current = self._load()  # a bad pair at start is an error: raise
        self.server_context = self._load()
        self.server_context.sni_callback = self._pick  # every handshake asks us

    def _stat(self) -> Stamp:
        stats = [os.stat(p) for p in (self.cert, self.key)]  # follows the ..data symlinks
        return tuple((s.st_dev, s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        context.load_cert_chain(self.cert, self.key)
        return context

    def refresh(self) -> ssl.SSLContext:
        """The context for a new handshake: reloaded first when the files changed."""
        try:
            stamp = self._stat()
        except OSError:
            return self.current  # mid-rotation: the old pair serves
        if stamp != self._stamp and stamp != self._failed:
            try:
                self.current = self._load()
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._failed = stamp
                event("tls_reload_failed", logging.WARNING, cert=str(self.cert), error=str(exc))
            else:
                self._stamp, self._failed = stamp, None
                event("tls_reloaded", cert=str(self.cert))
        return self.current

    def _pick(self, connection: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        connection.context = self.refresh()


class _Refuse(asyncio.Protocol):
    """Answers a connection beyond ``max_connections`` by closing it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class InjectorServer:
    def __init__(self, settings: InjectorSettings) -> None:
        self.settings = settings
        self.tls = TlsFiles(settings.tls_cert, settings.tls_key)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    def _app(self) -> web.Application:
        settings = self.settings

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def mutate(request: web.Request) -> web.Response:
            try:
                async with asyncio.timeout(settings.request_timeout):
                    body = await request.read()
            except TimeoutError:
                return web.json_response({"error": "the body did not arrive in time"}, status=408)
            except web.HTTPRequestEntityTooLarge:
                limit = settings.max_body
                return web.json_response({"error": f"body over {limit} bytes"}, status=413)
            try:
                answer = review(body, settings)
            except MalformedReview as exc:
                return web.json_response({"error": str(exc)}, status=400)
            return web.Response(body=answer, content_type="application/json")

        app = web.Application(client_max_size=settings.max_body)
        app.router.add_get("/healthz", healthz)
        app.router.add_post("/mutate", mutate)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            keepalive_timeout=self.settings.request_timeout,
            handler_cancellation=True,
            shutdown_timeout=self.settings.request_timeout,
        )
        await runner.setup()
        self._runner = runner
        handlers = runner.server
        assert handlers is not None
        limit = self.settings.max_connections

        def protocol() -> asyncio.Protocol:
            if len(handlers.connections) >= limit:
                return _Refuse()
            return handlers()

        host, port = self.settings.listen
        self._server = await asyncio.get_running_loop().create_server(
            protocol,
            host,
            port,
            ssl=self.tls.server_context,
            ssl_handshake_timeout=self.settings.request_timeout,
            backlog=limit,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        event("injector_listening", host=host, port=self.port)

    async def aclose(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), close."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._runner is not None:
            await self._runner.cleanup()  # ends keep-alive connections, waits for handlers
            self._runner = None
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.request_timeout):
                    await server.wait_closed()


async def serve(settings: InjectorSettings, stop: asyncio.Event) -> None:
    server = InjectorServer(settings)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.aclose()
        event("injector_stopped")
