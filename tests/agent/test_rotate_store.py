"""The claim/publish protocol on a real KV v2 store: races, stale claims, outages."""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise
from typing import Any

from devservers import OpenBaoServer
from rotatehelpers import config, kv_data, rotation

from agent.rotate.store import Claim, Store


async def test_racing_replicas_rotate_once(vault: Any, unique: str, events: Any) -> None:
    cfg = config("race", "jwt-keys", f"secret/data/rot-race-{unique}", every=3600.0)
    replicas = [rotation(cfg, vault, owner=f"replica-{i}") for i in range(4)]
    outcomes = await asyncio.gather(*(r.step() for r, _ in replicas))
    results = [o.result for o in outcomes]
    # losers saw the claim (busy) or, reading late, the published result (not_due)
    assert results.count("rotated") == 1 and set(results) <= {"rotated", "busy", "not_due"}
    assert len(events.named("rotation_started", secret="race")) == 1
    # the losers adopt on their next pass: all hold the same key
    await asyncio.gather(*(r.step() for r, _ in replicas))
    kids = {p.last.data["kid"] for _, p in replicas}
    assert len(kids) == 1
    assert all(len(p.values) == 1 for _, p in replicas)


async def test_a_stale_claim_is_taken_over(
    vault: Any, openbao: OpenBaoServer, unique: str, until: Any
) -> None:
    path = f"secret/data/rot-stale-{unique}"
    store = Store(vault, path)
    record = await store.read()
    # a replica claimed, then died before publishing
    expires = time.time() + 1.5
    await store.write(record.but(claim=Claim("dead-replica", expires)))
    rot, _ = rotation(config("stale", "jwt-keys", path, every=3600.0), vault)
    assert (await rot.step()).result == "busy"
    assert (await rot.rotate_now()).result == "busy"  # not even when asked
    await until(lambda: time.time() > expires, 10, "the claim to expire")
    outcome = await rot.step()
    assert outcome.ok and outcome.version == 1
    assert kv_data(openbao, path)["claim"] is None


async def test_store_outage_keeps_the_current_credential(
    openbao: OpenBaoServer, new_vault: Any, relay: Any, unique: str, events: Any, until: Any
) -> None:
    client = new_vault(relay.address)
    await client.login()
    try:
        cfg = config("outage", "jwt-keys", f"secret/data/rot-outage-{unique}", every=3600.0)
        rot, published = rotation(cfg, client)
        assert (await rot.rotate_now()).ok
        await relay.cut()
        outcome = await rot.rotate_now()
        assert outcome.result == "failed" and "unreachable" in (outcome.error or "")
        assert len(published.values) == 1
        task = asyncio.create_task(rot.run())
        try:
            await until(lambda: events.named("vault_unavailable", secret="outage"), 20)
            await relay.restore()
            await until(lambda: rot.last_error is None and rot.record is not None, 20)
        finally:
            task.cancel()
        assert len(published.values) == 1  # nothing rotated or lost
    finally:
        await client.close()


async def test_every_schedules_rotations(vault: Any, unique: str, until: Any) -> None:
    cfg = config("sched", "jwt-keys", f"secret/data/rot-sched-{unique}", every=1.0, grace=0.5)
    rot, published = rotation(cfg, vault)

    def firsts() -> dict[str, float]:
        out: dict[str, float] = {}
        for value in published.values:  # a retire republishes a version (smaller JWKS)
            out.setdefault(value.version, value.issued_at)
        return out

    task = asyncio.create_task(rot.run())
    try:
        await until(lambda: len(firsts()) >= 3, 30, "three scheduled rotations")
    finally:
        task.cancel()
    rotated = firsts()
    assert list(rotated)[:3] == ["1", "2", "3"]
    times = list(rotated.values())
    assert all(b - a >= cfg.every for a, b in pairwise(times))  # never before it is due
