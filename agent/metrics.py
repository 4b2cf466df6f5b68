"""Prometheus metrics of the agent, all prefixed ``credsidecar_``.

Labels carry names (secret, template path, notify target), never values.
One registry per process; tests read it through ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

secret_age_seconds = Gauge(
    "credsidecar_secret_age_seconds",
    "Seconds since the current version of the secret was issued.",
    ["secret"],
    registry=REGISTRY,
)
lease_ttl_remaining_seconds = Gauge(
    "credsidecar_lease_ttl_remaining_seconds",
    "Seconds until the current credential of the secret expires.",
    ["secret"],
    registry=REGISTRY,
)
renewals_total = Counter(
    "credsidecar_renewals_total",
    "Lease renewals attempted, by result (ok, error).",
    ["secret", "result"],
    registry=REGISTRY,
)
replacements_total = Counter(
    "credsidecar_replacements_total",
    "New versions obtained because the previous one could not be extended or changed.",
    ["secret"],
    registry=REGISTRY,
)
renders_total = Counter(
    "credsidecar_renders_total",
    "Template renders, by result (written, unchanged, error).",
    ["template", "result"],
    registry=REGISTRY,
)
notifications_total = Counter(
    "credsidecar_notifications_total",
    "Notifications sent to the application, by result (ok, error).",
    ["target", "result"],
    registry=REGISTRY,
)
vault_errors_total = Counter(
    "credsidecar_vault_errors_total",
    "Failed Vault requests, by operation and kind (unavailable, auth, other).",
    ["operation", "kind"],
    registry=REGISTRY,
)
token_renewals_total = Counter(
    "credsidecar_token_renewals_total",
    "Renewals and re-logins of the agent's own Vault token, by action and result.",
    ["action", "result"],
    registry=REGISTRY,
)
ready = Gauge(
    "credsidecar_ready",
    "1 when every secret is rendered and valid, else 0.",
    registry=REGISTRY,
)
rotations_total = Counter(
    "credsidecar_rotations_total",
    "Rotations of credentials the sidecar rotates itself, by result (ok, failed).",
    ["name", "result"],
    registry=REGISTRY,
)
rotation_age_seconds = Gauge(
    "credsidecar_rotation_age_seconds",
    "Seconds since the rotated credential's current version was published.",
    ["name"],
    registry=REGISTRY,
)
task_failures_total = Counter(
    "credsidecar_task_failures_total",
    "Unexpected failures of a part of the agent (it was restarted), by part.",
    ["task"],
    registry=REGISTRY,
)
ledger_write_failures_total = Counter(
    "credsidecar_ledger_write_failures_total",
    "Ledger writes on the state directory that failed, by entry.",
    ["entry"],
    registry=REGISTRY,
)
ledger_stale = Gauge(
    "credsidecar_ledger_stale",
    "1 while the ledger entry on the state directory is older than what the agent holds.",
    ["entry"],
    registry=REGISTRY,
)
