"""Server connections per (database, startup options), tagged with a credential generation.

Modelled on asyncpg's pool ``_generation``/``expire_connections``: the manager keeps
one generation "in service". When the provider announces new credentials, the manager
first logs in with them (a trial connection); only if that works does it switch.
After a switch, idle old connections close at once, busy ones when their client
releases them (at ReadyForQuery 'I'), and whatever is left after ``drain_timeout`` is
closed with 57P01. If the trial fails, the old generation keeps serving and the
manager retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from typing import Any

from proxy import metrics, upstream
from proxy.backoff import Backoff
from proxy.config import ProxyConfig
from proxy.credentials import CredentialProvider, Credentials
from proxy.errors import UpstreamAuthError, UpstreamError
from proxy.protocol.pipeline import between_transactions
from proxy.protocol.statements import StatementNames
from proxy.upstream import ServerConn

log = logging.getLogger("credsidecar.proxy")

PoolKey = tuple[str, tuple[tuple[str, str], ...]]  # database, extra startup parameters


class Pool:
    def __init__(self, manager: PoolManager, key: PoolKey) -> None:
        self.manager = manager
        self.key = key
        self.database = key[0]
        self.parameters = dict(key[1])
        self.size = manager.config.pool_size
        self.idle: list[ServerConn] = []
        self.conns: set[ServerConn] = set()
        self.opening = 0
        self.waiters: deque[asyncio.Future[ServerConn | None]] = deque()

    def _current(self) -> int:
        gen = self.manager.generation
        return sum(1 for c in self.conns if c.generation == gen)

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
            if self._current() + self.opening < self.size:
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
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def drain(self, conn: ServerConn, how: str) -> None:
        metrics.drains_total.labels(how).inc()
        log.info(
            "proxy_drained",
            extra={"db": self.database, "generation": conn.generation, "how": how},
        )
        conn.close()

    def _closed(self, conn: ServerConn) -> None:
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
            "options": sorted(k for k, _ in self.key[1]),
            "size": self.size,
            "waiting": sum(1 for w in self.waiters if not w.done()),
            "connections": conns,
        }


class PoolManager:
    def __init__(self, config: ProxyConfig, provider: CredentialProvider) -> None:
        self.config = config
        self.provider = provider
        self.pools: dict[PoolKey, Pool] = {}
        self.creds: Credentials | None = None
        self.generation = 0  # of the credentials in service (read on every release)
        # session mode: the connection is the client's own, statement names pass through
        renaming = config.pool_mode == "transaction"
        self.names = StatementNames(config.max_prepared_statements if renaming else 0)
        self._task: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self.on_drain_timeout: Any = None  # callable(conn) set by the server: tell the client
        self._rng = random.Random()

    def pool(self, key: PoolKey) -> Pool:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(self, key)
        return pool

    async def start(self) -> None:
        self._serve(self.provider.current())
        self._task = asyncio.create_task(self._follow(), name="proxy-generations")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for timer in self._timers:
            timer.cancel()
        for pool in self.pools.values():
            pool.close_all()

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
            pool.parameters,
            self.names,
            self.config.message_buffer,
        )

    async def _follow(self) -> None:
        while True:
            new = await self.provider.changed(self.generation)
            await self._try_switch(new)

    async def _try_switch(self, new: Credentials) -> None:
        backoff = Backoff(0.5, 10.0, self._rng)
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
            try:
                conn = await self._connect(new, pool)
            except UpstreamError as exc:
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
