"""Server connections per database, tagged with a credential generation.

Modelled on asyncpg's pool ``_generation``/``expire_connections``: the manager keeps
one generation "in service". When the provider announces new credentials, the manager
first logs in with them (a trial connection); only if that works does it switch.
After a switch, idle old connections close at once, busy ones when their client
releases them (at ReadyForQuery 'I'), and whatever is left after ``drain_timeout`` is
closed with 57P01. If the trial fails, the old generation keeps serving and the
manager retries with backoff.

A pool is one per database: the upstream user is the one credential in service, and
a client's startup settings are applied to whichever server connection it gets (see
:mod:`proxy.protocol.parameters`), never part of the key. ``max_db_connections``
caps a pool's connections of every generation, trial logins included;
``server_idle_timeout`` and ``server_lifetime`` (PgBouncer's names) close idle and
old connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from typing import Any, Final

from proxy import metrics, upstream
from proxy.backoff import Backoff
from proxy.config import ProxyConfig
from proxy.credentials import CredentialProvider, Credentials
from proxy.errors import UpstreamAuthError, UpstreamError
from proxy.protocol.pipeline import between_transactions
from proxy.protocol.statements import StatementNames
from proxy.transport import Link
from proxy.upstream import ServerConn

log = logging.getLogger("credsidecar.proxy")

LIFETIME_JITTER = 0.1  # a connection lives 90-100% of server_lifetime: not all at once
# read at every release: Final makes it a C variable when compiled, not two lookups
_monotonic: Final = time.monotonic
ACCEPTED_SETTINGS = 1024  # remembered per pool (Pool.accept)
SHUTDOWN_GRACE = 1.0  # seconds closed connections get at shutdown to say goodbye (TLS)


class Pool:
    def __init__(self, manager: PoolManager, database: str) -> None:
        self.manager = manager
        self.database = database
        self.size = manager.config.pool_size
        self.limit = manager.config.max_db_connections  # every generation; 0: unlimited
        self.idle: list[ServerConn] = []
        self.conns: set[ServerConn] = set()
        self.opening = 0
        self.waiters: deque[asyncio.Future[ServerConn | None]] = deque()
        # reported settings the server has accepted: (name, value asked for, the
        # connection's default it was set over) -> the value as the server reported it
        # (its spelling: utf-8 is UTF8, DateStyle ISO over "ISO, MDY" stays "ISO, MDY").
        # Setting one again cannot fail and gives that value, so a login need not wait.
        self.accepted: dict[tuple[str, str, str | None], str] = {}

    def accept(self, settings: dict[tuple[str, str, str | None], str]) -> None:
        """Remember settings the server took (bounded: any client can make up values,
        so what is remembered starts over when full)."""
        if len(self.accepted) + len(settings) > ACCEPTED_SETTINGS:
            self.accepted.clear()
        self.accepted.update(settings)

    def _current(self) -> int:
        gen = self.manager.generation
        return sum(1 for c in self.conns if c.generation == gen)

    def _room(self) -> bool:
        """Below max_db_connections, counting every connection and login under way."""
        return not self.limit or len(self.conns) + self.opening < self.limit

    def reserve(self) -> bool:
        """Hold a slot for a connection opened outside :meth:`acquire` (a trial login),
        closing an idle connection to make room; False when every slot is busy. The
        caller calls :meth:`unreserve` when done."""
        if not self._room():
            if not self.idle:
                return False
            self.idle.pop(0).close()  # the longest idle: the generation switch drains it anyway
        self.opening += 1
        return True

    def unreserve(self) -> None:
        self.opening -= 1
        self.wake_waiters(1)

    def try_acquire(self) -> ServerConn | None:
        """An idle connection of the current generation, without waiting."""
        gen = self.manager.generation
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.generation != gen:
                self.drain(conn, "idle")
                continue
            return conn
        return None

    async def acquire(self) -> ServerConn:
        started = time.monotonic()
        while True:
            conn = self.try_acquire()
            if conn is not None:
                break
            if self._current() + self.opening < self.size and self._room():
                self.opening += 1
                try:
                    conn = await self.manager.open(self)
                except BaseException:
                    self.wake_waiters(1)  # the slot we held is free again
                    raise
                finally:
                    self.opening -= 1
                if conn.generation != self.manager.generation:
                    # the generation moved on while we were logging in
                    self.drain(conn, "idle")
                    continue
                break
            waiter: asyncio.Future[ServerConn | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                got = await waiter
            except asyncio.CancelledError:
                handed = waiter.result() if waiter.done() and not waiter.cancelled() else None
                if handed is not None:
                    self.release(handed)  # handed over as we gave up: pass it on
                raise
            if got is not None and not got.closed:
                conn = got
                break
        metrics.wait_seconds.observe(time.monotonic() - started)
        return conn

    def add(self, conn: ServerConn) -> None:
        conn.on_close = self._closed
        lifetime = self.manager.config.server_lifetime
        if lifetime:
            jitter = 1.0 - LIFETIME_JITTER * self.manager.rng.random()
            conn.expires = time.monotonic() + lifetime * jitter
        self.conns.add(conn)

    def release(self, conn: ServerConn) -> None:
        """Take a connection back from a client (its transaction is over)."""
        conn.owner = None
        if conn.closed:
            return
        if conn.generation != self.manager.generation:
            self.drain(conn, "after_transaction")
            return
        if not between_transactions(conn.pipeline, conn.proto.transaction_status):
            # mid-transaction or mid-segment: nothing safe to hand to another client
            metrics.idle_transactions_total.labels("released").inc()
            log.warning(
                "proxy_released_mid_transaction",
                extra={"db": self.database, "status": conn.proto.transaction_status.decode()},
            )
            conn.close()
            return
        now = _monotonic()
        why = self._past_its_time(conn, now)
        if why is not None:
            self.retire(conn, why)
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = now
        self.idle.append(conn)

    def _past_its_time(self, conn: ServerConn, now: float) -> str | None:
        """Why ``conn`` must not serve again (``now``: monotonic), or None."""
        creds = self.manager.current_credentials()
        if (
            creds is not None
            and creds.expires_at is not None
            and creds.generation == conn.generation
            and time.time() >= creds.expires_at
        ):
            return "credential_expired"  # renewals move expires_at, so read the latest
        if conn.expires <= now:
            return "lifetime"
        return None

    def retire(self, conn: ServerConn, why: str) -> None:
        """Close a connection past server_idle_timeout, server_lifetime or its credential."""
        metrics.server_retired_total.labels(why).inc()
        log.info("proxy_server_retired", extra={"db": self.database, "why": why})
        conn.close()

    def sweep(self, now: float) -> None:
        """Close idle connections past server_idle_timeout or their lifetime."""
        idle_timeout = self.manager.config.server_idle_timeout
        for conn in list(self.idle):
            if (why := self._past_its_time(conn, now)) is not None:
                self.retire(conn, why)
            elif idle_timeout and now - conn.idle_since >= idle_timeout:
                self.retire(conn, "idle_timeout")

    def drain(self, conn: ServerConn, how: str) -> None:
        metrics.drains_total.labels(how).inc()
        log.info(
            "proxy_drained",
            extra={"db": self.database, "generation": conn.generation, "how": how},
        )
        conn.close()

    def _closed(self, conn: ServerConn) -> None:
        if not conn.link.closed:
            self.manager.let_go(conn.link)
        self.conns.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self.wake_waiters(1)

    def wake_waiters(self, count: int | None = None) -> None:
        """Let waiters retry (a slot freed up, or the generation changed)."""
        woken = 0
        while self.waiters and (count is None or woken < count):
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woken += 1

    def close_all(self) -> None:
        for conn in list(self.conns):
            conn.close()

    def status(self) -> dict[str, Any]:
        gen = self.manager.generation
        idle = set(self.idle)
        conns = []
        for conn in self.conns:
            current = conn.generation == gen
            state = "idle" if conn in idle else "active"
            if not current:
                state = "draining"
            conns.append({"state": state, "generation": conn.generation, "current": current})
        return {
            "database": self.database,
            "size": self.size,
            "max_db_connections": self.limit,
            "waiting": sum(1 for w in self.waiters if not w.done()),
            "connections": conns,
        }


class PoolManager:
    def __init__(self, config: ProxyConfig, provider: CredentialProvider) -> None:
        self.config = config
        self.provider = provider
        # read at every release: bound once (the provider is a Protocol, so compiled
        # code would look the method up by name each time)
        self.current_credentials = provider.current
        self.pools: dict[str, Pool] = {}
        self.creds: Credentials | None = None
        self.generation = 0  # of the credentials in service (read on every release)
        # session mode: the connection is the client's own, statement names pass through
        renaming = config.transaction_pooling
        self.names = StatementNames(config.max_prepared_statements if renaming else 0)
        self._task: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self.on_drain_timeout: Any = None  # callable(conn) set by the server: tell the client
        self.rng = random.Random()
        self._janitor: asyncio.Task[None] | None = None
        # closed connections whose transport has not let go of its socket yet (a TLS
        # close_notify under way): shutdown waits for them, then cuts what is left
        self._letting_go: set[Link] = set()
        self._prune_at = 64

    def pool(self, database: str) -> Pool:
        pool = self.pools.get(database)
        if pool is None:
            pool = self.pools[database] = Pool(self, database)
        return pool

    async def start(self) -> None:
        self._serve(self.provider.current())
        self._task = asyncio.create_task(self._follow(), name="proxy-generations")
        timeouts = [t for t in (self.config.server_idle_timeout, self.config.server_lifetime) if t]
        # a quarter of the shortest timeout, between 50 ms and 1 s: closes come at most
        # that late, and an idle proxy wakes once a second at most. Always running: a
        # credential's end (expires_at) needs it even with both timeouts off.
        tick = min(1.0, max(0.05, min(timeouts, default=4.0) / 4))
        self._janitor = asyncio.create_task(self._sweep(tick), name="proxy-pool-janitor")

    async def _sweep(self, tick: float) -> None:
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                try:
                    pool.sweep(now)
                except Exception as exc:  # one bad sweep must not end the sweeping
                    log.error("proxy_sweep_failed", extra={"error": type(exc).__name__})

    async def close(self) -> None:
        for task in (self._task, self._janitor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for timer in self._timers:
            timer.cancel()
        for pool in self.pools.values():
            pool.close_all()
        await self._cut_loose(SHUTDOWN_GRACE)

    def let_go(self, link: Link) -> None:
        """Keep ``link`` (closed by us or the server) until its transport is gone."""
        if len(self._letting_go) >= self._prune_at:
            self._letting_go = {held for held in self._letting_go if not held.closed}
            self._prune_at = max(64, 2 * len(self._letting_go))
        self._letting_go.add(link)

    async def _cut_loose(self, grace: float) -> None:
        """Wait up to ``grace`` for closed connections to end, then abort the rest: none
        is left to the garbage collector (or the server) after the proxy stops."""
        pending = [link for link in self._letting_go if not link.closed]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(link.wait_lost() for link in pending))
        for link in pending:
            if not link.closed:
                link.abort()
        self._letting_go.clear()
        await asyncio.sleep(0)  # an abort's connection_lost runs on the next iteration

    async def credentials(self) -> Credentials:
        """The credentials in service, waiting for the first ones if needed."""
        while self.creds is None:
            creds = self.provider.current() or await self.provider.changed(0)
            if self.creds is None:
                self._serve(creds)
        return self.creds

    async def open(self, pool: Pool) -> ServerConn:
        creds = await self.credentials()
        try:
            conn = await self._connect(creds, pool)
        except UpstreamAuthError:
            newer = self.provider.current()
            if newer is None or newer.generation <= creds.generation:
                raise
            # the old password stopped working before we switched: the new one is the trial
            conn = await self._connect(newer, pool)
            if newer.generation > self.generation:
                self._switch(newer)
        pool.add(conn)
        return conn

    async def _connect(self, creds: Credentials, pool: Pool) -> ServerConn:
        return await upstream.connect(
            self.config.upstream,
            creds,
            pool.database,
            self.names,
            self.config.message_buffer,
        )

    async def _follow(self) -> None:
        while True:
            new = await self.provider.changed(self.generation)
            await self._try_switch(new)

    async def _try_switch(self, new: Credentials) -> None:
        backoff = Backoff(0.5, 10.0, self.rng)
        while True:
            latest = self.provider.current()
            if latest is not None and latest.generation > new.generation:
                new = latest
            if new.generation <= self.generation:
                return
            pool = max(self.pools.values(), key=lambda p: len(p.conns), default=None)
            if pool is None or self.creds is None:
                self._switch(new)
                return
            if not pool.reserve():
                # max_db_connections reached and nothing idle: retry when a slot may be free
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.provider.changed(new.generation), backoff.next())
                continue
            try:
                conn = await self._connect(new, pool)
            except UpstreamError as failed:
                exc: UpstreamError | None = failed
            else:
                exc = None
            finally:
                pool.unreserve()
            if exc is not None:
                metrics.generation_rejections_total.inc()
                delay = backoff.next()
                log.warning(
                    "proxy_generation_rejected",
                    extra={
                        "generation": new.generation,
                        "user": new.username,
                        "serving_generation": self.generation,
                        "error": str(exc),
                        "retry_in": delay,
                    },
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.provider.changed(new.generation), delay)
                continue
            if new.generation <= self.generation:
                conn.close()
                return
            self._switch(new)
            pool.add(conn)
            pool.release(conn)
            return

    def _switch(self, new: Credentials) -> None:
        old = self.generation
        self._serve(new)
        metrics.generation_switches_total.inc()
        log.info(
            "proxy_generation_switched",
            extra={"generation": new.generation, "previous": old, "user": new.username},
        )
        for pool in self.pools.values():
            for conn in [c for c in pool.idle if c.generation != new.generation]:
                pool.idle.remove(conn)
                pool.drain(conn, "idle")
            pool.wake_waiters()
        loop = asyncio.get_running_loop()
        self._timers = [t for t in self._timers if t.when() > loop.time()]  # drop fired ones
        self._timers.append(
            loop.call_later(self.config.drain_timeout, self._drain_deadline, new.generation)
        )

    def _serve(self, creds: Credentials | None) -> None:
        self.creds = creds
        self.generation = creds.generation if creds is not None else 0

    def _drain_deadline(self, generation: int) -> None:
        for pool in self.pools.values():
            for conn in [c for c in pool.conns if c.generation < generation]:
                if conn.owner is not None and self.on_drain_timeout is not None:
                    self.on_drain_timeout(conn)
                pool.drain(conn, "timeout")

    def status(self) -> list[dict[str, Any]]:
        return [pool.status() for pool in self.pools.values()]
