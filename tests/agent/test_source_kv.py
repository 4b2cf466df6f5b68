"""KV v2 secrets against real OpenBao: polling, wake(), deleted versions, outages."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from devservers import OpenBaoServer

from agent.errors import VaultNotFound


@pytest.fixture
def kv_mount(openbao: OpenBaoServer, unique: str) -> Any:
    mount = f"kv-{unique}"
    root = openbao.client()
    root.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    yield mount
    root.sys.disable_secrets_engine(mount)


def put(openbao: OpenBaoServer, mount: str, data: dict[str, str]) -> int:
    response = openbao.client().secrets.kv.v2.create_or_update_secret(
        "app", secret=data, mount_point=mount
    )
    return int(response["data"]["version"])


async def test_new_versions_are_published_within_refresh(
    openbao: OpenBaoServer, vault: Any, kv_mount: str, run: Any, make_source: Any, events: Any
) -> None:
    put(openbao, kv_mount, {"api_key": "kv-secret-one"})
    source, published = make_source("api", "kv", f"{kv_mount}/data/app", vault=vault, refresh=0.5)
    first = await source.start()
    assert first.version == "1" and first.data == {"api_key": "kv-secret-one"}
    assert first.expires_at is None
    async with run(source):
        await asyncio.sleep(1.2)  # a few polls of an unchanged secret publish nothing
        assert published.values == []
        put(openbao, kv_mount, {"api_key": "kv-secret-two"})
        second = await published.wait_for(lambda v: v.version == "2", 30, "version 2")
    assert second.data == {"api_key": "kv-secret-two"}
    assert len(published.values) == 1
    assert events.named("kv_updated", secret="api", version="2")


async def test_wake_reads_now(
    openbao: OpenBaoServer, vault: Any, kv_mount: str, run: Any, make_source: Any
) -> None:
    put(openbao, kv_mount, {"k": "kv-wake-one"})
    # default refresh is 5 minutes: only wake() can make this test see version 2
    source, published = make_source("api", "kv", f"{kv_mount}/data/app", vault=vault)
    await source.start()
    async with run(source):
        put(openbao, kv_mount, {"k": "kv-wake-two"})
        source.wake()
        await published.wait_for(lambda v: v.version == "2", 30, "version 2 after wake()")


async def test_missing_and_deleted_versions(
    openbao: OpenBaoServer,
    vault: Any,
    kv_mount: str,
    run: Any,
    make_source: Any,
    events: Any,
    until: Any,
) -> None:
    source, _ = make_source("api", "kv", f"{kv_mount}/data/app", vault=vault)
    with pytest.raises(VaultNotFound):
        await source.start()
    put(openbao, kv_mount, {"k": "kv-deleted-one"})
    source, published = make_source("api", "kv", f"{kv_mount}/data/app", vault=vault, refresh=0.2)
    first = await source.start()
    openbao.client().secrets.kv.v2.delete_latest_version_of_secret("app", mount_point=kv_mount)
    async with run(source):
        await until(lambda: events.named("vault_unavailable", secret="api", operation="kv_read"))
        assert source.current == first and published.values == []


async def test_outage_keeps_the_value_and_recovers(
    openbao: OpenBaoServer,
    relay: Any,
    new_vault: Any,
    kv_mount: str,
    run: Any,
    make_source: Any,
    events: Any,
    until: Any,
) -> None:
    put(openbao, kv_mount, {"k": "kv-outage-one"})
    client = new_vault(relay.address)
    await client.login()
    source, published = make_source("api", "kv", f"{kv_mount}/data/app", vault=client, refresh=0.2)
    first = await source.start()
    await relay.cut()
    try:
        async with run(source):
            await until(lambda: len(events.named("vault_unavailable", secret="api")) >= 3, 30)
            failures = events.named("vault_unavailable", secret="api")
            # one line per attempt, each saying when the next one comes
            assert all(r.retry_in > 0 and "unreachable" in r.error for r in failures)
            assert source.current == first
            put(openbao, kv_mount, {"k": "kv-outage-two"})
            await relay.restore()
            await published.wait_for(lambda v: v.version == "2", 30, "recovery")
    finally:
        await client.close()
