"""Pure lease scheduling: when to renew, when to replace, how long to back off.

No I/O, no asyncio, no clock: callers pass ``now`` and a ``random.Random``, and a
thin driver (the sources, the token keeper) does the sleeping. That keeps every
decision reproducible in tests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.backoff import MIN_DELAY
from proxy.backoff import Backoff as Backoff  # the shared one, re-exported for the agent

JITTER = 0.1  # +-10 % of the lease duration around the renewal point
MAX_WAIT = 3600.0  # re-evaluate at least hourly, even for a lease that never expires


def renew_delay(lease_duration: float, rng: random.Random, fraction: float = 2 / 3) -> float:
    """Seconds after an issue or renewal at which to renew: ``fraction`` of it, jittered.

    Jitter spreads the renewals of many sidecars that started together; the result
    always stays inside the lease so there is time left to retry.
    """
    if lease_duration <= 0:
        return 0.0
    hi = min(fraction + JITTER, 0.95)
    lo = min(max(fraction - JITTER, 0.05), hi)
    return rng.uniform(lo, hi) * lease_duration


def replace_lead(full_duration: float, fraction: float = 2 / 3) -> float:
    """How long before the old credential expires its replacement must be obtained.

    The same share of a full lease that renewal leaves spare, so the new credential
    is rendered and the application notified well before the old one dies; for
    short leases at least half the lease (up to 10 s), which leaves room for the
    notification's quiescence window and the application's reconnect.
    """
    duration = max(0.0, full_duration)
    return max((1 - fraction) * duration, min(duration / 2, 10.0))


def readiness_margin(lease_duration: float) -> float:
    """How long before expiry ``/readyz`` turns not-ready (a tenth of the lease, <= 5 min).

    Smaller than :func:`replace_lead`, so a normal replacement never flips readiness.
    """
    return min(max(lease_duration, 0.0) * 0.1, 300.0)


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class LeaseState:
    """What the scheduler knows about one lease (wall-clock epoch seconds)."""

    expires_at: float  # effective expiry: lease TTL, capped by any known hard limit
    renew_at: float  # when the next renewal is due
    full_duration: float  # the duration a fresh credential gets (the role's TTL)
    capped: bool  # cannot be extended to a full duration any more: replace it
    fraction: float = 2 / 3

    @property
    def replace_at(self) -> float:
        return self.expires_at - replace_lead(self.full_duration, self.fraction)


@dataclass(frozen=True)
class Renew:
    pass


@dataclass(frozen=True)
class Replace:
    reason: str


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Revoke:
    lease_ids: tuple[str, ...]


Decision = Renew | Replace | Wait


def lease_state(
    *,
    now: float,
    lease_duration: float,
    requested: float,
    renewable: bool,
    rng: random.Random,
    hard_expiry: float | None = None,
    fraction: float = 2 / 3,
) -> LeaseState:
    """The state after an issue or a renewal that returned ``lease_duration``.

    ``requested`` is the full duration asked for; getting less means Vault capped the
    lease at its max TTL. ``hard_expiry`` is a limit Vault does not report on the
    lease: the expiry of the token that created it (Vault revokes a token's leases
    with the token).
    """
    if lease_duration <= 0:  # a credential without expiry: nothing to renew or replace
        return LeaseState(math.inf, math.inf, 0.0, capped=False, fraction=fraction)
    expires_at = now + lease_duration
    capped = not renewable or lease_duration < requested
    if hard_expiry is not None and hard_expiry < now + requested:
        capped = True
        expires_at = min(expires_at, hard_expiry)
    return LeaseState(
        expires_at=expires_at,
        renew_at=now + renew_delay(lease_duration, rng, fraction),
        full_duration=requested,
        capped=capped,
        fraction=fraction,
    )


def decide(state: LeaseState, now: float) -> Decision:
    """Renew, replace (make-before-break) or wait, for a lease in ``state`` at ``now``."""
    if state.capped:
        at = state.replace_at
        return Replace("max_ttl") if now >= at else Wait(min(max(at - now, MIN_DELAY), MAX_WAIT))
    if now >= state.renew_at:
        return Renew()
    return Wait(min(max(state.renew_at - now, MIN_DELAY), MAX_WAIT))


def plan_lease(
    state: LeaseState, retired: Mapping[str, float], delivered: bool, now: float
) -> Renew | Replace | Revoke | Wait:
    """:func:`decide`, plus the revocation of leases this one replaced.

    ``retired`` maps replaced lease ids to the earliest time they may be revoked.
    ``delivered`` says every consumer has the current credential (rendered everywhere,
    the application told): until then nothing it superseded is revoked, however late,
    because a destination may still hold it.
    """
    if delivered:
        due = tuple(sorted(lease for lease, when in retired.items() if when <= now))
        if due:
            return Revoke(due)
    decision = decide(state, now)
    if isinstance(decision, Wait) and delivered and retired:
        soonest = max(min(retired.values()) - now, MIN_DELAY)
        return Wait(min(decision.seconds, soonest))
    return decision


def with_hard_expiry(state: LeaseState, hard_expiry: float | None) -> LeaseState:
    """``state`` once a hard limit became known later (the issuing token was superseded)."""
    if hard_expiry is None or hard_expiry >= state.renew_at + state.full_duration:
        return state
    return LeaseState(
        expires_at=min(state.expires_at, hard_expiry),
        renew_at=state.renew_at,
        full_duration=state.full_duration,
        capped=True,
        fraction=state.fraction,
    )


# --------------------------------------------------------------------------- the agent's token


@dataclass(frozen=True)
class Relogin:
    pass


@dataclass(frozen=True)
class TokenState:
    """What the token keeper knows about the agent's own token."""

    renew_at: float | None  # None: the token never expires (a root token)
    renewable: bool
    capped: bool  # a renewal was cut short at the max TTL: only a new login extends it


def plan_token(state: TokenState | None, now: float) -> Wait | Renew | Relogin:
    """Renew, log in again or wait; ``state`` None means there is no usable token."""
    if state is None or state.capped:
        return Relogin()
    if state.renew_at is None:
        return Wait(MAX_WAIT)
    if now < state.renew_at:
        return Wait(min(max(state.renew_at - now, MIN_DELAY), MAX_WAIT))
    return Renew() if state.renewable else Relogin()
