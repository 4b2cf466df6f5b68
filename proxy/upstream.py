"""Open and log in one upstream connection with the current credentials.

TLS follows libpq's ``sslmode``: ``disable``/``allow`` plain; ``prefer`` TLS when the
server agrees; ``require`` TLS (verifying the chain when ``ca_cert`` is given, as
libpq does); ``verify-ca`` chain; ``verify-full`` chain and host name. The whole
connect + login is bounded by ``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import ssl
from collections.abc import Callable
from functools import lru_cache

from mypy_extensions import mypyc_attr, trait

from proxy import metrics
from proxy.config import UpstreamConfig
from proxy.credentials import Credentials
from proxy.errors import CONNECT_FAILED, UpstreamAuthError, UpstreamError, server_text
from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol.auth import UpstreamAuthenticator
from proxy.protocol.backend import ServerConnection
from proxy.protocol.errors import AuthenticationFailed, ProtocolViolation, ServerProtocolViolation
from proxy.protocol.pipeline import ParameterSink, Pipeline
from proxy.protocol.statements import StatementNames, sqlstate
from proxy.transport import Link, LinkOwner

log = logging.getLogger("credsidecar.proxy")
# how long a closed TLS connection waits for the server's close_notify (asyncio's default:
# 30 s of a descriptor held for a server that went away)
TLS_SHUTDOWN_TIMEOUT = 5.0


@lru_cache(maxsize=8)
def ssl_context(cfg: UpstreamConfig) -> ssl.SSLContext | None:
    if cfg.sslmode in ("disable", "allow"):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    verify = cfg.sslmode in ("verify-ca", "verify-full") or cfg.ca_cert is not None
    if verify and cfg.ca_cert is not None:
        ctx.load_verify_locations(cafile=str(cfg.ca_cert))
    ctx.check_hostname = cfg.sslmode == "verify-full"
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if cfg.client_cert is not None:
        key = str(cfg.client_key) if cfg.client_key else None
        ctx.load_cert_chain(str(cfg.client_cert), key)
    return ctx


def where(cfg: UpstreamConfig) -> str:
    return f"{cfg.host}:{cfg.port}"


async def _negotiate_tls(link: Link, cfg: UpstreamConfig) -> bool:
    """SSLRequest per sslmode; True when the link now runs over TLS."""
    ctx = ssl_context(cfg)
    if ctx is None:
        return False
    assert link.transport is not None
    link.write(m.ssl_request())
    answer = await link.recv()
    if answer[:1] == b"N" and len(answer) == 1:
        if cfg.sslmode == "prefer":
            return False
        text = f"the database server does not accept TLS (sslmode {cfg.sslmode})"
        raise UpstreamError(text, client_text=text)
    if answer != b"S":
        # anything after 'S' before the handshake would be injected plaintext (CVE-2021-23214)
        text = "the database server answered SSLRequest unexpectedly"
        raise UpstreamError(text, "08P01", text)
    loop = asyncio.get_running_loop()
    try:
        transport = await loop.start_tls(
            link.transport,
            link,
            ctx,
            server_hostname=cfg.server_name or cfg.host,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
        )
    except ssl.SSLCertVerificationError as exc:
        # the reason may quote the server's names: the log's, not the client's
        text = f"the database server's certificate rejected ({cfg.sslmode})"
        raise UpstreamError(f"{text}: {exc.verify_message}", client_text=text) from None
    except (ssl.SSLError, ConnectionError) as exc:
        text = "TLS handshake with the database server failed"
        raise UpstreamError(f"{text}: {exc}", client_text=text) from None
    link.use(transport)
    return True


@trait
class IdleWaiter:
    """Told once a server connection has no request outstanding, or is lost: a
    continuation without a task (a client leaving, session pooling). An object, not a
    callback: compiled, a native call and no closure to make."""

    def conn_idle(self, conn: ServerConn) -> None:
        raise NotImplementedError


class _IdleFuture(IdleWaiter):
    """:meth:`ServerConn.wait_idle`'s waiter."""

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def conn_idle(self, conn: ServerConn) -> None:
        if not self.future.done():  # cancelled meanwhile (a timeout)
            self.future.set_result(None)


class ServerConn(LinkOwner):
    """A logged-in upstream connection; the pool's unit, tagged with its generation."""

    def __init__(
        self,
        link: Link,
        proto: ServerConnection,
        generation: int,
        database: str,
        tls: bool,
        names: StatementNames,
    ) -> None:
        self.link = link
        self.proto = proto
        self.generation = generation
        self.database = database
        self.tls = tls
        self.pipeline = Pipeline(names, proto.parameters)
        # the carried settings a fresh login has: what a new client starts from
        self.defaults = dict(self.pipeline.synced)
        # extra (unreported) settings the proxy applied for the client it serves
        self.extras: dict[str, str] = {}
        # the startup settings its last client logged in with, and the settings (reported
        # and extra) that gave it: a client asking for the same ones again needs no SQL (session.py)
        self.last_login: tuple[dict[str, str], dict[str, str], dict[str, str]] | None = None
        # the last settings change computed for a login, and what it came from: the
        # startup settings, the synced and extra ones, the number of known names
        self.last_change: (
            tuple[
                dict[str, str],
                dict[str, str],
                dict[str, str],
                int,
                tuple[str, dict[str, str], dict[str, str], dict[str, str]],
            ]
            | None
        ) = None
        # the last settings after a login's SQL respelled as the server reports them, and
        # the settings (with the client's spelling) they came from (session.py)
        self.last_told: tuple[dict[str, str], dict[str, str]] | None = None
        self.internal_error: bytes | None = None  # the last one swallowed, for the login
        # the last login's ParameterStatus messages and what they came from: the
        # server's values then, the client's, the block
        self._statuses: tuple[dict[str, str], dict[str, str], bytes] | None = None
        self.expires = math.inf  # monotonic time past which it is not pooled again
        self.idle_since = 0.0  # monotonic time it went idle in its pool
        self.owner: ServerOwner | None = None
        self.closed = False
        # told once no request is outstanding, or the connection is lost
        self._idle_waiters: list[IdleWaiter] = []
        self.on_close: Callable[[ServerConn], None] | None = None
        self.write_paused = False  # the server reads slower than its client sends
        self.internal_errors = 0  # ErrorResponses to the proxy's own queries, swallowed
        self.reads = 0  # chunks received: the watchdog's sign of life (proxy/watchdog.py)
        link.run(self)

    @property
    def parameters(self) -> dict[str, str]:
        return self.proto.parameters

    def parameter_statuses(self, carried: dict[str, str]) -> bytes:
        """The ParameterStatus messages of a login through this connection: the server's
        values with the client's ``carried`` ones on top. Kept for the next login, which
        nearly always gets the same (``carried`` is never changed in place; the server's
        values are, and the pipeline notes each name the server reported since)."""
        kept = self._statuses
        server = self.proto.parameters
        changed = self.pipeline.changed_parameters
        if kept is not None and (kept[1] is carried or kept[1] == carried):
            if not changed:
                return kept[2]
            then = kept[0]
            # changed and back is the rule in session pooling (the reset, then a SET)
            if all(server.get(name) == then.get(name) for name in changed):
                changed.clear()
                return kept[2]
        shown = {**server, **carried}
        block = b"".join([m.parameter_status(k, v) for k, v in shown.items()])
        self._statuses = (dict(server), carried, block)
        changed.clear()
        return block

    @property
    def backend_key(self) -> ev.BackendKeyData | None:
        return self.proto.backend_key

    def send(self, data: bytes) -> None:
        self.link.write(data)

    def link_data(self, data: bytes) -> None:
        self.reads += 1
        owner = self.owner
        pipeline = self.pipeline
        try:
            reply = self._route(data)
        except ProtocolViolation as exc:
            log.warning("proxy_server_protocol_violation", extra={"error": str(exc)})
            self.close()
            return
        if owner is not None:
            if reply:
                owner.to_client(reply)
            if not pipeline.queue and pipeline.unrequested_error is None:
                owner.server_idle(self)
                if not self._idle_waiters:
                    return  # the usual end of a transaction: nothing else to look at
        if pipeline.unrequested_error is not None:
            # the server ends this session between requests (admin shutdown, timeout)
            error, pipeline.unrequested_error = pipeline.unrequested_error, None
            # the SQLSTATE says why (57P01 shutdown, 57P05 idle timeout, 08P01 a message
            # it could not read); the message text may quote data, so it is not logged
            code = sqlstate(error).decode("ascii", "replace")
            log.info("proxy_server_ended_session", extra={"db": self.database, "sqlstate": code})
            if owner is not None:
                owner.server_ended(self, error)
            self.close(terminate=False)
            return
        if self._idle_waiters and not pipeline.queue:
            self._wake_idle_waiters()

    def _route(self, data: bytes) -> bytes:
        """What of ``data`` goes to the client: shortcuts for the commonest reads (the
        whole answer to the client's one query; answers to the proxy's own queries at
        the start of a read), else message by message."""
        if self._plain_answer(data):
            return data
        pipeline = self.pipeline
        shown = b""
        while pipeline.awaits_internal_answer():
            end = self.proto.receive_internal_answer(data)
            if end < 0:
                break
            shown = shown + pipeline.internal_answered(data, end, self.owner)  # not +=: generic
            if end == len(data):
                return shown
            data = data[end:]
            if self._plain_answer(data):
                return shown + data
        return shown + self._frames(data)

    def _plain_answer(self, data: bytes) -> bool:
        """``data`` is the whole answer to the client's one simple Query, read."""
        if self.pipeline.awaits_one_answer() and self.proto.receive_answer(data):
            self.pipeline.answered()
            return True
        return False

    def _frames(self, data: bytes) -> bytes:
        """What of ``data`` goes to the client, read message by message."""
        owner = self.owner
        out: list[bytes] = []
        buf, frames = self.proto.receive_frames(data)
        if frames and self.pipeline.server_frames(buf, frames, out, owner):
            self.internal_errors += 1
            errors = [buf[s:e] for t, s, e in frames if t == 69]
            self.internal_error = errors[-1] if errors else None
            log.warning("proxy_internal_query_failed", extra={"db": self.database})
        return out[0] if len(out) == 1 else b"".join(out)

    def link_paused(self, paused: bool) -> None:
        self.write_paused = paused
        if self.owner is not None:
            self.owner.server_paused(paused)

    def when_idle(self, waiter: IdleWaiter) -> None:
        """``waiter.conn_idle(self)`` once no request is outstanding (now, if none is)
        or the connection is lost."""
        if self.pipeline.idle or self.closed:
            waiter.conn_idle(self)
        else:
            self._idle_waiters.append(waiter)

    def _wake_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.conn_idle(self)

    async def wait_idle(self) -> None:
        if self.pipeline.idle or self.closed:
            return
        waiter = _IdleFuture()
        self._idle_waiters.append(waiter)
        await waiter.future

    def internal_start(self, sql: str) -> int:
        """Send a query of the proxy's own. Returns what :meth:`internal_succeeded`
        compares with once the connection is idle again."""
        errors = self.internal_errors
        self.send(self.pipeline.internal_query(sql))
        return errors

    def internal_succeeded(self, errors: int) -> bool:
        """Whether the query :meth:`internal_start` sent (and returned ``errors`` for)
        succeeded; ask once idle, and only if the connection is not closed."""
        return self.internal_errors == errors

    async def internal(self, sql: str) -> bool:
        """A query of the proxy's own, awaited; False if it failed."""
        errors = self.internal_start(sql)
        await self.wait_idle()
        if self.closed:
            raise UpstreamError("upstream connection closed during an internal query")
        return self.internal_succeeded(errors)

    def internal_failure(self) -> tuple[str, str]:
        """SQLSTATE and message of the last failed query of the proxy's own."""
        error = self.internal_error or b""
        try:
            fields = m.parse_error_fields(error[5:], ServerProtocolViolation)
        except ServerProtocolViolation:
            fields = {}
        return fields.get("C", "XX000"), fields.get("M", "the server refused a setting")

    async def capture(self, sql: str) -> list[list[str | None]] | None:
        """Rows of a query of the proxy's own (``None`` if it failed)."""
        data, entry = self.pipeline.capture_query(sql)
        self.send(data)
        await self.wait_idle()
        return None if self.closed else entry.rows

    def link_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self._wake_idle_waiters()
        owner = self.owner
        if owner is not None:
            owner.server_lost(self)
        if not was_closed and self.on_close is not None:
            self.on_close(self)

    def close(self, terminate: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if terminate:
            self.link.write(m.TERMINATE)
        self.link.close()
        if self.on_close is not None:
            self.on_close(self)


@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' own
class ServerOwner(ParameterSink):
    """What a server connection talks to while a client holds it (the client session)."""

    def to_client(self, data: bytes) -> None:
        raise NotImplementedError

    def server_idle(self, conn: ServerConn) -> None:
        raise NotImplementedError

    def server_lost(self, conn: ServerConn) -> None:
        raise NotImplementedError

    def server_ended(self, conn: ServerConn, error: bytes) -> None:
        """The server sent ``error`` between requests and will close the connection."""
        raise NotImplementedError

    def server_paused(self, paused: bool) -> None:
        """The server's write buffer filled up (True) or drained: pause the client."""
        raise NotImplementedError


async def connect(
    cfg: UpstreamConfig,
    creds: Credentials,
    database: str,
    names: StatementNames,
    message_buffer: int = m.DEFAULT_MESSAGE_BUFFER,
) -> ServerConn:
    """Connect, negotiate TLS and log in; raises :class:`UpstreamError` on any failure.

    Server messages of ``message_buffer`` bytes or more stream through (never held whole).
    """
    try:
        async with asyncio.timeout(cfg.connect_timeout):
            conn = await _open(cfg, creds, database, names, message_buffer)
    except (OSError, ProtocolViolation) as exc:  # UpstreamError and TimeoutError included
        error = _failure(exc, cfg)
        if isinstance(exc, TimeoutError):
            metrics.server_connects_total.labels("timeout").inc()
        elif isinstance(error, UpstreamAuthError):
            metrics.server_connects_total.labels("auth_failed").inc()
            metrics.auth_failures_total.labels("upstream").inc()
        else:
            metrics.server_connects_total.labels("error").inc()
        raise error.located(where(cfg), creds.username) from None
    metrics.server_connects_total.labels("ok").inc()
    return conn


async def _open(
    cfg: UpstreamConfig,
    creds: Credentials,
    database: str,
    names: StatementNames,
    message_buffer: int,
) -> ServerConn:
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(Link, cfg.host, cfg.port)
    try:
        tls = await _negotiate_tls(link, cfg)
        proto = await _login(link, cfg, creds, database, tls, message_buffer)
    except BaseException:
        # a failure, the timeout or a cancellation (the pool closing during a trial
        # connect): the socket goes with it, never left to the garbage collector
        link.abort()
        raise
    return ServerConn(link, proto, creds.generation, database, tls, names)


def _failure(exc: OSError | ProtocolViolation, cfg: UpstreamConfig) -> UpstreamError:
    """``exc`` as an UpstreamError whose client text names no address."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TimeoutError):
        text = (
            f"the database server did not answer within connect_timeout ({cfg.connect_timeout:g}s)"
        )
        return UpstreamError(text, client_text=text)
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno:
        # not exc.strerror: asyncio puts the address in it ("Connect call failed (...)")
        return UpstreamError(detail, client_text=f"{CONNECT_FAILED}: {os.strerror(exc.errno)}")
    return UpstreamError(detail)


async def _login(
    link: Link,
    cfg: UpstreamConfig,
    creds: Credentials,
    database: str,
    tls: bool,
    message_buffer: int,
) -> ServerConnection:
    proto = ServerConnection(message_buffer)
    # no client's settings: the connection is shared; they are applied per client
    startup = {"user": creds.username, "database": database}
    link.write(proto.send(m.StartupMessage(startup)))
    auth = UpstreamAuthenticator(
        creds.username, creds.password, cleartext_allowed=tls or cfg.allow_cleartext
    )
    while True:
        proto.receive_data(await link.recv())
        while (event := proto.next_event()) is not None:
            if isinstance(event, ev.AuthenticationRequest):
                try:
                    reply = auth.respond(event)
                except AuthenticationFailed as exc:
                    # the proxy's own words (cleartext refused, no shared mechanism)
                    raise UpstreamAuthError(str(exc), exc.sqlstate, str(exc)) from None
                if reply is not None:
                    link.write(proto.send(reply))
            elif isinstance(event, ev.ErrorResponse):
                detail = f"{event.text} (SQLSTATE {event.sqlstate})"
                error = UpstreamAuthError if event.sqlstate.startswith("28") else UpstreamError
                text = server_text(event.text, creds.username, cfg.host)
                raise error(detail, event.sqlstate, text)
            elif isinstance(event, ev.ReadyForQuery):
                return proto
