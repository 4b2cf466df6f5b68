"""The pure scheduling rules of agent.leases: renew points, backoff, renew vs replace."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.leases import (
    MAX_WAIT,
    Backoff,
    LeaseState,
    Relogin,
    Renew,
    Replace,
    Revoke,
    TokenState,
    Wait,
    decide,
    lease_state,
    plan_lease,
    plan_token,
    readiness_margin,
    renew_delay,
    replace_lead,
    with_hard_expiry,
)

durations = st.floats(min_value=1.0, max_value=86400.0 * 30)
fractions = st.floats(min_value=0.1, max_value=0.9)
seeds = st.integers(min_value=0, max_value=2**32)


@given(durations, fractions, seeds)
def test_renew_delay_is_jittered_around_the_fraction_and_inside_the_lease(
    duration: float, fraction: float, seed: int
) -> None:
    delay = renew_delay(duration, random.Random(seed), fraction)
    assert (fraction - 0.1) * duration - 1e-6 <= delay <= (fraction + 0.1) * duration + 1e-6
    assert 0 < delay < duration


def test_renew_delay_spreads_renewals_of_sidecars_started_together() -> None:
    rng = random.Random(7)
    delays = [renew_delay(6.0, rng) for _ in range(200)]
    assert max(delays) - min(delays) > 0.6  # jitter actually spreads them
    assert 3.4 < sum(delays) / len(delays) < 4.6  # around 2/3 of 6 s


def test_renew_delay_of_a_zero_lease_is_now() -> None:
    assert renew_delay(0, random.Random(1)) == 0


@given(durations)
def test_readiness_turns_before_the_replacement_would_be_late(duration: float) -> None:
    margin = readiness_margin(duration)
    assert 0 < margin < replace_lead(duration)
    assert margin <= 300


@given(st.floats(0.01, 5), st.floats(0.1, 60), seeds)
def test_backoff_grows_within_bounds(initial: float, maximum: float, seed: int) -> None:
    b = Backoff(initial, maximum, random.Random(seed))
    delays = [b.next() for _ in range(30)]
    assert all(min(initial, maximum) * 0.999 <= d <= max(maximum, initial) * 1.001 for d in delays)
    assert b.attempts == 30


def test_backoff_reaches_its_cap_and_resets() -> None:
    b = Backoff(0.1, 5.0, random.Random(3))
    delays = [b.next() for _ in range(40)]
    assert delays[0] < 0.31
    assert max(delays) > 2.5  # grew towards the cap
    b.reset()
    assert b.attempts == 0
    assert b.next() < 0.31


@given(st.floats(0.05, 2), st.floats(1, 60), st.floats(0.01, 100), seeds)
def test_backoff_leaves_room_for_several_attempts_before_expiry(
    initial: float, maximum: float, remaining: float, seed: int
) -> None:
    b = Backoff(initial, maximum, random.Random(seed))
    for _ in range(10):
        assert b.next(remaining) <= max(remaining / 3, 0.05) + 1e-9


def test_backoff_ignores_expiry_once_expired() -> None:
    b = Backoff(1.0, 1.0, random.Random(0))
    assert b.next(-5) == pytest.approx(1.0)


def state(**kw: float | bool) -> LeaseState:
    base: dict[str, float | bool] = {
        "expires_at": 106.0,
        "renew_at": 104.0,
        "full_duration": 6.0,
        "capped": False,
    }
    base.update(kw)
    return LeaseState(**base)  # type: ignore[arg-type]


def test_decide_waits_then_renews() -> None:
    assert decide(state(), 100.0) == Wait(4.0)
    assert decide(state(), 104.0) == Renew()
    assert decide(state(), 105.5) == Renew()  # late (after an outage): still renew


def test_decide_replaces_a_capped_short_lease_half_a_lease_before_expiry() -> None:
    capped = state(capped=True, expires_at=120.0)  # 6 s lease: lead 3 s
    assert decide(capped, 110.0) == Wait(pytest.approx(7.0))
    assert decide(capped, 117.0) == Replace("max_ttl")
    assert decide(capped, 130.0) == Replace("max_ttl")  # lost: replace at once


def test_decide_replaces_a_capped_long_lease_a_third_of_a_lease_before_expiry() -> None:
    capped = state(capped=True, expires_at=10_000.0, full_duration=3600.0)
    assert decide(capped, 8_000.0) == Wait(pytest.approx(800.0))
    assert decide(capped, 8_800.0) == Replace("max_ttl")


@given(
    now=st.floats(0, 1e9),
    duration=st.integers(1, 3600),
    requested=st.integers(1, 3600),
    renewable=st.booleans(),
    seed=seeds,
)
def test_lease_state_is_capped_exactly_when_vault_gave_less_than_asked(
    now: float, duration: int, requested: int, renewable: bool, seed: int
) -> None:
    s = lease_state(
        now=now,
        lease_duration=duration,
        requested=requested,
        renewable=renewable,
        rng=random.Random(seed),
    )
    assert s.capped == (not renewable or duration < requested)
    assert s.expires_at == now + duration
    assert now < s.renew_at < s.expires_at


def test_never_replaced_while_it_can_be_extended() -> None:
    # walk a 6 s / max 20 s lease through its life: renewals until the cap, one replace
    rng = random.Random(11)
    now, issued = 0.0, 0.0
    s = lease_state(now=now, lease_duration=6, requested=6, renewable=True, rng=rng)
    actions: list[str] = []
    while True:
        d = decide(s, now)
        if isinstance(d, Wait):
            now += d.seconds
            continue
        if isinstance(d, Replace):
            actions.append("replace")
            break
        actions.append("renew")
        granted = min(6.0, 20.0 - (now - issued))
        s = lease_state(now=now, lease_duration=int(granted), requested=6, renewable=True, rng=rng)
    assert actions[-1] == "replace"
    assert actions.count("renew") >= 3
    assert now < 20.0 - 1.0  # replaced with time to render before the max TTL
    assert now <= s.expires_at - replace_lead(6)


def test_a_dying_token_caps_its_leases() -> None:
    s = lease_state(
        now=0, lease_duration=6, requested=6, renewable=True, rng=random.Random(1), hard_expiry=4
    )
    assert s.capped and s.expires_at == 4
    free = lease_state(now=0, lease_duration=6, requested=6, renewable=True, rng=random.Random(1))
    assert with_hard_expiry(free, None) is free
    assert with_hard_expiry(free, 1e9) is free
    late = with_hard_expiry(free, 7.0)
    assert late.capped and late.expires_at == 6
    soon = with_hard_expiry(free, 5.0)
    assert soon.capped and soon.expires_at == 5
    assert isinstance(decide(soon, 3.1), Replace)


def test_a_lease_without_expiry_is_left_alone_but_looked_at_hourly() -> None:
    s = lease_state(now=0, lease_duration=0, requested=0, renewable=False, rng=random.Random(1))
    assert not s.capped
    assert decide(s, 1e6) == Wait(3600.0)


# --------------------------------------------------------------------------- revocation


def test_a_replaced_lease_is_revoked_only_once_its_successor_was_delivered() -> None:
    state = LeaseState(expires_at=1000.0, renew_at=500.0, full_duration=600.0, capped=False)
    retired = {"db/creds/app/old": 100.0, "db/creds/app/older": 50.0}
    # long past the grace, but a destination may still hold the old credential
    assert plan_lease(state, retired, delivered=False, now=400.0) == Wait(100.0)
    assert plan_lease(state, retired, delivered=True, now=400.0) == Revoke(
        ("db/creds/app/old", "db/creds/app/older")
    )
    # delivered, grace not over: wake for the grace or the renewal, whichever comes first
    assert plan_lease(state, {"db/creds/app/old": 450.0}, True, 400.0) == Wait(50.0)
    assert plan_lease(state, {"db/creds/app/old": 900.0}, True, 400.0) == Wait(100.0)
    # nothing retired: the lease decision alone
    assert plan_lease(state, {}, True, 600.0) == Renew()


# --------------------------------------------------------------------------- the agent's token


def test_token_plan_renews_when_due_and_logs_in_when_it_cannot() -> None:
    assert plan_token(None, 0.0) == Relogin()  # no usable token (none yet, or refused)
    renewable = TokenState(renew_at=100.0, renewable=True, capped=False)
    assert plan_token(renewable, 40.0) == Wait(60.0)
    assert plan_token(renewable, 100.0) == Renew()
    assert plan_token(TokenState(100.0, renewable=False, capped=False), 100.0) == Relogin()
    # cut short at its max TTL: a new login now, while the old token's leases have time
    assert plan_token(TokenState(100.0, renewable=True, capped=True), 40.0) == Relogin()
    # a token that never expires (root): only a refused request wakes the keeper
    assert plan_token(TokenState(None, renewable=False, capped=False), 40.0) == Wait(MAX_WAIT)
