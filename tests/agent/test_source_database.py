"""Dynamic database credentials against real OpenBao and PostgreSQL: renewal, outages,
make-before-break replacement at the max TTL, revocation once delivered and after the
grace, adoption; and the source's decisions on an injected clock, without sleeping."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import pytest
from devservers import OpenBaoServer, leases_under

from agent.leases import Renew, Revoke, Wait
from agent.ledger import Ledger
from agent.sources.database import DatabaseSource


async def test_renewed_in_place_then_replaced_before_max_ttl_and_old_lease_revoked(
    openbao: OpenBaoServer,
    vault: Any,
    database_mount: Any,
    events: Any,
    until: Any,
    run: Any,
    make_source: Any,
    pg_login: Any,
    tmp_path: Path,
) -> None:
    # TTL 6 s / max 12 s: a couple of renewals, then the cap forces a replacement
    mount = database_mount(ttl="6s", max_ttl="12s")
    ledger = Ledger(tmp_path / "state")
    source, published = make_source(
        "db", "database", f"{mount}/creds/app", vault=vault, ledger=ledger, revoke_grace=0.5
    )
    first = await source.start()
    assert first.lease_id and first.lease_duration == 6
    assert await pg_login(first.data["username"], first.data["password"])
    async with run(source):
        new = await published.wait_for(lambda v: v.lease_id != first.lease_id, 40, "a replacement")
        renewals = [v for v in published.values[: published.values.index(new)]]
        assert renewals, "the lease was replaced without being renewed first"
        assert all(v.lease_id == first.lease_id for v in renewals)
        assert renewals[-1].expires_at > first.expires_at  # renewals extended it
        # make-before-break: the new credential existed before the old one expired
        assert new.issued_at < renewals[-1].expires_at
        assert await pg_login(new.data["username"], new.data["password"])
        # nobody has the new one yet (no pipeline here): the old lease stays, grace or not
        await until(
            lambda: 0 < max(ledger.retired().values(), default=math.inf) < time.time(),
            30,
            "the grace of the old lease to pass",
        )
        assert first.lease_id in ledger.retired()
        assert not isinstance(source.next_step(), Revoke)
        assert await pg_login(first.data["username"], first.data["password"])
        # delivered (what the pipeline says once every file holds it and the app was
        # told): the old lease is revoked by us after the grace, not left to expire
        source.delivered(new.version, time.time())
        await until(
            lambda: events.named("revoked", secret="db", version=first.lease_id),
            30,
            "the old lease revoked",
        )
        assert leases_under(openbao, f"{mount}/creds/app/") == [new.lease_id]
        assert not await pg_login(first.data["username"], first.data["password"])
        assert ledger.retired() == {}
        entry = ledger.load_entry("db")
        assert entry is not None and entry.value.lease_id == new.lease_id
    assert events.named("replaced", secret="db", old_version=first.lease_id)
    assert not events.named("lease_lost")


async def test_transient_outage_retries_with_backoff_and_keeps_the_lease(
    openbao: OpenBaoServer,
    relay: Any,
    new_vault: Any,
    database_mount: Any,
    events: Any,
    until: Any,
    run: Any,
    make_source: Any,
) -> None:
    mount = database_mount(ttl="10s", max_ttl="5m")
    client = new_vault(relay.address)
    await client.login()
    source, published = make_source("db", "database", f"{mount}/creds/app", vault=client)
    try:
        first = await source.start()
        await relay.cut()
        async with run(source):
            await until(lambda: len(events.named("renew_failed")) >= 2, 30, "failed renewals")
            failures = events.named("renew_failed", secret="db")
            assert all(r.version == first.lease_id for r in failures)
            assert all(r.retry_in > 0 for r in failures)
            assert not client.reachable and client.last_error
            assert source.current == first  # the last good value is kept
            await relay.restore()
            renewed = await published.wait_for(lambda v: v.expires_at > first.expires_at, 30)
        assert renewed.lease_id == first.lease_id  # never a new credential for an outage
        assert leases_under(openbao, f"{mount}/creds/app/") == [first.lease_id]
        assert not events.named("issued", version=renewed.lease_id)[1:]
        assert client.reachable
    finally:
        await client.close()


async def test_restarts_adopt_the_recorded_lease(
    openbao: OpenBaoServer,
    vault: Any,
    db_mount: str,
    events: Any,
    make_source: Any,
    pg_login: Any,
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "state")
    path = f"{db_mount}/creds/app"
    lease_ids = []
    for _ in range(5):
        source, _ = make_source(
            "db", "database", path, vault=vault, ledger=Ledger(ledger.state_dir)
        )
        value = await source.start()
        lease_ids.append(value.lease_id)
        await source.close(revoke=False)
    assert len(set(lease_ids)) == 1
    assert leases_under(openbao, f"{path}/") == [lease_ids[0]]
    assert len(events.named("adopted", secret="db")) == 4
    assert await pg_login(value.data["username"], value.data["password"])

    # shutting down with revoke leaves nothing behind, and nothing to adopt
    source, _ = make_source("db", "database", path, vault=vault, ledger=ledger)
    await source.start()
    await source.close(revoke=True)
    assert leases_under(openbao, f"{path}/") == []
    assert ledger.load_entry("db") is None


async def test_a_revoked_or_expired_recorded_lease_is_replaced(
    openbao: OpenBaoServer,
    vault: Any,
    db_mount: str,
    events: Any,
    make_source: Any,
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "state")
    path = f"{db_mount}/creds/app"
    source, _ = make_source("db", "database", path, vault=vault, ledger=ledger)
    first = await source.start()
    await source.close(revoke=False)
    await asyncio.to_thread(openbao.client().sys.revoke_lease, first.lease_id)

    source, _ = make_source("db", "database", path, vault=vault, ledger=ledger)
    second = await source.start()
    assert second.lease_id != first.lease_id
    assert events.named("adopt_skipped", reason="revoked")
    assert leases_under(openbao, f"{path}/") == [second.lease_id]

    # a record whose expiry has passed is not even looked up
    ledger.save(dataclasses.replace(second, expires_at=time.time() - 1))
    source, _ = make_source("db", "database", path, vault=vault, ledger=ledger)
    third = await source.start()
    assert third.lease_id not in (first.lease_id, second.lease_id)
    assert events.named("adopt_skipped", reason="expired")
    await source.close(revoke=True)


async def test_refresh_renews_now(
    vault: Any,
    database_mount: Any,
    run: Any,
    make_source: Any,
) -> None:
    # an hour-long lease: without wake() the first renewal would be ~40 minutes away
    mount = database_mount(ttl="1h", max_ttl="2h")
    source, published = make_source("db", "database", f"{mount}/creds/app", vault=vault)
    assert isinstance(source, DatabaseSource)
    first = await source.start()
    async with run(source):
        source.wake()
        renewed = await published.wait_for(lambda v: True, 30, "a renewal after wake()")
    assert renewed.lease_id == first.lease_id
    assert renewed.expires_at >= first.expires_at


async def test_started_during_an_outage_it_adopts_then_renews_when_vault_returns(
    openbao: OpenBaoServer,
    relay: Any,
    new_vault: Any,
    database_mount: Any,
    events: Any,
    until: Any,
    run: Any,
    make_source: Any,
    tmp_path: Path,
) -> None:
    mount = database_mount(ttl="10s", max_ttl="5m")
    ledger = Ledger(tmp_path / "state")
    client = new_vault(relay.address)
    await client.login()
    path = f"{mount}/creds/app"
    try:
        source, _ = make_source("db", "database", path, vault=client, ledger=ledger)
        first = await source.start()
        await source.close(revoke=False)
        await relay.cut()
        # restarted while Vault is unreachable: the recorded credential is used as is
        source, published = make_source("db", "database", path, vault=client, ledger=ledger)
        adopted = await source.start()
        assert adopted.lease_id == first.lease_id
        assert events.named("adopted", secret="db", version=first.lease_id)
        async with run(source):
            await until(lambda: events.named("renew_failed", secret="db"), 30, "a failed renewal")
            await relay.restore()
            renewed = await published.wait_for(lambda v: v.expires_at > first.expires_at, 30)
        assert renewed.lease_id == first.lease_id
        assert leases_under(openbao, f"{path}/") == [first.lease_id]
    finally:
        await client.close()


async def test_decisions_follow_the_injected_clock_without_sleeping(
    vault: Any, database_mount: Any, make_source: Any, clock: Any, tmp_path: Path
) -> None:
    """Renew at ~2/3 of the lease, revoke a replaced lease only once its successor was
    delivered and the grace since has passed: all read off the source's clock."""
    mount = database_mount(ttl="1h", max_ttl="2h")
    ledger = Ledger(tmp_path / "state")
    path = f"{mount}/creds/app"
    source, _ = make_source("db", "database", path, vault=vault, ledger=ledger, clock=clock)
    assert isinstance(source, DatabaseSource)
    first = await source.start()  # a real lease from OpenBao, scheduled on the fake clock
    start = clock.now
    step = source.next_step()
    assert isinstance(step, Wait) and 0.5 * 3600 < step.seconds < 0.8 * 3600
    clock.advance(0.8 * 3600)
    assert isinstance(source.next_step(), Renew)

    clock.now = start
    old = f"{mount}/creds/app/replaced-earlier"
    ledger.add_retired(old, start + 30.0)  # what a replacement records
    clock.advance(3600 * 0.4)  # far past the recorded grace, but nobody has `first` yet
    assert isinstance(source.next_step(), Wait)
    source.delivered(first.version, clock.now)  # every file holds it, the app was told
    step = source.next_step()
    assert isinstance(step, Wait) and step.seconds == pytest.approx(30.0)  # the grace, anew
    clock.advance(30.0)  # revoke_grace defaults to 30 s
    assert source.next_step() == Revoke((old,))
    source.delivered("an-older-version", clock.now)  # not the current one: changes nothing
    assert source.next_step() == Revoke((old,))
    await source.close(revoke=True)
