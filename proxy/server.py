"""Accept loop and per-client sessions: thin glue between sockets and ``protocol/``.

A session logs the client in (TLS answer, client auth, a server connection to learn
the server's parameters), then moves messages: client requests go through the server
connection's :class:`~proxy.protocol.pipeline.Pipeline` (statement renaming), server
responses come back through it. In transaction mode the server connection returns to
the pool at every ReadyForQuery 'I'; in session mode when the client leaves (after
``DISCARD ALL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

from proxy import metrics, upstream
from proxy.clientauth import UsersFile, peer_allowed, peer_uid, secure_socket
from proxy.config import ProxyConfig, TLSConfig
from proxy.credentials import CredentialProvider
from proxy.errors import UpstreamError, client_text
from proxy.pool import Pool, PoolManager
from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol.auth import ScramVerifier
from proxy.protocol.errors import AuthenticationFailed, ClientProtocolViolation
from proxy.protocol.frontend import ClientConnection
from proxy.protocol.pipeline import FAKE, INTERNAL, SYNCED_PARAMETERS, ClientStatements, refuse
from proxy.protocol.states import ClientState
from proxy.transport import Link
from proxy.upstream import ServerConn, ServerOwner

log = logging.getLogger("credsidecar.proxy")

LOGIN_TIMEOUT = 60.0
# What a session-mode client's server session holds, to decide whether it can move to
# a connection of the new generation: anything in "blocked" cannot be carried over.
SESSION_STATE_SQL = """\
SELECT 'blocked', ((SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())
  + (SELECT count(*) FROM pg_listening_channels())
  + (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory')
  + (SELECT count(*) FROM pg_cursors))::text
UNION ALL SELECT 'set', format('SET %I TO %L', name, current_setting(name))
  FROM pg_settings WHERE source = 'session'
UNION ALL SELECT 'prepare', statement FROM pg_prepared_statements WHERE from_sql"""
_NOT_FORWARDED = ("user", "database", *SYNCED_PARAMETERS)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Fatal(Exception):
    """End a client's session with this SQLSTATE and message."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


class ClientSession(ServerOwner):
    def __init__(self, server: ProxyServer, link: Link, unix: bool) -> None:
        self.server = server
        self.link = link
        self.unix = unix
        self.proto = ClientConnection()
        self.process_id = 0
        self.secret_key = 0
        self.user = ""
        self.pool: Pool | None = None
        self.conn: ServerConn | None = None
        self.stmts = ClientStatements()
        self.params: dict[str, str] = {}
        self.pending: list[tuple[bytes, list[tuple[int, int, int]]]] = []
        self.acquiring = False
        self.logged_in = False
        self.closed = False
        self.stop_at_idle = False
        self.migrating = False
        self.discarding = False  # a failed extended-protocol segment awaits its Sync
        self.client_paused = False
        self.pinned: ServerConn | None = None  # old connection whose state cannot move
        self.replay: list[str] = []  # session state to re-create on the next connection
        self.peer = self._peer()
        self.transaction_mode = server.config.pool_mode == "transaction"

    def _peer(self) -> str:
        if self.unix or self.link.transport is None:
            return "unix"
        addr = self.link.transport.get_extra_info("peername")
        return f"{addr[0]}:{addr[1]}" if addr else "?"

    @property
    def state(self) -> str:
        if not self.logged_in:
            return "login"
        if self.acquiring:
            return "waiting"
        return "active" if self.conn is not None else "idle"

    # --- login ---------------------------------------------------------------------

    async def login(self) -> None:
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT):
                await self._login()
        except Fatal as exc:
            self.fatal(exc.sqlstate, str(exc))
        except ClientProtocolViolation as exc:
            metrics.clients_total.labels("protocol_error").inc()
            log.warning(
                "proxy_client_protocol_violation", extra={"peer": self.peer, "error": str(exc)}
            )
            self.fatal(exc.sqlstate, f"protocol violation: {exc}")
        except AuthenticationFailed as exc:
            metrics.clients_total.labels("auth_failed").inc()
            metrics.auth_failures_total.labels("client").inc()
            log.warning(
                "proxy_client_auth_failed",
                extra={"peer": self.peer, "user": self.user, "error": str(exc)},
            )
            # the client learns no more than PostgreSQL would tell it
            text = "password authentication failed" if exc.sqlstate == "28P01" else str(exc)
            self.fatal(exc.sqlstate, f'{text} for user "{self.user}"')
        except UpstreamError as exc:
            log.warning("proxy_upstream_failed", extra={"peer": self.peer, "error": str(exc)})
            self.fatal(exc.sqlstate, client_text(exc))  # the detail is for the log only
        except TimeoutError:
            self.fatal("08006", "login did not complete in time")
        except ConnectionError:
            self.close()

    async def _next(self) -> ev.ClientEvent:
        while (event := self.proto.next_event()) is None:
            self.proto.receive_data(await self.link.recv())
        return event

    async def _login(self) -> None:
        while True:
            event = await self._next()
            if isinstance(event, m.SSLRequest):
                await self._answer_ssl()
            elif isinstance(event, m.GSSENCRequest):
                self.link.write(self.proto.send(ev.SSLResponse(False)))
            elif isinstance(event, m.CancelRequest):
                self.server.cancel(event)
                self.close()
                return
            elif isinstance(event, m.StartupMessage):
                break
        params = dict(event.parameters)
        self.user = params.get("user", "")
        if not self.user:
            raise Fatal("28000", "no PostgreSQL user name specified in startup packet")
        if "replication" in params and params["replication"] not in ("false", "0", "off"):
            raise Fatal("08P01", "replication connections are not supported by the proxy")
        unsupported = sorted(k for k in params if k.startswith("_pq_."))
        if event.protocol & 0xFFFF or unsupported:
            for key in unsupported:
                del params[key]
            self.link.write(self.proto.send(ev.NegotiateProtocolVersion(0, tuple(unsupported))))
        if len(self.server.sessions) > self.server.config.max_client_conn:
            metrics.clients_total.labels("refused").inc()
            raise Fatal("53300", "sorry, too many clients already (max_client_conn)")
        await self._authenticate()
        database = params.get("database") or self.user
        extra = tuple(sorted((k, v) for k, v in params.items() if k not in _NOT_FORWARDED))
        self.pool = self.server.manager.pool((database, extra))
        conn = await self._acquire_now()
        # The client's startup values of carried parameters are applied with one SET
        # pipelined behind the login reply (no extra round trip); the server's
        # ParameterStatus answers then reach the client like any other.
        wanted = {k: params[k] for k in SYNCED_PARAMETERS if k in params}
        sql = self._set_sql(conn, wanted)
        self.params = {**conn.pipeline.synced, **wanted}
        self.process_id, self.secret_key = self.server.register(self)
        out = [self.proto.send(ev.AuthenticationOk())]
        shown = {**conn.parameters, **wanted}
        out += [m.parameter_status(k, v) for k, v in shown.items()]
        out.append(m.backend_key_data(self.process_id, self.secret_key))
        out.append(m.ready_for_query(b"I"))
        self.link.write(b"".join(out))
        self.logged_in = True
        metrics.clients_total.labels("ok").inc()
        self.link.on_pause = self._client_paused
        self._attach(conn, sync=False)
        if sql:
            conn.send(conn.pipeline.internal_query(sql))  # released when it completes
        elif self.transaction_mode:
            self._release()
        self.link.run(self._data, self._lost)

    async def _answer_ssl(self) -> None:
        ctx = self.server.tls.context() if self.server.tls is not None else None
        if ctx is None or self.unix:
            self.link.write(self.proto.send(ev.SSLResponse(False)))
            return
        if self.proto.buffered:
            # bytes after SSLRequest, before the handshake: plaintext injection (CVE-2021-23214)
            raise ClientProtocolViolation("data received before the TLS handshake")
        self.link.write(self.proto.send(ev.SSLResponse(True)))
        assert self.link.transport is not None
        transport = await asyncio.get_running_loop().start_tls(
            self.link.transport, self.link, ctx, server_side=True
        )
        self.link.transport = cast(asyncio.Transport, transport)

    async def _authenticate(self) -> None:
        cfg = self.server.config.client_auth
        if cfg.method == "trust":
            return
        if cfg.method == "peer":
            sock = self.link.transport.get_extra_info("socket") if self.link.transport else None
            if not self.unix or sock is None:
                raise AuthenticationFailed("peer authentication (unix socket only) failed", "28000")
            if not peer_allowed(peer_uid(sock), cfg.peer_uids()):
                raise AuthenticationFailed("peer authentication failed", "28000")
            return
        users = self.server.users
        assert users is not None
        verifier = ScramVerifier(users.lookup(self.user))
        send = self.link.write
        send(self.proto.send(ev.AuthenticationRequest(m.AUTH_SASL, verifier.mechanisms())))
        first = await self._next()
        assert isinstance(first, ev.PasswordMessage)
        server_first = verifier.client_first(first.payload)
        send(self.proto.send(ev.AuthenticationRequest(m.AUTH_SASL_CONTINUE, server_first)))
        final = await self._next()
        assert isinstance(final, ev.PasswordMessage)
        server_final = verifier.client_final(final.payload)
        send(m.authentication(m.AUTH_SASL_FINAL, server_final))

    async def _acquire_now(self) -> ServerConn:
        assert self.pool is not None
        try:
            async with asyncio.timeout(self.server.config.pool_timeout):
                return await self.pool.acquire()
        except TimeoutError:
            raise Fatal(
                "08006",
                f"no server connection available within pool_timeout "
                f"({self.server.config.pool_timeout:g}s)",
            ) from None

    # --- attaching server connections --------------------------------------------

    def _set_sql(self, conn: ServerConn, wanted: dict[str, str]) -> str:
        """SET statements that give ``conn`` the carried parameters in ``wanted``."""
        have = conn.pipeline.synced
        sql = ""
        for k, v in wanted.items():
            if have.get(k) != v:
                sql += f'SET "{k}" TO {_quote(v)};'
        return sql

    def _attach(self, conn: ServerConn, sync: bool = True) -> None:
        conn.owner = self
        self.conn = conn
        if self.client_paused:
            conn.link.pause_reading(True)
        if sync:
            # one dict compare in the usual case (this runs at every transaction in
            # transaction mode); building SETs only when something differs
            sql = self._set_sql(conn, self.params) if conn.pipeline.synced != self.params else ""
            if self.replay:
                sql += ";".join(self.replay) + ";"
                self.replay = []
            if sql:
                conn.send(conn.pipeline.internal_query(sql))

    def _release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and self.pool is not None:
            if self.client_paused:
                conn.link.pause_reading(False)  # the next owner reads at its own pace
            self.pool.release(conn)

    def _start_acquire(self) -> None:
        assert self.pool is not None
        conn = self.pool.try_acquire()
        if conn is not None:
            self._attach(conn)
            self._flush_pending()
            return
        self.acquiring = True
        self.link.pause_reading(True)
        self.server.spawn(self._acquire_later())

    async def _acquire_later(self) -> None:
        try:
            conn = await self._acquire_now()
        except (Fatal, UpstreamError) as exc:
            log.warning("proxy_upstream_failed", extra={"peer": self.peer, "error": str(exc)})
            self._refuse_pending(exc.sqlstate, client_text(exc))
            return
        finally:
            self.acquiring = False
        if self.closed:
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
        try:
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
            types = [t for t, _, _ in frames]
            if 83 not in types:  # 'S'
                return
            self.discarding = False
            self.link.write(m.ready_for_query(b"I"))
            frames = frames[types.index(83) + 1 :]
            if not frames:
                return
        conn = self.conn
        if conn is None and not self.pending and not self.acquiring:
            # fast path: an idle server connection is at hand
            assert self.pool is not None
            conn = self.pool.try_acquire()
            if conn is not None:
                self._attach(conn)
        if conn is None or self.pending:
            self.pending.append((buf, frames))
            if not self.acquiring:
                self._start_acquire()
            return
        out: list[bytes] = []
        pipeline = conn.pipeline
        pipeline.client_frames(buf, frames, self.stmts, out)
        if out:
            conn.link.write(out[0] if len(out) == 1 else b"".join(out))
        if pipeline.queue and pipeline.queue[0].action == FAKE:
            self._emit_fakes(conn)

    def to_client(self, data: bytes) -> None:
        self.link.write(data)

    def server_idle(self, conn: ServerConn) -> None:
        if conn.proto.transaction_status != b"I":
            return
        if self.stop_at_idle:
            self.fatal("57P01", "terminating connection: the proxy is shutting down")
            return
        if self.transaction_mode:
            self._release()
        elif (
            conn.generation != self.server.manager.generation
            and not self.migrating
            and conn is not self.pinned
        ):
            self.migrating = True
            self.server.spawn(self._migrate(conn))

    async def _migrate(self, conn: ServerConn) -> None:
        """Session mode: move to a new-generation connection if the session state allows."""
        try:
            rows = await conn.capture(SESSION_STATE_SQL)
        finally:
            self.migrating = False
        if rows is None or self.conn is not conn or self.closed:
            return
        replay: list[str] = []
        blocked = False
        for kind, value in rows:
            if kind == "blocked":
                blocked = value != "0"
            elif kind == "set" and value is not None:
                replay.append(value)
            elif kind == "prepare" and value is not None:
                text = value.strip().rstrip(";")
                blocked = blocked or ";" in text  # part of a multi-statement string
                replay.append(text)
        if blocked:
            self.pinned = conn
            log.info("proxy_session_pinned", extra={"peer": self.peer, "db": conn.database})
            return
        if not conn.pipeline.idle or conn.proto.transaction_status != b"I":
            return  # the client moved on meanwhile; try again at its next boundary
        self.replay = replay
        self._release()
        log.info("proxy_session_moved", extra={"peer": self.peer, "replayed": len(replay)})

    def server_ended(self, conn: ServerConn, error: bytes) -> None:
        if conn is not self.conn:
            return
        if self.transaction_mode and conn.proto.transaction_status == b"I":
            # between transactions the server session is not the client's: drop it
            self.conn = None
            conn.owner = None
        else:
            self.conn = None
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
        if name in SYNCED_PARAMETERS:
            self.params[name] = value

    def _client_paused(self, paused: bool) -> None:
        # the client reads slower than the server answers: stop reading the server
        self.client_paused = paused
        if self.conn is not None:
            self.conn.link.pause_reading(paused)

    def _lost(self, exc: Exception | None) -> None:
        self.close()

    # --- ending ---------------------------------------------------------------------

    def fatal(self, sqlstate: str, text: str) -> None:
        if not self.closed:
            self.link.write(ev.ErrorResponse.make(sqlstate, text).to_bytes())
        self.close()

    def shutdown(self) -> None:
        """Proxy stopping: end now if between transactions, else at the transaction's end."""
        conn = self.conn
        if (
            not self.logged_in
            or conn is None
            or (conn.pipeline.idle and conn.proto.transaction_status == b"I")
        ):
            self.fatal("57P01", "terminating connection: the proxy is shutting down")
        else:
            self.stop_at_idle = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.link.close()
        self.server.unregister(self)
        conn, self.conn = self.conn, None
        if conn is None or self.pool is None:
            return
        conn.owner = None
        if self.client_paused:
            conn.link.pause_reading(False)
        pipeline = conn.pipeline
        only_ours = all(entry.action == INTERNAL for entry in pipeline.queue)
        reset = (
            self.server.config.server_reset_query
            if self.server.config.pool_mode == "session"
            else ""
        )
        if (
            conn.closed
            or not only_ours
            or (pipeline.idle and conn.proto.transaction_status != b"I")
        ):
            conn.close()  # mid-request or mid-transaction: not reusable
        elif reset or not pipeline.idle:
            # our own SET still running (a quick connect-disconnect), or a reset to do
            self.server.spawn(self._finish_and_release(conn, self.pool, reset))
        else:
            self.pool.release(conn)

    async def _finish_and_release(self, conn: ServerConn, pool: Pool, reset: str) -> None:
        try:
            await conn.wait_idle()
            if not conn.closed and conn.proto.transaction_status == b"I" and reset:
                await conn.internal(reset)
        except UpstreamError:
            conn.close()
            return
        if conn.closed or conn.proto.transaction_status != b"I":
            conn.close()
            return
        pool.release(conn)


class TLSFiles:
    """The client-facing TLS context, rebuilt when the certificate or key file changes.

    A renewal (the agent renders a new bundle) is picked up at the next handshake
    without a restart; a file that does not load keeps the previous context in use.
    """

    def __init__(self, config: TLSConfig) -> None:
        self.config = config
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._context: ssl.SSLContext | None = None

    def _files(self) -> list[Path]:
        return [p for p in (self.config.cert, self.config.key) if p is not None]

    def context(self) -> ssl.SSLContext:
        try:
            stamp = tuple(
                (st.st_mtime_ns, st.st_size, st.st_ino) for st in map(os.stat, self._files())
            )
        except OSError as exc:
            if self._context is None:
                raise
            log.warning("proxy_tls_unreadable", extra={"error": exc.strerror})
            return self._context
        if stamp != self._stamp:
            try:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                key = str(self.config.key) if self.config.key is not None else None
                ctx.load_cert_chain(str(self.config.cert), key)
            except (OSError, ssl.SSLError) as exc:
                if self._context is None:
                    raise
                # half-replaced or broken files: keep serving with what worked
                log.warning("proxy_tls_reload_failed", extra={"error": str(exc)})
                return self._context
            self._stamp = stamp
            self._context = ctx
            log.info("proxy_tls_loaded", extra={"cert": str(self.config.cert)})
            return ctx
        assert self._context is not None  # a stamp is only recorded with a context
        return self._context


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
        self.by_pid: dict[int, ClientSession] = {}
        self._next_pid = secrets.randbelow(1 << 20) + 1
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.tls = TLSFiles(config.tls) if config.tls is not None else None
        self.users = (
            UsersFile(config.client_auth.users_file) if config.client_auth.users_file else None
        )
        self.stopping = False
        self._empty = asyncio.Event()
        self._registry = registry if registry is not None else metrics.REGISTRY
        self._collector = metrics.StateCollector(self.status)
        self.addresses: list[Any] = []
        self.socket_path: Path | None = None

    async def start(self) -> None:
        """Start the provider and the listeners; on failure nothing is left running."""
        if self.tls is not None:
            self.tls.context()  # a certificate that does not load is a startup error
        await self.provider.start()
        await self.manager.start()
        try:
            await self._listen()
        except BaseException:
            for srv in self._servers:
                srv.close()
            await self.manager.close()
            await self.provider.close()
            raise
        self._registry.register(self._collector)
        log.info(
            "proxy_started",
            extra={
                "listen": [str(a) for a in self.addresses],
                "pool_mode": self.config.pool_mode,
                "upstream": upstream.where(self.config.upstream),
            },
        )

    async def _listen(self) -> None:
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

    def _link(self, unix: bool) -> Link:
        link = Link()
        link.on_made = lambda lk: self._accepted(lk, unix)
        return link

    def _accepted(self, link: Link, unix: bool) -> None:
        if self.stopping:
            link.abort()
            return
        session = ClientSession(self, link, unix)
        self.sessions.add(session)
        self._empty.clear()
        self.spawn(session.login())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def register(self, session: ClientSession) -> tuple[int, int]:
        """A BackendKeyData of the proxy's own for this client."""
        while self._next_pid in self.by_pid:
            self._next_pid += 1
        pid = self._next_pid
        self._next_pid = (self._next_pid % 0x7FFFFFF0) + 1
        self.by_pid[pid] = session
        return pid, secrets.randbits(31)

    def unregister(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        if self.by_pid.get(session.process_id) is session:
            del self.by_pid[session.process_id]
        if not self.sessions:
            self._empty.set()

    def cancel(self, request: m.CancelRequest) -> None:
        session = self.by_pid.get(request.process_id)
        if session is None or not hmac.compare_digest(
            session.secret_key.to_bytes(4, "big", signed=True),
            request.secret_key.to_bytes(4, "big", signed=True),
        ):
            metrics.cancel_requests_total.labels("unknown").inc()
            return
        conn = session.conn
        if conn is None or conn.pipeline.idle or conn.backend_key is None:
            metrics.cancel_requests_total.labels("idle").inc()
            return
        metrics.cancel_requests_total.labels("forwarded").inc()
        key = conn.backend_key
        self.spawn(self._send_cancel(key.process_id, key.secret_key))

    async def _send_cancel(self, process_id: int, secret_key: int) -> None:
        cfg = self.config.upstream
        loop = asyncio.get_running_loop()
        link: Link | None = None
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                _, link = await loop.create_connection(Link, cfg.host, cfg.port)
                if cfg.sslmode in ("require", "verify-ca", "verify-full"):
                    await upstream._negotiate_tls(link, cfg)
                link.write(m.cancel_request(process_id, secret_key))
                with contextlib.suppress(ConnectionError):
                    await link.recv()  # the server closes when done
        except (OSError, TimeoutError, UpstreamError) as exc:
            log.warning("proxy_cancel_failed", extra={"error": str(exc) or type(exc).__name__})
        finally:
            if link is not None:
                link.close()

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
        for srv in self._servers:
            srv.close()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        for session in list(self.sessions):
            session.shutdown()
        if self.sessions:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), timeout)
        for session in list(self.sessions):
            session.fatal("57P01", "terminating connection: the proxy is shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.manager.close()
        await self.provider.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        with contextlib.suppress(KeyError):
            self._registry.unregister(self._collector)
        log.info("proxy_stopped", extra={})

    def status(self) -> dict[str, Any]:
        clients: dict[str, int] = {"login": 0, "idle": 0, "active": 0, "waiting": 0}
        for session in self.sessions:
            clients[session.state] += 1
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
