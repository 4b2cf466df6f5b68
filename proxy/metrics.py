"""Prometheus metrics of the proxy, all prefixed ``credsidecar_proxy_``.

Counters and histograms live on the module :data:`REGISTRY` (the agent merges it
into ``/metrics``); the two that every login updates are kept by :mod:`proxy.counts`
and exposed by :class:`CountsCollector`. Gauges of live state (clients, server
connections per state and generation) are computed from the running server by
:class:`StateCollector`, which :class:`proxy.server.ProxyServer` registers while it
runs. Labels carry states and reasons, never user names or secrets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from proxy.counts import Buckets, LabelledCount

REGISTRY = CollectorRegistry(auto_describe=True)

# counted on every login: kept by proxy.counts, exposed by CountsCollector below
CLIENT_RESULTS = ("ok", "auth_failed", "refused", "protocol_error")
WAIT_BOUNDS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
clients_total = LabelledCount(CLIENT_RESULTS)
wait_seconds = Buckets(WAIT_BOUNDS)

server_connects_total = Counter(
    "credsidecar_proxy_server_connects_total",
    "Upstream connections opened, by result (ok, auth_failed, error, timeout).",
    ["result"],
    registry=REGISTRY,
)
auth_failures_total = Counter(
    "credsidecar_proxy_auth_failures_total",
    "Authentication failures, by side (client, upstream).",
    ["side"],
    registry=REGISTRY,
)
drains_total = Counter(
    "credsidecar_proxy_drained_connections_total",
    "Old-generation server connections closed, by how (idle, after_transaction, timeout).",
    ["how"],
    registry=REGISTRY,
)
generation_switches_total = Counter(
    "credsidecar_proxy_generation_switches_total",
    "New credential generations put into service.",
    registry=REGISTRY,
)
generation_rejections_total = Counter(
    "credsidecar_proxy_generation_rejections_total",
    "New credentials that failed the trial login; the old generation kept serving.",
    registry=REGISTRY,
)
cancel_requests_total = Counter(
    "credsidecar_proxy_cancel_requests_total",
    "CancelRequests received, by result (forwarded, unknown, idle), and sent for clients"
    " that left with a query running (client_left).",
    ["result"],
    registry=REGISTRY,
)

server_reset_failures_total = Counter(
    "credsidecar_proxy_server_reset_failures_total",
    "Server connections closed instead of pooled because server_reset_query failed.",
    registry=REGISTRY,
)
overdue_answers_total = Counter(
    "credsidecar_proxy_overdue_answers_total",
    "Clients that waited longer than hang_warning_timeout for an answer their server connection"
    " owed them (logged as proxy_answer_overdue).",
    registry=REGISTRY,
)
idle_transactions_total = Counter(
    "credsidecar_proxy_idle_transactions_total",
    "Server connections held in an open transaction or segment with no request running,"
    " by outcome (warned: past hang_warning_timeout; closed: past idle_transaction_timeout;"
    " released: handed back so, closed instead of pooled).",
    ["outcome"],
    registry=REGISTRY,
)

server_retired_total = Counter(
    "credsidecar_proxy_server_retired_total",
    "Server connections closed by the pool, by why (idle_timeout, lifetime, credential_expired).",
    ["why"],
    registry=REGISTRY,
)


class CountsCollector(Collector):
    """:data:`clients_total` and :data:`wait_seconds` as the Counter and Histogram
    they stand for."""

    def __init__(self, clients: LabelledCount, wait: Buckets) -> None:
        self._clients = clients
        self._wait = wait

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        clients = CounterMetricFamily(
            "credsidecar_proxy_clients",
            "Client connections accepted, by result (ok, auth_failed, refused, protocol_error).",
            labels=["result"],
        )
        for result, count in self._clients.counts.items():
            clients.add_metric([result], count)
        bounds = [repr(float(b)) for b in self._wait.bounds] + ["+Inf"]  # as Histogram's
        wait = HistogramMetricFamily(
            "credsidecar_proxy_wait_seconds",
            "Time clients waited for a server connection.",
            buckets=list(zip(bounds, self._wait.cumulative(), strict=True)),
            sum_value=self._wait.total,
        )
        yield clients
        yield wait


REGISTRY.register(CountsCollector(clients_total, wait_seconds))


class StateCollector(Collector):
    """Gauges read from a live ``status()`` snapshot at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self._status()
        clients = GaugeMetricFamily(
            "credsidecar_proxy_client_connections", "Connected clients, by state.", labels=["state"]
        )
        for state, count in status["clients"].items():
            clients.add_metric([state], count)
        servers = GaugeMetricFamily(
            "credsidecar_proxy_server_connections",
            "Upstream connections, by state (idle, active, draining) and generation"
            " (current, old).",
            labels=["state", "generation"],
        )
        counts: dict[tuple[str, str], int] = {}
        for pool in status["pools"]:
            for conn in pool["connections"]:
                key = (conn["state"], "current" if conn["current"] else "old")
                counts[key] = counts.get(key, 0) + 1
        for (state, gen), count in sorted(counts.items()):
            servers.add_metric([state, gen], count)
        generation = GaugeMetricFamily(
            "credsidecar_proxy_credential_generation", "Credential generation in service."
        )
        generation.add_metric([], status["generation"] or 0)
        yield clients
        yield servers
        yield generation
