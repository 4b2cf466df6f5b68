"""Health, readiness, metrics and status over HTTP (aiohttp).

``/healthz``  the process is alive and its loop answers.
``/readyz``   every secret has a valid value and every template was rendered (200/503).
``/metrics``  Prometheus text format.
``/status``   JSON: each secret's version and expiry, templates, Vault reachability. No values.
``POST /refresh`` checks every source now (``?secret=NAME`` for one).
``POST /rotate/<name>`` rotates a credential under ``rotate:`` now; answers when done.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class Observable(Protocol):
    """What the HTTP server needs from the runtime."""

    def readiness(self) -> tuple[bool, list[str]]: ...

    def status(self) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes: ...

    def refresh(self, secret: str | None) -> list[str]: ...

    async def rotate(self, name: str) -> Any: ...  # an agent.rotate.manager.Outcome


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

    async def status(_: web.Request) -> web.Response:
        return web.json_response(target.status())

    async def refresh(request: web.Request) -> web.Response:
        name = request.query.get("secret")
        try:
            woken = target.refresh(name)
        except KeyError:
            return web.json_response({"error": f"no secret named {name!r}"}, status=404)
        return web.json_response({"refreshing": woken}, status=202)

    async def rotate(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            outcome = await target.rotate(name)
        except KeyError:
            return web.json_response({"error": f"nothing to rotate named {name!r}"}, status=404)
        body = {"name": name, "result": outcome.result, "version": outcome.version}
        if outcome.ok:
            return web.json_response(body)
        if outcome.result == "busy":
            return web.json_response({**body, "error": "another replica is rotating"}, status=409)
        return web.json_response({**body, "error": outcome.error}, status=500)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_post("/refresh", refresh)
    app.router.add_post("/rotate/{name}", rotate)
    return app


class HealthServer:
    """aiohttp's runner/site lifecycle: ``start()`` binds, ``stop()`` releases."""

    def __init__(self, target: Observable, host: str, port: int) -> None:
        self._runner = web.AppRunner(build_app(target), access_log=None, handle_signals=False)
        self._host, self._port = host, port
        self.bound_port: int | None = None

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        server = site._server  # aiohttp keeps the asyncio server here; port 0 needs it
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        await self._runner.cleanup()


def metrics_text(*registries: Any) -> bytes:
    return b"".join(generate_latest(r) for r in registries)
