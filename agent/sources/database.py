"""Dynamic database credentials (``database/creds/<role>``): one lease, kept alive.

The lease is renewed at about two thirds of its TTL (with jitter). A failed
renewal is retried with backoff while the lease is valid; a transient error never
costs a new credential. Only when the lease cannot be extended any more (its max
TTL, or the death of the token that created it) is a new one obtained, before the
old one expires (make-before-break). The old lease is revoked only once the new
one was delivered (rendered into every destination and the application told, see
:meth:`Source.delivered`) and ``revoke_grace`` has passed since; through the ledger,
so that a restart still revokes it. While a render keeps failing the old lease is
left alone: a destination still holds it. On start a lease recorded in the ledger is
adopted (looked up and renewed) instead of issuing one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random

from agent import metrics
from agent.config import SecretConfig
from agent.errors import ConfigError, VaultAuthError, VaultError, VaultNotFound, VaultUnavailable
from agent.leases import (
    Backoff,
    LeaseState,
    Renew,
    Replace,
    Revoke,
    Wait,
    lease_state,
    plan_lease,
    with_hard_expiry,
)
from agent.ledger import Entry
from agent.logs import event
from agent.secret import SecretValue
from agent.sources.base import Source, SourceContext
from agent.vault.client import VaultClient
from agent.vault.responses import Renewal


class DatabaseSource(Source):
    def __init__(self, config: SecretConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        if context.vault is None:
            raise ConfigError([f"secrets.{config.name}: kind database needs vault"])
        self.vault: VaultClient = context.vault
        self.clock = context.clock
        self.rng = random.Random()
        self.state: LeaseState | None = None
        self._delivered: str | None = None  # the version every consumer has
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

    def _new_state(self, answer: Renewal, requested: float) -> LeaseState:
        return lease_state(
            now=self.clock(),
            lease_duration=answer.lease_duration,
            requested=requested,
            renewable=answer.renewable,
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
        now = self.clock()
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
            renewal = await self.vault.renew_lease(recorded.lease_id, requested)
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
        self.state = self._new_state(renewal, requested)
        value = dataclasses.replace(
            recorded,
            expires_at=_finite(self.state.expires_at),
            renewable=renewal.renewable,
            lease_duration=requested,
        )
        self.current = value
        self._record(value)
        event("adopted", secret=self.name, version=value.version, ttl=renewal.lease_duration)
        return value

    def _forget(self) -> None:
        if self.context.ledger is not None:
            self.context.ledger.forget(self.name)

    async def _issue(self) -> SecretValue:
        generation = self.vault.token_generation
        lease = await self.vault.issue_lease(self.config.path)
        self._generation, self._adopted_token_expiry = generation, None
        duration = lease.lease_duration
        self.state = self._new_state(Renewal(duration, lease.renewable), duration)
        value = SecretValue(
            name=self.name,
            data=dict(lease.data),
            version=lease.lease_id,
            issued_at=self.clock(),
            expires_at=_finite(self.state.expires_at),
            lease_id=lease.lease_id,
            lease_duration=duration,
            renewable=lease.renewable,
        )
        self.current = value
        self._record(value)
        event("issued", secret=self.name, version=value.version, ttl=duration)
        return value

    # ------------------------------------------------------------------ keep fresh

    def next_step(self) -> Renew | Replace | Revoke | Wait:
        """What to do now (:func:`agent.leases.plan_lease` at the source's clock)."""
        assert self.state is not None and self.current is not None
        self.state = with_hard_expiry(self.state, self._hard_expiry())
        delivered = self._delivered == self.current.version
        return plan_lease(self.state, self._retired(), delivered, self.clock())

    async def run(self) -> None:
        cfg = self.vault.config
        backoff = Backoff(cfg.retry_initial, cfg.retry_max, self.rng)
        revoke_backoff = Backoff(cfg.retry_initial, cfg.retry_max, self.rng)
        while True:
            step = self.next_step()
            assert self.state is not None
            if isinstance(step, Wait):
                if await self.sleep(step.seconds):
                    # POST /refresh or a new token: renew now, unless it must be replaced
                    self.state = dataclasses.replace(self.state, renew_at=self.clock())
                continue
            if isinstance(step, Revoke):
                await self._revoke_due(step.lease_ids, revoke_backoff)
                continue
            try:
                if isinstance(step, Renew):
                    await self._renew()
                else:
                    await self._replace(step)
                backoff.reset()
            except VaultNotFound as exc:
                if isinstance(step, Replace):  # e.g. the role is gone: keep trying
                    await self._failed(step, backoff, exc)
                    continue
                # the lease is gone (revoked, expired): nothing left to keep, replace it
                event("lease_lost", logging.WARNING, secret=self.name, error=str(exc))
                if self.current is not None:
                    self.context.revoked(self.name, self.current.version)
                self.state = dataclasses.replace(self.state, capped=True, expires_at=self.clock())
            except VaultError as exc:
                await self._failed(step, backoff, exc)

    def delivered(self, version: str, at: float) -> None:
        """The grace of what ``version`` replaced starts now: every consumer has it."""
        if self.current is None or version != self.current.version:
            return  # an older version reached everyone: the current one has not yet
        if self._delivered != version:
            self._delivered = version
            for lease_id, when in self._retired().items():
                if when < at + self.config.revoke_grace:
                    self._postpone_retired(lease_id, at + self.config.revoke_grace)
        self.nudge()

    async def _failed(self, decision: Renew | Replace, backoff: Backoff, exc: VaultError) -> None:
        assert self.current is not None
        delay = backoff.next(self.current.remaining(self.clock()))
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
        renewal = await self.vault.renew_lease(lease_id, requested)
        self.state = self._new_state(renewal, requested)
        value = dataclasses.replace(
            self.current,
            expires_at=_finite(self.state.expires_at),
            renewable=renewal.renewable,
        )
        self.current = value
        self._record(value)
        metrics.renewals_total.labels(secret=self.name, result="ok").inc()
        event(
            "renewed",
            secret=self.name,
            version=value.version,
            ttl=renewal.lease_duration,
            capped=self.state.capped,
        )
        await self.context.publish(value)

    async def _replace(self, decision: Replace) -> None:
        old = self.current
        assert old is not None
        new = await self._issue()
        if old.lease_id and old.lease_id != new.lease_id:
            # the earliest it may go; the grace really starts once `new` is delivered
            revoke_at = self.clock() + self.config.revoke_grace
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

    async def _revoke_due(self, lease_ids: tuple[str, ...], backoff: Backoff) -> None:
        """Revoke replaced leases whose grace has passed; postpone those that fail."""
        for lease_id in lease_ids:
            if await self._revoke(lease_id):
                backoff.reset()
            else:
                self._postpone_retired(lease_id, self.clock() + backoff.next())

    async def _revoke(self, lease_id: str) -> bool:
        try:
            await self.vault.revoke_lease(lease_id)
        except VaultNotFound:
            pass  # already gone: nothing to do
        except VaultError as exc:
            event("revoke_failed", logging.WARNING, secret=self.name, error=str(exc))
            return False
        self._drop_retired(lease_id)
        self.context.revoked(self.name, lease_id)
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
