"""What a rotation does next: the pure plan(record, now) and the Rotation driven by an
injected clock against a real KV v2 store, without sleeping (issue 8, finding 2)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from rotatehelpers import config, kv_record, rotation

from agent.rotate.manager import Busy, Idle, Refuse, Retire, Rotate, Timing, next_delay, plan
from agent.rotate.store import Claim, Record

NOW = 10_000.0
OWNER = "me"
TIMING = Timing(due_at=NOW + 3600, poll=30.0)


def published(at: float, grace: float, **kw: Any) -> Record:
    """A record whose version 2 was published at ``at``; version 1 retires after grace."""
    return Record(version=2, rotated_at=at, retire_at=at + grace, retired=False, **kw)


def test_nothing_rotated_yet_rotates() -> None:
    assert plan(Record(), NOW, Timing(due_at=0.0, poll=30.0), OWNER, "scheduled") == Rotate()


def test_not_due_waits_for_the_earliest_of_poll_and_due() -> None:
    record = Record(version=1, rotated_at=NOW - 10, retired=True)
    assert plan(record, NOW, TIMING, OWNER, "scheduled") == Idle(30.0)
    assert plan(record, NOW, Timing(due_at=NOW + 5, poll=30.0), OWNER, "scheduled") == Idle(5.0)
    assert plan(record, NOW, TIMING, OWNER, "forced") == Rotate()


def test_inside_the_grace_a_forced_rotation_is_refused_unless_now() -> None:
    record = published(NOW - 2, grace=600)
    assert plan(record, NOW, TIMING, OWNER, "forced") == Refuse(NOW + 598)
    assert plan(record, NOW, TIMING, OWNER, "now") == Retire(early=True)
    # a due schedule waits for the grace too: the retire comes first, at its time
    due = Timing(due_at=NOW - 1, poll=30.0)
    assert plan(record, NOW, due, OWNER, "scheduled") == Idle(30.0)
    assert plan(record, NOW + 590, due, OWNER, "scheduled") == Idle(8.0)


def test_after_the_grace_the_previous_credential_is_retired_first() -> None:
    record = published(NOW - 700, grace=600)
    for mode in ("scheduled", "forced", "now"):
        assert plan(record, NOW, TIMING, OWNER, mode) == Retire(early=False)  # type: ignore[arg-type]
    # a failed retire backs off on schedule; a forced rotation retries it at once
    backing_off = Timing(due_at=NOW + 3600, poll=30.0, retire_retry_at=NOW + 4)
    assert plan(record, NOW, backing_off, OWNER, "scheduled") == Idle(4.0)
    assert plan(record, NOW, backing_off, OWNER, "forced") == Retire(early=False)


def test_a_live_claim_of_another_replica_is_waited_for() -> None:
    record = Record(version=1, rotated_at=NOW - 10, retired=True, claim=Claim("other", NOW + 5))
    assert plan(record, NOW, TIMING, OWNER, "forced") == Busy()
    assert next_delay(record, NOW, TIMING, OWNER) == 1.0  # follow it closely
    assert plan(record, NOW + 6, TIMING, OWNER, "forced") == Rotate()  # expired: take over


modes = st.sampled_from(["scheduled", "forced", "now"])
times = st.floats(min_value=0, max_value=1e6)


@given(times, times, st.floats(0, 1e5), st.booleans(), modes, times, times)
def test_grace_is_a_promise(
    rotated_at: float,
    now: float,
    grace: float,
    retired: bool,
    mode: Any,
    due_at: float,
    retire_retry_at: float,
) -> None:
    record = Record(version=3, rotated_at=rotated_at, retire_at=rotated_at + grace, retired=retired)
    timing = Timing(due_at=due_at, poll=30.0, retire_retry_at=retire_retry_at)
    action = plan(record, now, timing, OWNER, mode)
    in_grace = not retired and now < rotated_at + grace
    if isinstance(action, Retire):
        assert not retired
        assert action.early == in_grace
        assert not action.early or mode == "now"  # early only when asked for explicitly
    if isinstance(action, Rotate):
        assert retired  # a rotation never retires a credential that is still valid
    if isinstance(action, Refuse):
        assert in_grace and mode == "forced" and action.not_before == rotated_at + grace
    if isinstance(action, Idle):
        assert action.seconds > 0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_rotation_on_a_clock_keeps_the_grace_without_sleeping(
    vault: Any, openbao: Any, unique: str, events: Any
) -> None:
    store = f"secret/data/rot-clock-{unique}"
    clock = Clock(1_000_000.0)
    rot, published_values = rotation(
        config("clk", "jwt-keys", store, every=3600.0, grace=600.0), vault
    )
    rot.clock = clock
    assert (await rot.rotate_now()).version == 1
    clock.now += 10
    assert (await rot.rotate_now()).version == 2  # version 1 had no predecessor in grace

    clock.now += 20
    refused = await rot.rotate_now()
    assert refused.result == "in_grace" and refused.not_before == 1_000_610.0
    assert "inside its grace until" in (refused.error or "")
    assert len(json.loads(published_values.last.data["jwks"])["keys"]) == 2  # both keys valid
    assert (await rot.step()).result == "not_due"  # the schedule waits for the grace too

    clock.now = 1_000_610.0  # the grace ends: the next pass retires version 1
    assert (await rot.step()).result == "not_due"
    assert events.named("rotation_retired", secret="clk", version=1)
    assert len(json.loads(published_values.last.data["jwks"])["keys"]) == 1
    assert kv_record(openbao, store)["retired"] is True

    clock.now = 1_000_010.0 + 3600  # version 2 is due `every` after its publication
    outcome = await rot.step()
    assert outcome.ok and outcome.version == 3
    assert not events.named("rotation_grace_overridden")
