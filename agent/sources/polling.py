"""Shared driver for sources that fetch a whole new value on a schedule.

KV v2, static database roles and PKI certificates have no lease to renew: the
source fetches again when its schedule says so (or when woken), publishes a value
that changed, and keeps the last good value through failures, backing off with
jitter and logging each failed attempt once.
"""

from __future__ import annotations

import logging
import random
from abc import abstractmethod
from typing import Any

from agent.config import SecretConfig
from agent.errors import ConfigError, SidecarError, VaultError
from agent.leases import Backoff
from agent.logs import event
from agent.secret import SecretValue
from agent.sources.base import Source, SourceContext
from agent.vault.client import VaultClient


def refresh_delay(config: SecretConfig, value: SecretValue, now: float, default: float) -> float:
    """Seconds until ``value`` is ``refresh`` (or ``default``) old: a plain polling period."""
    refresh = config.refresh if config.refresh is not None else default
    return max(0.0, refresh - (now - value.issued_at))


class PollingSource(Source):
    operation = "read"  # the Vault operation name in logs and metrics
    updated_event = "updated"
    wake_fetches = True  # False: a wake only re-checks the schedule (pki: no needless certs)
    # sources that fetch from elsewhere (a command, AWS) need no Vault; their failures are
    # SidecarErrors, logged as ``source_failed``
    uses_vault = True
    failure: type[SidecarError] = VaultError  # what a failed fetch raises (and is retried)
    failed_event = "vault_unavailable"
    retry_initial, retry_max = 0.5, 30.0  # without Vault; with it, vault.retry applies

    def __init__(self, config: SecretConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        if self.uses_vault:
            if context.vault is None:
                raise ConfigError([f"secrets.{config.name}: kind {config.kind} needs vault"])
            self.vault: VaultClient = context.vault
            self.retry_initial = self.vault.config.retry_initial
            self.retry_max = self.vault.config.retry_max
        self.rng = random.Random()

    @abstractmethod
    async def fetch(self) -> SecretValue:
        """Read the current value from Vault."""

    @abstractmethod
    def next_check(self, value: SecretValue, now: float) -> float:
        """Seconds from ``now`` until ``value`` should be fetched again."""

    def changed(self, old: SecretValue, new: SecretValue) -> bool:
        return old.version != new.version or old.data != new.data

    def describe(self, value: SecretValue) -> dict[str, Any]:
        """Non-secret fields for the log line of a new value."""
        ttl = value.remaining()
        return {"version": value.version, "ttl": None if ttl is None else round(ttl, 3)}

    async def start(self) -> SecretValue:
        value = await self.fetch()
        self.current = value
        event(self.updated_event, secret=self.name, **self.describe(value))
        return value

    async def run(self) -> None:
        backoff = Backoff(self.retry_initial, self.retry_max, self.rng)
        retry_in: float | None = None
        while True:
            if retry_in is not None:
                await self.sleep(retry_in)
            elif self.current is not None:
                delay = self.next_check(self.current, self.context.clock())
                if delay > 0 and await self.sleep(delay) and not self.wake_fetches:
                    continue  # woken: re-check the schedule only
            retry_in = await self._fetch_once(backoff)

    async def _fetch_once(self, backoff: Backoff) -> float | None:
        """Fetch and publish a changed value; on failure log and return the retry delay."""
        try:
            value = await self.fetch()
        except self.failure as exc:
            remaining = self.current.remaining() if self.current else None
            delay = backoff.next(remaining)
            event(
                self.failed_event,
                logging.WARNING,
                secret=self.name,
                operation=self.operation,
                error=str(exc),
                retry_in=round(delay, 3),
            )
            return delay
        backoff.reset()
        old = self.current
        self.current = value  # an unchanged version still brings fresher metadata (ttl)
        if old is None or self.changed(old, value):
            event(self.updated_event, secret=self.name, **self.describe(value))
            await self.context.publish(value)
        return None
