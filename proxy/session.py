"""One client session: log in, attach server connections, forward, release.

The session's whereabouts are one :class:`~proxy.protocol.states.SessionState`, moved
only through :meth:`ClientSession._move` (which checks the move is legal). Client
requests go through the attached server connection's
:class:`~proxy.protocol.pipeline.Pipeline` (statement renaming), server responses come
back through it. In transaction mode the server connection returns to the pool at
every ReadyForQuery 'I'; in session mode when the client leaves (after the reset query).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final

from proxy import login, metrics, migrate
from proxy.cancel import running_key, send_cancel
from proxy.errors import ClientFatal, UpstreamError, client_text
from proxy.pool import Pool
from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol import states
from proxy.protocol.errors import AuthenticationFailed, ClientProtocolViolation
from proxy.protocol.frontend import ClientConnection
from proxy.protocol.parameters import SERVER_OWNED, settings_sql
from proxy.protocol.pipeline import (
    DROP,
    FAKE,
    KEEP,
    between_transactions,
    past_failed_segment,
    refuse,
    when_client_leaves,
)
from proxy.protocol.statements import ClientStatements
from proxy.protocol.states import ClientState, SessionState, session_move
from proxy.transport import Link, LinkOwner
from proxy.upstream import IdleWaiter, ServerConn, ServerOwner

if TYPE_CHECKING:
    from proxy.server import ProxyServer

log = logging.getLogger("credsidecar.proxy")

# Final: compiled, a Final module name is a C variable, any other one a dict lookup
_LOGIN: Final = states.LOGIN
_IDLE: Final = states.IDLE
_WAITING: Final = states.WAITING
_ACTIVE: Final = states.ACTIVE
_MIGRATING: Final = states.MIGRATING
_DRAINING: Final = states.DRAINING
_CLOSED: Final = states.CLOSED
# the two counts every login updates (proxy.counts objects, made once at import)
_CLIENTS_TOTAL: Final = metrics.clients_total
_WAIT_SECONDS: Final = metrics.wait_seconds

_COPY_DATA: Final = frozenset(b"dcf")  # CopyData, CopyDone, CopyFail
# reads of a logged-in client after which the transport calls the session directly
# (proxy/transport.py, Link.direct): a connection per query then never pays for it
DIRECT_AFTER_READS: Final = 4


def _older(a: dict[str, str], b: dict[str, str]) -> dict[str, str]:
    """Of two equal settings dicts, the one both sides keep (see _same_settings)."""
    return a if id(a) < id(b) else b


def _same(a: dict[str, str], b: dict[str, str]) -> bool:
    # compiled, == on two dicts compares them item by item even when they are one
    # (the settings of logins with the same startup packet are, proxy/login.py)
    return a is b or a == b


def _only_copy_data(frames: list[tuple[int, int, int]]) -> bool:
    return all(frame[0] in _COPY_DATA for frame in frames)


class ClientSession(ServerOwner, LinkOwner):
    def __init__(self, server: ProxyServer, link: Link, unix: bool) -> None:
        self.server = server
        self.link = link
        self.unix = unix
        self.state = _LOGIN
        self.proto = ClientConnection(server.message_buffer)
        self.process_id = 0
        self.secret_key = 0
        self.user = ""
        self.pool: Pool | None = None
        self.conn: ServerConn | None = None
        self.stmts = ClientStatements()
        # reported settings, as the server reports them, and other startup settings, as
        # the client gave them; both replaced, never changed in place (_same_settings)
        self.params: dict[str, str] = {}
        self.extras: dict[str, str] = {}
        self.pending: list[tuple[bytes, list[tuple[int, int, int]]]] = []
        self.discarding = False  # a failed extended-protocol segment awaits its Sync
        self.client_paused = False  # the client's socket is full: its server waits
        self.pinned: ServerConn | None = None  # old connection whose state cannot move
        self.replay: list[str] = []  # session state to re-create on the next connection
        # the client's address for the logs, looked up and formatted only when one is
        # written (the transport keeps it from the accept on, closed or not)
        self._address: tuple[Any, ...] | None = None
        self.transaction_mode = server.transaction_mode
        self.reads = 0  # chunks received: the watchdog's sign of life (proxy/watchdog.py)
        self.login_expired = False  # client_login_timeout passed (see begin)
        self._login_task: asyncio.Task[None] | None = None  # a login that has to wait

    @property
    def peer(self) -> str:
        addr = self.keep_peer_address()
        if addr is None:
            return "unix"
        return f"{addr[0]}:{addr[1]}" if addr[1] else addr[0]

    def keep_peer_address(self) -> tuple[Any, ...] | None:
        """(host, port, ...) as the socket tells it, kept; None for a unix socket."""
        if self.unix or self.link.transport is None:
            return None
        if self._address is None:
            info = self.link.transport.get_extra_info("peername")
            self._address = tuple(info) if info else ("?", 0)
        return self._address

    def _move(self, new: SessionState) -> None:
        self.state = session_move(self.state, new)

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    # --- login ---------------------------------------------------------------------

    def begin(self) -> None:
        """Log the client in: from callbacks while nothing has to be awaited (the startup
        packets arrive, trust or peer auth, a pooled connection at hand that needs no
        round trip for the client's settings: most logins), in a task from the first
        point that has to wait (a TLS handshake, SCRAM, a pool wait, a settings round
        trip). A task per connection costs more than the rest of such a login.

        The client's part is bounded by client_login_timeout (the server's one timer for
        every login, proxy/deadlines.py: it fatals the session, or cancels the task, see
        _login_failed), the server connection that follows by pool_timeout and
        connect_timeout."""
        logins = self.server.logins
        assert logins is not None  # made by ProxyServer.start(), before any accept
        logins.start(self)
        self.link.owner = self

    def _login_data(self, data: bytes) -> None:
        try:
            self.proto.receive_data(data)
            event = login.startup_now(self)
            if event is None:
                return  # more to come
            if isinstance(event, m.CancelRequest):  # nothing else on this connection
                self.close()
                return
            if isinstance(event, m.SSLRequest):  # a TLS handshake to await
                self._login_async(self._client_part(None))
                return
            database, settings = login.parameters(self, event)
            if not login.authenticated_now(self):  # SCRAM: the client answers
                self._login_async(self._client_part((database, settings)))
                return
            self._end_client_part()
            self.pool = self.server.manager.pool(database)
            conn = self._conn_at_hand()
            sql = self._startup_sql(conn, settings) if conn is not None else None
            if sql is None:  # a pool wait, or the settings to check with the server
                self._login_async(self._server_part(settings, conn))
                return
            assert conn is not None
            self._logged_in(conn, sql)
        except Exception as exc:
            self._login_failed(exc)

    def _login_async(self, coro: Coroutine[Any, Any, None]) -> None:
        # the task reads through the link's inbox (Link.recv) and owns the session
        # until it runs or closes
        self.link.owner = None
        self._login_task = self.server.spawn(coro)

    async def _client_part(self, parsed: tuple[str, dict[str, str]] | None) -> None:
        """The rest of the client's part when it waits for the client: from the
        SSLRequest (``parsed`` None) or from its SCRAM exchange; then the server part."""
        try:
            try:
                if parsed is None:  # startup_now's SSLRequest, to accept
                    await login.accept_tls(self)
                    event = await login.startup(self)
                    if isinstance(event, m.CancelRequest):
                        self.close()
                        return
                    parsed = login.parameters(self, event)
                await login.authenticate(self)
            finally:
                self._end_client_part()
            database, settings = parsed
            self.pool = self.server.manager.pool(database)
            await self._connect(settings, None)
        except BaseException as exc:  # bound: a bare raise after await breaks under mypyc
            self._login_failed(exc)

    async def _server_part(self, settings: dict[str, str], conn: ServerConn | None) -> None:
        try:
            await self._connect(settings, conn)
        except BaseException as exc:
            self._login_failed(exc)

    def _end_client_part(self) -> None:
        logins = self.server.logins
        if logins is not None:
            logins.end(self)

    def login_too_slow(self) -> None:
        """client_login_timeout passed (proxy/deadlines.py)."""
        self.login_expired = True
        if self._login_task is None:
            self.fatal("08006", "login did not complete in time")
        else:
            self._login_task.cancel()  # _login_failed tells this cancel from others

    def _login_failed(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            if not self.login_expired or self._login_task is None:
                raise exc  # the proxy stopping
            self._login_task.uncancel()
            self.fatal("08006", "login did not complete in time")
        elif isinstance(exc, ClientFatal):
            self.fatal(exc.sqlstate, str(exc))
        elif isinstance(exc, ClientProtocolViolation):
            _CLIENTS_TOTAL.inc("protocol_error")
            log.warning(
                "proxy_client_protocol_violation", extra={"peer": self.peer, "error": str(exc)}
            )
            self.fatal(exc.sqlstate, f"protocol violation: {exc}")
        elif isinstance(exc, AuthenticationFailed):
            _CLIENTS_TOTAL.inc("auth_failed")
            metrics.auth_failures_total.labels("client").inc()
            log.warning(
                "proxy_client_auth_failed",
                extra={"peer": self.peer, "user": self.user, "error": str(exc)},
            )
            # the client learns no more than PostgreSQL would tell it
            text = "password authentication failed" if exc.sqlstate == "28P01" else str(exc)
            self.fatal(exc.sqlstate, f'{text} for user "{self.user}"')
        elif isinstance(exc, UpstreamError):
            log.warning("proxy_upstream_failed", extra={"peer": self.peer, "error": str(exc)})
            self.fatal(exc.sqlstate, client_text(exc))  # the detail is for the log only
        elif isinstance(exc, ConnectionError):
            self.close()
        else:
            raise exc

    async def _connect(self, settings: dict[str, str], conn: ServerConn | None) -> None:
        """Logged in: a server connection (``conn``, or one from the pool) takes the
        client's settings and tells the parameters, then the session runs."""
        if conn is None:
            conn = await self._acquire_now()
        try:
            sql = await self._apply_startup(conn, settings)
        except ClientFatal as exc:
            assert self.pool is not None
            self.pool.release(conn)  # the failed batch changed nothing on it
            raise exc
        except BaseException as exc:  # no answer in pool_timeout, lost, cancelled
            conn.close()  # in an unknown state: nothing to hand to another client
            if isinstance(exc, TimeoutError):
                text = "the database server did not apply the settings in time"
                raise ClientFatal("08006", text) from None
            raise exc
        self._logged_in(conn, sql)

    def _logged_in(self, conn: ServerConn, sql: str) -> None:
        """As PostgreSQL's login ends: AuthenticationOk, the parameters (the server's
        canonical values), BackendKeyData, ReadyForQuery; ``sql`` (the client's settings,
        known to be accepted) goes ahead of the client's first request."""
        self.process_id, self.secret_key = self.server.register(self)
        out = [self.proto.send(ev.AUTHENTICATION_OK)]
        out.append(conn.parameter_statuses(self.params))
        out.append(m.backend_key_data(self.process_id, self.secret_key))
        out.append(m.READY_IDLE)
        self.link.write(b"".join(out))
        _CLIENTS_TOTAL.inc("ok")
        self._attach(conn, sync=False)
        if sql:
            conn.send(conn.pipeline.internal_query(sql))  # released when it completes
        elif self.transaction_mode:
            self._release()
        self.link.run(self, direct=False)  # see _data

    def _startup_sql(self, conn: ServerConn, settings: dict[str, str]) -> str | None:
        """Give ``conn`` a fresh login's settings with the client's on top, when that
        cannot fail: the SQL, to be pipelined ahead of the client's first request (often
        none: the last client, or a transaction's, had the same); None when the server
        must first accept the client's values (see _apply_startup)."""
        last = conn.last_login
        if (
            last is not None
            and _same(last[0], settings)
            and _same(last[1], conn.pipeline.synced)
            and _same(last[2], conn.extras)
        ):
            # its last client logged in with these settings and nothing changed them
            # since (one application's pool): no round trip to set them again
            self.params, self.extras = conn.pipeline.synced, conn.extras
            return ""
        sql, reported, extras, synced_after = self._settings_change(conn, settings)
        told = synced_after
        if sql:
            spelled = self._as_reported(conn, reported, synced_after)
            if spelled is None or any(conn.extras.get(k) != v for k, v in extras.items()):
                return None  # the server must see them first
            told = spelled
        conn.pipeline.synced = told  # what that SQL gives it, once the server runs it
        self._take_settings(conn, settings, extras, sql)
        return sql

    async def _apply_startup(self, conn: ServerConn, settings: dict[str, str]) -> str:
        """:meth:`_startup_sql`, or when the server must see the client's values first
        (it may refuse them, and it tells their canonical spelling: ``utf-8`` is
        ``UTF8``) a round trip to apply them. Raises ClientFatal with the server's error."""
        sql = self._startup_sql(conn, settings)
        if sql is not None:
            return sql
        sql, reported, extras, _ = self._settings_change(conn, settings)
        async with asyncio.timeout(self.server.config.pool_timeout):
            ok = await conn.internal(sql)
        if not ok:
            raise ClientFatal(*conn.internal_failure())
        synced = conn.pipeline.synced  # as the server reported it after the SQL
        assert self.pool is not None
        defaults = conn.defaults
        self.pool.accept(
            {(k, v, defaults.get(k)): synced[k] for k, v in reported.items() if k in synced}
        )
        self._take_settings(conn, settings, extras, "")
        return ""

    def _as_reported(
        self, conn: ServerConn, reported: dict[str, str], after: dict[str, str]
    ) -> dict[str, str] | None:
        """``after`` (``conn``'s settings once the login's SQL ran, the client's values
        spelled its way) as the server will report them; None unless it accepted each
        of the client's values before (over the same default: DateStyle ISO keeps the
        order part it finds). Kept on ``conn``: the next login's ``after`` is the same."""
        kept = conn.last_told
        if kept is not None and kept[0] is after:
            return kept[1]
        assert self.pool is not None
        accepted = self.pool.accepted
        defaults = conn.defaults
        told = after
        for name, value in reported.items():
            spelled = accepted.get((name, value, defaults.get(name)))
            if spelled is None:
                return None
            if spelled != value:  # utf-8 is UTF8: the server reports only what changed
                if told is after:
                    told = dict(after)  # a new dict: the settings are shared, never changed
                told[name] = spelled
        conn.last_told = (after, told)
        return told

    def _settings_change(
        self, conn: ServerConn, settings: dict[str, str]
    ) -> tuple[str, dict[str, str], dict[str, str], dict[str, str]]:
        """The SQL that takes ``conn`` to a fresh login's values with the client's on
        top, the client's reported settings that differ from the defaults, its others,
        and the synced settings the connection has once the SQL ran.

        Kept on ``conn`` with what it came from: in session mode each client finds its
        connection just reset (DISCARD ALL reports new values), so the last login's
        record misses, but the next client nearly always asks for the same change."""
        known = conn.parameters
        synced = conn.pipeline.synced
        kept = conn.last_change
        if (
            kept is not None
            and kept[3] == len(known)  # names are only ever added
            and _same(kept[0], settings)
            and _same(kept[1], synced)
            and _same(kept[2], conn.extras)
        ):
            if kept[1] is not synced:  # equal: keep this one, the next check is by identity
                conn.last_change = (settings, synced, conn.extras, kept[3], kept[4])
            return kept[4]
        reported = {k: v for k, v in settings.items() if k in known and conn.defaults.get(k) != v}
        extras = {k: v for k, v in settings.items() if k not in known}
        # Only what differs from that. Each of those first back to its default, then
        # the client's (DateStyle 'ISO' keeps the order part it finds); then the
        # unreported ones.
        want = {**conn.defaults, **reported}
        stale = [k for k, v in want.items() if synced.get(k) != v]
        sql = settings_sql(synced, {k: conn.defaults[k] for k in stale if k in conn.defaults})
        sql += settings_sql(conn.defaults, {k: reported[k] for k in stale if k in reported})
        sql += settings_sql(conn.extras, extras, reset_missing=True)
        after = {**synced, **conn.defaults, **reported} if sql else synced
        change = (sql, reported, extras, after)  # the dicts are shared: never changed in place
        conn.last_change = (settings, synced, conn.extras, len(known), change)
        return change

    def _take_settings(
        self, conn: ServerConn, settings: dict[str, str], extras: dict[str, str], sql: str
    ) -> None:
        conn.extras = extras
        self.params = conn.pipeline.synced  # shared: neither is changed in place
        self.extras = conn.extras
        if not sql:
            conn.last_login = (settings, conn.pipeline.synced, conn.extras)

    def _conn_at_hand(self) -> ServerConn | None:
        assert self.pool is not None
        conn = self.pool.try_acquire()
        if conn is not None:
            _WAIT_SECONDS.observe(0.0)  # still a login that got its connection
        return conn

    async def _acquire_now(self) -> ServerConn:
        conn = self._conn_at_hand()
        if conn is not None:  # no timer to arm (asyncio.timeout is Python code)
            return conn
        assert self.pool is not None
        try:
            async with asyncio.timeout(self.server.config.pool_timeout):
                return await self.pool.acquire()
        except TimeoutError:
            raise ClientFatal(
                "08006",
                f"no server connection available within pool_timeout "
                f"({self.server.config.pool_timeout:g}s)",
            ) from None

    # --- attaching server connections --------------------------------------------

    def _set_sql(self, conn: ServerConn) -> str:
        """SQL that gives ``conn`` this client's settings (reported and extra)."""
        sql = settings_sql(conn.pipeline.synced, self.params)
        if conn.extras is not self.extras:
            sql += settings_sql(conn.extras, self.extras, reset_missing=True)
            conn.extras = self.extras  # never changed in place: shared, compared by identity
        return sql

    def _same_settings(self, conn: ServerConn) -> bool:
        """Whether ``conn`` has this client's settings already.

        This runs at every transaction in transaction mode. The settings dicts are
        never changed in place (a change makes a new one), so equal ones can be shared:
        once compared equal, both sides keep the same one, and the next time the answer
        is one identity check, not a compare of a dozen strings. Both keep the one at
        the lower address: a rule every pair follows, so all clients and connections
        with equal settings end up sharing a single dict."""
        pipeline = conn.pipeline
        if pipeline.synced is not self.params:
            if pipeline.synced != self.params:
                return False
            pipeline.synced = self.params = _older(pipeline.synced, self.params)
        if conn.extras is not self.extras:
            if conn.extras != self.extras:
                return False
            conn.extras = self.extras = _older(conn.extras, self.extras)
        return True

    def _attach(self, conn: ServerConn, sync: bool = True) -> None:
        self._move(_ACTIVE)
        conn.owner = self
        self.conn = conn
        if self.client_paused:
            conn.link.pause_reading(True)
        if conn.write_paused:
            self.link.pause_reading(True)
        if sync:
            sql = "" if self._same_settings(conn) else self._set_sql(conn)
            if self.replay:
                sql += ";".join(self.replay) + ";"
                self.replay = []
            if sql:
                conn.send(conn.pipeline.internal_query(sql))

    def _release(self) -> None:
        self._move(_IDLE)
        conn, self.conn = self.conn, None
        if conn is not None and self.pool is not None:
            if self.client_paused:
                conn.link.pause_reading(False)  # the next owner reads at its own pace
            if conn.write_paused:
                self.link.pause_reading(False)
            self.pool.release(conn)

    def _start_acquire(self) -> None:
        assert self.pool is not None
        conn = self.pool.try_acquire()
        if conn is not None:
            self._attach(conn)
            self._flush_pending()
            return
        self._move(_WAITING)
        self.link.pause_reading(True)
        self.server.spawn(self._acquire_later())

    async def _acquire_later(self) -> None:
        try:
            conn = await self._acquire_now()
        except (ClientFatal, UpstreamError) as exc:
            log.warning("proxy_upstream_failed", extra={"peer": self.peer, "error": str(exc)})
            if self.state is _WAITING:
                self._move(_IDLE)
                self._refuse_pending(exc.sqlstate, client_text(exc))
            return
        if self.state is not _WAITING:  # closed meanwhile
            assert self.pool is not None
            self.pool.release(conn)
            return
        self._attach(conn)
        self._flush_pending()
        self.link.pause_reading(False)

    def _refuse_pending(self, sqlstate: str, text: str) -> None:
        """No server for these requests: fail them with an ERROR, keep the session."""
        types = [t for _, frames in self.pending for t, _, _ in frames]
        self.pending.clear()
        error = ev.ErrorResponse.make(sqlstate, text, "ERROR").to_bytes()
        out, self.discarding = refuse(types, error, self.discarding)
        if out:
            self.link.write(b"".join(out))
        self.link.pause_reading(False)

    def _flush_pending(self) -> None:
        conn = self.conn
        assert conn is not None
        out: list[bytes] = []
        pipeline = conn.pipeline
        try:
            for buf, frames in self.pending:
                pipeline.client_frames(buf, frames, self.stmts, out)
        except ClientProtocolViolation as exc:
            self.fatal(exc.sqlstate, f"protocol violation: {exc}")
            return
        finally:
            self.pending.clear()
        if out:
            conn.send(b"".join(out))
        self._emit_fakes(conn)

    def _emit_fakes(self, conn: ServerConn) -> None:
        fakes: list[bytes] = []
        conn.pipeline.fakes(fakes)
        if fakes:
            self.link.write(b"".join(fakes))

    # --- running ---------------------------------------------------------------------

    def _data(self, data: bytes) -> None:
        self.reads += 1
        if self.reads == DIRECT_AFTER_READS:
            self.link.direct()  # a connection that lives: reads skip Link.data_received
        try:
            if self.proto.receive_query(data) and self._query(data):
                return
            buf, frames = self.proto.receive_frames(data)
            if frames:
                self._requests(buf, frames)
        except ClientProtocolViolation as exc:
            log.warning(
                "proxy_client_protocol_violation", extra={"peer": self.peer, "error": str(exc)}
            )
            self.fatal(exc.sqlstate, f"protocol violation: {exc}")
            return
        if self.proto.state is ClientState.CLOSED:  # Terminate
            self.close()

    def _requests(self, buf: bytes, frames: list[tuple[int, int, int]]) -> None:
        if self.discarding:
            # the rest of a segment we already failed: drop it up to its Sync
            after = past_failed_segment(frames)
            if after < 0:
                return
            self.discarding = False
            self.link.write(m.READY_IDLE)
            frames = frames[after:]
            if not frames:
                return
        conn = self.conn
        if conn is None and self.state is _IDLE:
            if frames[0][0] == m.CONTINUATION:
                # a piece of a message no server got (COPY data dropped below, or a
                # request refused): to a server, it would read as a message of its own
                frames = frames[1:]
                if not frames:
                    return
            if frames[0][0] in _COPY_DATA and _only_copy_data(frames):
                return  # COPY data after the server failed the COPY: it would drop it too
            # fast path: an idle server connection is at hand
            assert self.pool is not None
            conn = self.pool.try_acquire()
            if conn is not None:
                self._attach(conn)
        if conn is None or self.pending:
            self.pending.append((buf, frames))
            if self.state is _IDLE:
                self._start_acquire()
            return
        out: list[bytes] = []
        conn.pipeline.client_frames(buf, frames, self.stmts, out)
        if out:
            conn.link.write(out[0] if len(out) == 1 else b"".join(out))
        self._sent(conn)

    def _query(self, query: bytes) -> bool:
        """The commonest read, one whole simple Query, straight to the server when a
        connection is at hand and nothing waits before it; False: the general path."""
        if self.discarding or self.pending:
            return False
        conn = self.conn
        if conn is None:
            if self.state is not _IDLE:
                return False
            assert self.pool is not None
            conn = self.pool.try_acquire()
            if conn is None:
                return False
            self._attach(conn)
        if not conn.pipeline.simple_query(query):
            return False
        conn.link.write(query)
        self._sent(conn)
        return True

    def _sent(self, conn: ServerConn) -> None:
        first = conn.pipeline.queue.first()
        if first is not None:
            if first.action == FAKE:
                self._emit_fakes(conn)
        elif self.transaction_mode:
            # no answer due (the tail of a message that kept the connection, COPY data
            # after the server's error, a Flush): maybe the transaction is over already
            self.server_idle(conn)

    def to_client(self, data: bytes) -> None:
        self.link.write(data)

    def server_idle(self, conn: ServerConn) -> None:
        if not between_transactions(conn.pipeline, conn.proto.transaction_status):
            return  # in a transaction, or a segment of the client's still open
        state = self.state
        if state is _DRAINING:
            self.fatal("57P01", "terminating connection: the proxy is shutting down")
        elif self.transaction_mode:
            if state is _ACTIVE and not self.proto.mid_message:
                self._release()
        elif (
            state is _ACTIVE
            and conn.generation != self.server.manager.generation
            and conn is not self.pinned
        ):
            self._move(_MIGRATING)
            self.server.spawn(self._migrate(conn))

    async def _migrate(self, conn: ServerConn) -> None:
        """Session mode: move to a new-generation connection if the session state allows."""
        rows = await conn.capture(migrate.SESSION_STATE_SQL)
        if self.state is not _MIGRATING:
            return  # closed or draining meanwhile
        if rows is None or self.conn is not conn:
            self._move(_ACTIVE if self.conn is not None else _IDLE)
            return
        move = migrate.plan(rows)
        if move.blocked:
            self.pinned = conn
            self._move(_ACTIVE)
            log.info("proxy_session_pinned", extra={"peer": self.peer, "db": conn.database})
            return
        if not between_transactions(conn.pipeline, conn.proto.transaction_status):
            self._move(_ACTIVE)
            return  # the client moved on meanwhile; try again at its next boundary
        self.replay = move.replay
        self._release()
        log.info("proxy_session_moved", extra={"peer": self.peer, "replayed": len(move.replay)})

    def server_ended(self, conn: ServerConn, error: bytes) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        conn.owner = None
        in_use = self.state is _ACTIVE or self.state is _MIGRATING
        if (
            in_use
            and self.transaction_mode
            and between_transactions(conn.pipeline, conn.proto.transaction_status)
        ):
            # between transactions the server session is not the client's: drop it
            self._move(_IDLE)
            if conn.write_paused:
                self.link.pause_reading(False)
        else:
            self.link.write(error)  # the client's own session ends, as PostgreSQL says
            self.close()

    def server_lost(self, conn: ServerConn) -> None:
        if conn is self.conn:
            self.conn = None
            if conn.pipeline.fatal_forwarded:
                self.close()  # the server's FATAL error already said why
            else:
                self.fatal("08006", "server connection lost")

    def on_parameter(self, name: str, value: str) -> None:
        # the client's own SET (or ours for it): what it was told is what it carries
        if name not in SERVER_OWNED and self.params.get(name) != value:
            self.params = {**self.params, name: value}  # a new dict: it may be shared

    def server_paused(self, paused: bool) -> None:
        # the server reads slower than the client sends (a big Query, COPY): stop
        # reading the client until the server's write buffer drains
        self.link.pause_reading(paused)

    # --- the link's owner (proxy/transport.py) ---------------------------------------

    def link_data(self, data: bytes) -> None:
        if self.state is _LOGIN:
            self._login_data(data)
        else:
            self._data(data)

    def link_lost(self, exc: Exception | None) -> None:
        self.close()

    def link_paused(self, paused: bool) -> None:
        # the client reads slower than the server answers: stop reading the server
        self.client_paused = paused
        if self.conn is not None:
            self.conn.link.pause_reading(paused)

    # --- ending ---------------------------------------------------------------------

    def fatal(self, sqlstate: str, text: str) -> None:
        if self.state is not _CLOSED:
            self.link.write(ev.ErrorResponse.make(sqlstate, text).to_bytes())
        self.close()

    def shutdown(self) -> None:
        """Proxy stopping: end now if between transactions, else at the transaction's end."""
        conn = self.conn
        if (
            self.state in (_LOGIN, _CLOSED)
            or conn is None
            or between_transactions(conn.pipeline, conn.proto.transaction_status)
        ):
            self.fatal("57P01", "terminating connection: the proxy is shutting down")
        elif self.state is not _DRAINING:
            self._move(_DRAINING)

    def close(self) -> None:
        if self.state is _CLOSED:
            return
        self._move(_CLOSED)
        self._end_client_part()
        self.link.close()
        self.server.unregister(self)
        conn, self.conn = self.conn, None
        if conn is None or self.pool is None:
            return
        conn.owner = None
        if self.client_paused:
            conn.link.pause_reading(False)
        reset = self.server.reset_query
        what = when_client_leaves(conn.pipeline, conn.proto.transaction_status, bool(reset))
        if conn.closed or what == DROP:
            key = running_key(conn)
            if key is not None:
                # PostgreSQL would not notice the client is gone until the query ends:
                # cancel it, as a direct connection's backend would be stopped
                metrics.cancel_requests_total.labels("client_left").inc()
                log.info("proxy_client_left_mid_query", extra={"peer": self.peer})
                self.server.spawn(send_cancel(self.server.config.upstream, *key))
            conn.close()  # mid-request or mid-transaction: never back to the pool
        elif what == KEEP:
            self.pool.release(conn)
        else:
            # our own SET still running (a quick connect-disconnect), or a reset to do
            conn.when_idle(_Release(self.pool, reset, self.server.reset_clears_settings))


class _Release(IdleWaiter):
    """A server connection its client left, on its way back to the pool: once idle,
    the reset query if there is one, then released if clean. A continuation, not a
    task: a task for every session that ends costs more."""

    def __init__(self, pool: Pool, reset: str, reset_clears_settings: bool) -> None:
        self.pool = pool
        self.reset = reset
        self.reset_clears_settings = reset_clears_settings
        self.resetting = False  # the reset query is sent: the next idle is its end
        self.errors = 0  # internal_start's, for the reset

    def conn_idle(self, conn: ServerConn) -> None:
        if self.resetting:
            self._reset_done(conn)
        elif (
            self.reset
            and not conn.closed
            and between_transactions(conn.pipeline, conn.proto.transaction_status)
        ):
            self.resetting = True
            self.errors = conn.internal_start(self.reset)
            conn.when_idle(self)
        else:
            self._release_if_clean(conn)

    def _reset_done(self, conn: ServerConn) -> None:
        if not conn.closed and not conn.internal_succeeded(self.errors):
            # a failed reset may have reset nothing: the next client would inherit
            # this one's session state (SET, temp tables)
            metrics.server_reset_failures_total.inc()
            log.warning("proxy_server_reset_failed", extra={"db": conn.database})
            conn.close()
            return
        if not conn.closed and self.reset_clears_settings:
            conn.extras = {}  # DISCARD ALL / RESET ALL took the client's settings away
        self._release_if_clean(conn)

    def _release_if_clean(self, conn: ServerConn) -> None:
        if conn.closed or not between_transactions(conn.pipeline, conn.proto.transaction_status):
            conn.close()
        else:
            self.pool.release(conn)
