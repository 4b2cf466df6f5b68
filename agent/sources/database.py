"""Dynamic database credentials (``database/creds/<role>``): one lease, kept alive.

The lease is renewed at about two thirds of its TTL (with jitter). A failed
renewal is retried with backoff while the lease is valid; a transient error never
costs a new credential. Only when the lease cannot be extended any more (its max
TTL, or the death of the token that created it) is a new one obtained, before the
old one expires (make-before-break); the old lease is revoked ``revoke_grace``
later, through the ledger so that a restart still revokes it. On start a lease
recorded in the ledger is adopted (looked up and renewed) instead of issuing one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from typing import Any

from agent import metrics
from agent.config import SecretConfig
from agent.errors import ConfigError, VaultAuthError, VaultError, VaultNotFound, VaultUnavailable
from agent.leases import (
    Backoff,
    LeaseState,
    Renew,
    Replace,
    Wait,
    decide,
    lease_state,
    with_hard_expiry,
)
from agent.ledger import Entry
from agent.logs import event
from agent.secret import SecretValue
from agent.sources.base import Source, SourceContext
from agent.vault.client import VaultClient


class DatabaseSource(Source):
    def __init__(self, config: SecretConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        if context.vault is None:
            raise ConfigError([f"secrets.{config.name}: kind database needs vault"])
        self.vault: VaultClient = context.vault
        self.rng = random.Random()
        self.state: LeaseState | None = None
        # which token created the lease: its death revokes the lease. An adopted
        # lease came from a previous process's token, known only by its expiry.
        self._generation: int | None = None
        self._adopted_token_expiry: float | None = None
        self._retired_here: dict[str, float] = {}  # without a ledger
        self._unsubscribe = self.vault.on_token_change(self.wake)

    # ------------------------------------------------------------------ helpers

    @property
    def _prefix(self) -> str:
        return self.config.path.rstrip("/") + "/"

    def _hard_expiry(self) -> float | None:
        if self._generation is None:
            return self._adopted_token_expiry
        return self.vault.token_deadline(self._generation)

    def _token_expiry_to_record(self) -> float | None:
        if self._generation is None:
            return self._adopted_token_expiry
        if self._generation == self.vault.token_generation:
            return self.vault.token_expires_at
        return self.vault.token_deadline(self._generation)

    def _record(self, value: SecretValue) -> None:
        if self.context.ledger is not None:
            self.context.ledger.save(
                value,
                token_expires_at=self._token_expiry_to_record(),
                token_accessor=self.vault.token_accessor if self._generation is not None else None,
            )

    def _new_state(self, response: dict[str, Any], requested: float) -> LeaseState:
        return lease_state(
            now=time.time(),
            lease_duration=float(response.get("lease_duration") or 0),
            requested=requested,
            renewable=bool(response.get("renewable")),
            rng=self.rng,
            hard_expiry=self._hard_expiry(),
            fraction=self.config.renew_fraction,
        )

    # ------------------------------------------------------------------ obtain

    async def start(self) -> SecretValue:
        entry = self.context.ledger.load_entry(self.name) if self.context.ledger else None
        if entry is not None:
            adopted = await self._adopt(entry)
            if adopted is not None:
                return adopted
        return await self._issue()

    async def _adopt(self, entry: Entry) -> SecretValue | None:
        recorded = entry.value
        now = time.time()
        expired = recorded.expires_at is not None and recorded.expires_at <= now
        if not recorded.lease_id or expired:
            event("adopt_skipped", secret=self.name, version=recorded.version, reason="expired")
            self._forget()
            return None
        if entry.token_accessor is not None and entry.token_accessor == self.vault.token_accessor:
            self._generation = self.vault.token_generation  # our own token: we renew it
        else:
            self._generation, self._adopted_token_expiry = None, entry.token_expires_at
        requested = recorded.lease_duration or (recorded.expires_at or now) - now
        try:
            with contextlib.suppress(VaultAuthError):  # a policy may allow renew, not lookup
                await self.vault.lookup_lease(recorded.lease_id)
            response = await self.vault.renew_lease(recorded.lease_id, requested)
        except VaultNotFound:
            event("adopt_skipped", secret=self.name, version=recorded.version, reason="revoked")
            self._forget()
            return None
        except VaultUnavailable as exc:
            # Vault is down but the recorded credential still works: use it, renew later
            event("vault_unavailable", logging.WARNING, operation="adopt", error=str(exc))
            self.state = LeaseState(
                expires_at=recorded.expires_at or now,
                renew_at=now,
                full_duration=requested,
                capped=False,
                fraction=self.config.renew_fraction,
            )
            self.current = recorded
            event("adopted", secret=self.name, version=recorded.version, ttl=None)
            return recorded
        self.state = self._new_state(response, requested)
        value = dataclasses.replace(
            recorded,
            expires_at=_finite(self.state.expires_at),
            renewable=bool(response.get("renewable")),
            lease_duration=requested,
        )
        self.current = value
        self._record(value)
        event(
            "adopted",
            secret=self.name,
            version=value.version,
            ttl=float(response.get("lease_duration") or 0),
        )
        return value

    def _forget(self) -> None:
        if self.context.ledger is not None:
            self.context.ledger.forget(self.name)

    async def _issue(self) -> SecretValue:
        generation = self.vault.token_generation
        response = await self.vault.read(self.config.path, "issue")
        lease_id = response.get("lease_id")
        data = response.get("data")
        if not lease_id or not isinstance(data, dict):
            raise VaultError(f"issue {self.config.path}: the answer has no lease")
        self._generation, self._adopted_token_expiry = generation, None
        duration = float(response.get("lease_duration") or 0)
        self.state = self._new_state(response, duration)
        value = SecretValue(
            name=self.name,
            data=dict(data),
            version=str(lease_id),
            issued_at=time.time(),
            expires_at=_finite(self.state.expires_at),
            lease_id=str(lease_id),
            lease_duration=duration,
            renewable=bool(response.get("renewable")),
        )
        self.current = value
        self._record(value)
        event("issued", secret=self.name, version=value.version, ttl=duration)
        return value

    # ------------------------------------------------------------------ keep fresh

    async def run(self) -> None:
        cfg = self.vault.config
        backoff = Backoff(cfg.retry_initial, cfg.retry_max, self.rng)
        revoke_backoff = Backoff(cfg.retry_initial, cfg.retry_max, self.rng)
        while True:
            assert self.state is not None and self.current is not None
            self.state = with_hard_expiry(self.state, self._hard_expiry())
            now = time.time()
            decision = decide(self.state, now)
            if isinstance(decision, Wait):
                due = self._next_revocation()
                seconds = decision.seconds if due is None else min(decision.seconds, due - now)
                woke = await self.sleep(seconds)
                await self._revoke_due(revoke_backoff)
                if woke:  # POST /refresh or a new token: renew now, unless it must be replaced
                    self.state = dataclasses.replace(self.state, renew_at=time.time())
                continue
            try:
                if isinstance(decision, Renew):
                    await self._renew()
                else:
                    await self._replace(decision)
                backoff.reset()
            except VaultNotFound as exc:
                if isinstance(decision, Replace):  # e.g. the role is gone: keep trying
                    await self._failed(decision, backoff, exc)
                    continue
                # the lease is gone (revoked, expired): nothing left to keep, replace it
                event("lease_lost", logging.WARNING, secret=self.name, error=str(exc))
                self.state = dataclasses.replace(self.state, capped=True, expires_at=time.time())
            except VaultError as exc:
                await self._failed(decision, backoff, exc)

    async def _failed(self, decision: Renew | Replace, backoff: Backoff, exc: VaultError) -> None:
        assert self.current is not None
        delay = backoff.next(self.current.remaining())
        if isinstance(decision, Renew):
            metrics.renewals_total.labels(secret=self.name, result="error").inc()
            event(
                "renew_failed",
                logging.WARNING,
                secret=self.name,
                version=self.current.version,
                error=str(exc),
                retry_in=round(delay, 3),
            )
        else:
            event(
                "vault_unavailable",
                logging.WARNING,
                secret=self.name,
                operation="issue",
                error=str(exc),
                retry_in=round(delay, 3),
            )
        await self.sleep(delay)

    async def _renew(self) -> None:
        assert self.state is not None and self.current is not None
        lease_id = self.current.lease_id
        assert lease_id is not None
        requested = self.state.full_duration
        response = await self.vault.renew_lease(lease_id, requested)
        self.state = self._new_state(response, requested)
        value = dataclasses.replace(
            self.current,
            expires_at=_finite(self.state.expires_at),
            renewable=bool(response.get("renewable")),
        )
        self.current = value
        self._record(value)
        metrics.renewals_total.labels(secret=self.name, result="ok").inc()
        event(
            "renewed",
            secret=self.name,
            version=value.version,
            ttl=float(response.get("lease_duration") or 0),
            capped=self.state.capped,
        )
        await self.context.publish(value)

    async def _replace(self, decision: Replace) -> None:
        old = self.current
        assert old is not None
        new = await self._issue()
        if old.lease_id and old.lease_id != new.lease_id:
            revoke_at = time.time() + self.config.revoke_grace
            if self.context.ledger is not None:
                self.context.ledger.add_retired(old.lease_id, revoke_at)
            else:
                self._retired_here[old.lease_id] = revoke_at
        metrics.replacements_total.labels(secret=self.name).inc()
        event(
            "replaced",
            secret=self.name,
            old_version=old.version,
            new_version=new.version,
            reason=decision.reason,
        )
        await self.context.publish(new)

    # ------------------------------------------------------------------ revocation

    def _retired(self) -> dict[str, float]:
        if self.context.ledger is None:
            return dict(self._retired_here)
        items = self.context.ledger.retired()
        return {k: v for k, v in items.items() if k.startswith(self._prefix)}

    def _drop_retired(self, lease_id: str) -> None:
        self._retired_here.pop(lease_id, None)
        if self.context.ledger is not None:
            self.context.ledger.remove_retired(lease_id)

    def _postpone_retired(self, lease_id: str, when: float) -> None:
        if self.context.ledger is not None:
            self.context.ledger.add_retired(lease_id, when)
        else:
            self._retired_here[lease_id] = when

    def _next_revocation(self) -> float | None:
        return min(self._retired().values(), default=None)

    async def _revoke_due(self, backoff: Backoff) -> None:
        """Revoke the replaced leases whose grace has passed; postpone those that fail."""
        for lease_id, when in self._retired().items():
            if when > time.time():
                continue
            if await self._revoke(lease_id):
                backoff.reset()
            else:
                self._postpone_retired(lease_id, time.time() + backoff.next())

    async def _revoke(self, lease_id: str) -> bool:
        try:
            await self.vault.revoke_lease(lease_id)
        except VaultNotFound:
            pass  # already gone: nothing to do
        except VaultError as exc:
            event("revoke_failed", logging.WARNING, secret=self.name, error=str(exc))
            return False
        self._drop_retired(lease_id)
        event("revoked", secret=self.name, version=lease_id)
        return True

    async def close(self, revoke: bool) -> None:
        self._unsubscribe()
        if not revoke:
            return  # the ledger keeps the lease for the next start to adopt
        for lease_id in self._retired():
            await self._revoke(lease_id)
        current = self.current.lease_id if self.current else None
        if current and await self._revoke(current) and self.context.ledger is not None:
            self.context.ledger.forget(self.name)


def _finite(expires_at: float) -> float | None:
    return expires_at if math.isfinite(expires_at) else None
