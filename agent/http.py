"""Probes and metrics over HTTP (aiohttp): the only surface that may face the pod network.

``GET /healthz``  the process is alive and its loop answers.
``GET /readyz``   every secret has a valid value and every template was rendered (200/503).
``GET /metrics``  Prometheus text format.

Nothing here changes state or tells more than names and numbers: any other method is
405, any other path 404. ``/status``, refresh and rotate are on the admin API
(:mod:`agent.admin`: a unix socket of the owner, or TCP with a bearer token).
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

MAX_REQUEST_BODY = 1024  # probes carry no body


class Observable(Protocol):
    """What the probe server needs from the runtime."""

    def readiness(self) -> tuple[bool, list[str]]: ...

    def metrics_text(self) -> bytes: ...


def build_app(target: Observable) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, reasons = target.readiness()
        return web.json_response({"ready": ready, "reasons": reasons}, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        # CONTENT_TYPE_LATEST carries a charset; aiohttp wants it separately
        return web.Response(
            body=target.metrics_text(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application(client_max_size=MAX_REQUEST_BODY)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


class HealthServer:
    """aiohttp's runner/site lifecycle: ``start()`` binds, ``aclose()`` releases."""

    def __init__(self, target: Observable, host: str, port: int) -> None:
        self._runner = web.AppRunner(build_app(target), access_log=None, handle_signals=False)
        self._host, self._port = host, port
        self.bound_port: int | None = None

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        self.bound_port = bound_port(site, self._port)

    async def aclose(self) -> None:
        await self._runner.cleanup()


def bound_port(site: web.TCPSite, configured: int) -> int:
    """The port a site listens on (port 0 in the config means any free one)."""
    server = site._server  # aiohttp keeps the asyncio server here; port 0 needs it
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else configured


def metrics_text(*registries: Any) -> bytes:
    return b"".join(generate_latest(r) for r in registries)
