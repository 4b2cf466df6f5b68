"""The admin API: everything that acts on the agent or tells more than the probes.

``GET /status``            JSON: each secret's version and expiry, templates, Vault
                           reachability, rotations. Never a value.
``POST /refresh``          check every source now (``?secret=NAME`` for one); coalesced:
                           at most one check per secret per second, however many ask.
``POST /rotate/<name>``    rotate a credential under ``rotate:`` now; answers when done.
                           Inside the previous credential's grace: 409 naming when it
                           becomes possible, unless ``?now=true`` (retire it early: its
                           in-flight consumers fail).

It is served only to the owner, never on the probe port (Vault Agent keeps state
changes off unauthenticated listeners; cloud-sql-proxy's admin server is off by
default and local only):

- a unix socket, by default ``<state_dir>/admin.sock``: mode 0600 in a directory only
  we can enter, so only our uid (and root) can connect; ``credsidecar rotate``,
  ``refresh`` and ``status`` talk to it;
- optionally TCP (``admin.listen``), where every request must carry
  ``Authorization: Bearer <token>`` (the contents of ``admin.token_file``), compared
  in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from agent.config import AdminApiConfig
from agent.errors import SidecarError
from agent.http import bound_port
from agent.logs import event

if TYPE_CHECKING:
    from agent.rotate.manager import Outcome

REFRESH_INTERVAL = 1.0  # at most one check per secret per this many seconds
MAX_REQUEST_BODY = 1024  # no endpoint takes a body
MIN_TOKEN_LENGTH = 16
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL
_TRUE, _FALSE = ("1", "true", "yes"), ("", "0", "false", "no")


class AdminError(SidecarError):
    """The admin API cannot be served as configured (socket, token)."""


class AdminTarget(Protocol):
    """What the admin API needs from the runtime."""

    def status(self) -> dict[str, Any]: ...

    def refresh(self, secret: str | None) -> list[str]: ...

    async def rotate(self, name: str, *, now: bool = False) -> Outcome: ...


# --------------------------------------------------------------------------- refresh


def refresh_delay(last: float | None, now: float, interval: float = REFRESH_INTERVAL) -> float:
    """Seconds to hold a refresh of a secret last checked (by request) at ``last``."""
    return 0.0 if last is None else max(0.0, last + interval - now)


class RefreshGate:
    """Coalesces refresh requests: a secret is woken at once when it was not woken by a
    request within ``interval``; otherwise one wake is scheduled for the end of the
    interval and every request meanwhile joins it. Timers, not tasks: ``close()``
    cancels what is pending."""

    def __init__(
        self,
        wake: Callable[[str], None],
        interval: float = REFRESH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wake, self.interval, self.clock = wake, interval, clock
        self._last: dict[str, float] = {}
        self._pending: dict[str, asyncio.TimerHandle] = {}

    def request(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self._pending:
                continue  # joins the wake already scheduled
            delay = refresh_delay(self._last.get(name), self.clock(), self.interval)
            if delay <= 0:
                self._fire(name)
            else:
                loop = asyncio.get_running_loop()
                self._pending[name] = loop.call_later(delay, self._fire, name)

    def _fire(self, name: str) -> None:
        self._pending.pop(name, None)
        self._last[name] = self.clock()
        with contextlib.suppress(KeyError):  # not running yet: it checks when it starts
            self._wake(name)

    def close(self) -> None:
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()


# --------------------------------------------------------------------------- app


def _flag(request: web.Request, name: str) -> bool | None:
    """A true/false query parameter (absent: false); None when it is neither."""
    value = request.query.get(name, "").lower()
    return True if value in _TRUE else False if value in _FALSE else None


def build_app(target: AdminTarget, gate: RefreshGate, token: str | None = None) -> web.Application:
    async def status(_: web.Request) -> web.Response:
        return web.json_response(target.status())

    async def refresh(request: web.Request) -> web.Response:
        name = request.query.get("secret")
        known = list(target.status()["secrets"])
        if name is not None and name not in known:
            return web.json_response({"error": f"no secret named {name!r}"}, status=404)
        names = [name] if name is not None else known
        gate.request(names)
        return web.json_response({"refreshing": names}, status=202)

    async def rotate(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        now = _flag(request, "now")
        if now is None:
            return web.json_response({"error": "now must be true or false"}, status=400)
        try:
            outcome = await target.rotate(name, now=now)
        except KeyError:
            return web.json_response({"error": f"nothing to rotate named {name!r}"}, status=404)
        except SidecarError as exc:
            return web.json_response({"name": name, "error": str(exc)}, status=503)
        body: dict[str, Any] = {"name": name, "result": outcome.result, "version": outcome.version}
        if outcome.ok:
            return web.json_response(body)
        if outcome.result == "in_grace":
            body |= {"error": outcome.error, "not_before": outcome.not_before}
            return web.json_response(body, status=409)
        if outcome.result == "busy":
            return web.json_response({**body, "error": "another replica is rotating"}, status=409)
        return web.json_response({**body, "error": outcome.error}, status=500)

    middlewares = [_bearer(token)] if token is not None else []
    app = web.Application(client_max_size=MAX_REQUEST_BODY, middlewares=middlewares)
    app.router.add_get("/status", status)
    app.router.add_post("/refresh", refresh)
    app.router.add_post("/rotate/{name}", rotate)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bearer(token: str) -> Any:
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            return web.json_response(
                {"error": "this endpoint needs Authorization: Bearer <admin token>"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="credsidecar-admin"'},
            )
        return await handler(request)

    return check


# --------------------------------------------------------------------------- server


class AdminServer:
    """The admin API on its unix socket and/or TCP listener. ``start()`` binds (or
    raises AdminError saying why not), ``aclose()`` releases and removes the socket."""

    def __init__(self, config: AdminApiConfig, target: AdminTarget) -> None:
        self.config = config
        self._target = target
        self.gate = RefreshGate(self._wake)
        self._runners: list[web.AppRunner] = []
        self._socket_inode: tuple[int, int] | None = None
        self.bound_port: int | None = None

    def _wake(self, name: str) -> None:
        self._target.refresh(name)

    async def start(self) -> None:
        try:
            if self.config.socket is not None:
                await self._serve_unix(self.config.socket)
            if self.config.listen_host is not None:
                await self._serve_tcp(self.config.listen_host, self.config.listen_port or 0)
        except BaseException:
            await self.aclose()
            raise

    async def _serve_unix(self, path: Path) -> None:
        sock = bind_owner_socket(path)
        st = os.stat(path)
        self._socket_inode = (st.st_dev, st.st_ino)
        runner = await self._runner(None)
        await web.SockSite(runner, sock).start()
        event("admin_listening", socket=str(path))

    async def _serve_tcp(self, host: str, port: int) -> None:
        assert self.config.token_file is not None  # the config refuses TCP without a token
        runner = await self._runner(read_token(self.config.token_file))
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self.bound_port = bound_port(site, port)
        event("admin_listening", address=f"{host}:{self.bound_port}", auth="bearer")

    async def _runner(self, token: str | None) -> web.AppRunner:
        app = build_app(self._target, self.gate, token)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def aclose(self) -> None:
        self.gate.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        path = self.config.socket
        if path is not None and self._socket_inode is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == self._socket_inode:  # still ours: remove it
                    path.unlink()
            self._socket_inode = None


def bind_owner_socket(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600, in a directory only we can enter
    (so nobody connects between bind and chmod). Refuses a path where another agent
    answers or something that is not a socket lies; removes a stale socket."""
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise AdminError(
            f"admin socket {path}: longer than {_SUN_PATH_MAX} bytes, the limit of a unix "
            "socket path; set admin.socket (or state_dir) to a shorter path"
        )
    _check_private_directory(path.parent)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise AdminError(f"admin socket {path}: cannot listen ({exc.strerror})") from None
    return sock


def _check_private_directory(directory: Path) -> None:
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise AdminError(f"admin socket directory {directory}: {exc.strerror}") from None
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or stat.S_IMODE(st.st_mode) & 0o077:
        raise AdminError(
            f"admin socket directory {directory} must be a directory of uid {uid} that "
            f"nobody else can enter (0700; it is uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}); the default, state_dir, is prepared that way"
        )


def _clear_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AdminError(f"admin socket {path}: something that is not a socket is there")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left by an agent that died
        return
    except OSError as exc:
        raise AdminError(f"admin socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise AdminError(
        f"admin socket {path}: another credsidecar answers there; two agents must not share "
        "a state_dir (its ledger and socket)"
    )


def read_token(path: Path) -> str:
    """The admin bearer token: a file only we may read, of at least 16 characters."""
    try:
        st = os.stat(path)
        token = path.read_text().strip()
    except OSError as exc:
        raise AdminError(f"admin.token_file {path}: {exc.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o026:
        raise AdminError(
            f"admin.token_file {path}: mode {mode:04o} lets other users read or change it; "
            "make it 0400 or 0600 (Kubernetes: defaultMode: 0400 on the secret volume)"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise AdminError(
            f"admin.token_file {path}: the token is shorter than {MIN_TOKEN_LENGTH} characters"
        )
    return token
