"""Hangs are not silent: a periodic look at every client session (issue 10, finding 10).

Two conditions are watched, each judged once per tick from counters the data path bumps
(``reads`` of the session and of its server connection: no clock read or timer per
message):

* **an answer owed**: the client's server connection has requests outstanding and
  neither side has sent a byte for ``hang_warning_timeout``: logged
  (``proxy_answer_overdue``) and counted, once per stall. A long query with no output
  looks the same; the log line says how long, never what.
* **an idle transaction**: a server connection in an open transaction (or an
  extended-protocol segment not yet ended by Sync) with nothing outstanding and a silent
  client: logged (``proxy_idle_in_transaction``) and counted at ``hang_warning_timeout``;
  after ``idle_transaction_timeout`` (PgBouncer's name; 0, its default, never) the client
  gets ``25P03`` as from PostgreSQL's own ``idle_in_transaction_session_timeout`` and the
  server connection is closed, never pooled.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy import metrics
from proxy.protocol.pipeline import CLOSED

if TYPE_CHECKING:
    from proxy.server import ProxyServer
    from proxy.session import ClientSession

log = logging.getLogger("credsidecar.proxy")

OWED, IDLE_IN_TRANSACTION = "owed", "idle_in_transaction"
MIN_TICK, MAX_TICK = 0.05, 1.0


@dataclass
class Watch:
    """One session's current stall: what it is, the counters when it began, since when."""

    kind: str
    marker: int
    since: float
    warned: bool = False


def tick_interval(hang_warning: float, idle_timeout: float) -> float | None:
    """A quarter of the smallest threshold in use (bounded), or None when both are off."""
    used = [t for t in (hang_warning, idle_timeout) if t > 0]
    if not used:
        return None
    return min(MAX_TICK, max(MIN_TICK, min(used) / 4))


def condition(session: ClientSession) -> tuple[str, int] | None:
    """What ``session`` is waiting on now, and a marker that moves with any traffic."""
    conn = session.conn
    if conn is None or conn.closed:
        return None
    pipeline = conn.pipeline
    marker = session.reads + conn.reads  # both only grow: equal means neither moved
    if pipeline.queue:
        return OWED, marker
    if conn.proto.transaction_status != b"I" or pipeline.segment != CLOSED:
        return IDLE_IN_TRANSACTION, marker
    return None


class Watchdog:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        config = server.config
        self.hang_warning = config.hang_warning_timeout
        self.idle_timeout = config.idle_transaction_timeout
        self.interval = tick_interval(self.hang_warning, self.idle_timeout)
        self._watches: dict[ClientSession, Watch] = {}

    async def run(self) -> None:
        if self.interval is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick(loop.time())
            except Exception:  # a bug here must not end the watching
                log.exception("proxy_watchdog_failed")

    def tick(self, now: float) -> None:
        watches: dict[ClientSession, Watch] = {}
        for session in list(self.server.sessions):  # ending one changes the set
            seen = condition(session)
            if seen is None:
                continue
            kind, marker = seen
            watch = self._watches.get(session)
            if watch is None or watch.kind != kind or watch.marker != marker:
                watch = Watch(kind, marker, now)
            elif self._judge(session, watch, now - watch.since):
                continue  # closed
            watches[session] = watch
        self._watches = watches

    def _judge(self, session: ClientSession, watch: Watch, waited: float) -> bool:
        """Log, count or end what has lasted ``waited`` seconds; True if it was ended."""
        conn = session.conn
        assert conn is not None
        if watch.kind == IDLE_IN_TRANSACTION and 0 < self.idle_timeout <= waited:
            metrics.idle_transactions_total.labels("closed").inc()
            log.warning("proxy_idle_transaction_timeout", extra=self._facts(session, waited))
            session.fatal("25P03", "terminating connection due to idle-in-transaction timeout")
            return True
        if watch.warned or not 0 < self.hang_warning <= waited:
            return False
        watch.warned = True
        facts = self._facts(session, waited)
        if watch.kind == OWED:
            metrics.overdue_answers_total.inc()
            log.warning("proxy_answer_overdue", extra=facts)
        else:
            metrics.idle_transactions_total.labels("warned").inc()
            log.warning("proxy_idle_in_transaction", extra=facts)
        return False

    @staticmethod
    def _facts(session: ClientSession, waited: float) -> dict[str, object]:
        """What the log line tells: where and how long, never a query or a secret."""
        conn = session.conn
        assert conn is not None
        key = conn.backend_key
        return {
            "peer": session.peer,
            "db": conn.database,
            "waited_s": round(waited, 1),
            "outstanding": len(conn.pipeline.queue),
            "status": conn.proto.transaction_status.decode(),
            "backend_pid": key.process_id if key is not None else None,  # pg_stat_activity
            "client_paused": session.client_paused,  # the client is not reading
        }
