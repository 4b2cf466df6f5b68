"""The claim/publish protocol on a real KV v2 store: races, stale claims, outages; and
the layout other tools read (the current fields flat, ``bao kv get -field=password``),
migrated from the older nested one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from itertools import pairwise
from typing import Any

import pytest
from devservers import AUDIT, ROOT_TOKEN, OpenBaoServer, bao_binary
from rotatehelpers import config, kv_raw, kv_record, rotation

from agent.rotate.store import Claim, Store, StoreError


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
    assert kv_record(openbao, path)["claim"] is None


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


# --------------------------------------------------------------------------- the KV layout

CREATE = (
    "import json, secrets; "
    "print(json.dumps({'username': 'svc', 'password': 'pw-' + secrets.token_hex(12)}))"
)


def bao_field(openbao: OpenBaoServer, path: str, field: str) -> str:
    """``bao kv get -field=<field>``, as an operator or a script reads a secret."""
    mount, _, rest = path.partition("/data/")
    env = {**os.environ, "BAO_ADDR": openbao.address, "BAO_TOKEN": ROOT_TOKEN}
    done = subprocess.run(
        [bao_binary(), "kv", "get", f"-mount={mount}", f"-field={field}", rest],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_other_tools_read_the_current_credential_flat(
    vault: Any, openbao: OpenBaoServer, unique: str
) -> None:
    path = f"secret/data/rot-flat-{unique}"
    cfg = config("flat", "command", path, create=(sys.executable, "-c", CREATE), every=3600.0)
    rot, published = rotation(cfg, vault)
    for version in (1, 2):
        assert (await rot.rotate_now()).version == version
        password = published.last.data["password"]
        AUDIT.secret(password)
        assert bao_field(openbao, path, "password") == password
        raw = kv_raw(openbao, path)  # what .Data.data.password and ESO's property see
        assert set(raw) == {"username", "password", "_credsidecar"}
        assert raw["password"] == password and raw["_credsidecar"]["version"] == version
    assert kv_record(openbao, path)["previous"]["password"] != password


async def test_a_nested_record_is_read_and_migrated_on_the_next_write(
    vault: Any, openbao: OpenBaoServer, unique: str
) -> None:
    path = f"secret/data/rot-nested-{unique}"
    nested = {  # the layout before the flat one: the record itself, current inside
        "version": 3,
        "rotated_at": 1700000000.0,
        "current": {"username": "svc", "password": "pw-old-nested"},
        "previous": None,
        "retire_at": None,
        "retired": True,
        "claim": None,
    }
    mount, _, rest = path.partition("/data/")
    openbao.client().secrets.kv.v2.create_or_update_secret(rest, secret=nested, mount_point=mount)
    store = Store(vault, path)
    record = await store.read()
    assert record.version == 3 and record.current == nested["current"]
    await store.write(record)  # any write (here: the same record) moves it to the flat layout
    assert kv_raw(openbao, path) == {
        "username": "svc",
        "password": "pw-old-nested",
        "_credsidecar": {k: v for k, v in nested.items() if k != "current"},
    }
    assert (await store.read()).but(kv_version=0) == record.but(kv_version=0)

    cfg = config("nested", "command", path, create=(sys.executable, "-c", CREATE), every=3600.0)
    rot, published = rotation(cfg, vault)
    assert (await rot.rotate_now()).version == 4  # the rotation goes on from the migrated one
    assert bao_field(openbao, path, "password") == published.last.data["password"]
    assert kv_record(openbao, path)["previous"] == nested["current"]


async def test_a_credential_field_named_like_the_bookkeeping_is_refused(
    vault: Any, unique: str
) -> None:
    store = Store(vault, f"secret/data/rot-clash-{unique}")
    record = await store.read()
    clash = record.but(version=1, current={"_credsidecar": "x", "password": "s3cr3t-clash"})
    with pytest.raises(StoreError, match="a field named _credsidecar") as info:
        await store.write(clash)
    assert "s3cr3t" not in str(info.value)
