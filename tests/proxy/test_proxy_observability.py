"""Status, metrics, graceful shutdown and the no-secrets-in-logs rule."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import sys
from pathlib import Path

import asyncpg
import pytest
from devservers import PostgresCluster, free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from proxyhelpers import ProxyFactory, Role, make_role, wait_until, write_credentials

from proxy import metrics
from proxy.counts import Buckets, LabelledCount


def samples(registry: CollectorRegistry, family: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """A family's samples from the text exposition, as a scraper reads them."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value  # type: ignore[misc]
        for fam in text_string_to_metric_families(text)
        if fam.name == family
        for sample in fam.samples
    }


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([0.0, 0.0005, 0.001, 0.0010001, 1.0, 30.0, 30.5]),
            st.floats(min_value=0, max_value=100, allow_nan=False),
        ),
        max_size=40,
    ),
    st.lists(st.sampled_from(metrics.CLIENT_RESULTS), max_size=20),
)
def test_counts_expose_what_prometheus_client_would(waits: list[float], logins: list[str]) -> None:
    """The login counts are ours, not prometheus_client's (proxy/counts.py): a scraper
    must see what a Counter and a Histogram fed the same would show."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    clients, wait = LabelledCount(metrics.CLIENT_RESULTS), Buckets(metrics.WAIT_BOUNDS)
    ours.register(metrics.CountsCollector(clients, wait))
    counter = Counter("credsidecar_proxy_clients_total", "c", ["result"], registry=theirs)
    histogram = Histogram(
        "credsidecar_proxy_wait_seconds", "h", buckets=metrics.WAIT_BOUNDS, registry=theirs
    )
    for result in metrics.CLIENT_RESULTS:
        counter.labels(result)  # a Counter shows a label once used; ours shows all
    for value in waits:
        wait.observe(value)
        histogram.observe(value)
    for result in logins:
        clients.inc(result)
        counter.labels(result).inc()
    for family in ("credsidecar_proxy_clients", "credsidecar_proxy_wait_seconds"):
        mine, real = samples(ours, family), samples(theirs, family)
        real = {key: v for key, v in real.items() if not key[0].endswith("_created")}
        assert mine.keys() == real.keys()
        for key, value in real.items():
            assert mine[key] == pytest.approx(value), key


def test_counts_refuse_labels_and_bounds_they_do_not_have() -> None:
    with pytest.raises(KeyError):
        LabelledCount(("ok",)).inc("made_up")
    with pytest.raises(ValueError, match="increase"):
        Buckets((1.0, 0.5))


async def test_status_and_metrics(make_proxy: ProxyFactory, role: Role) -> None:
    proxy = await make_proxy(pool_size=2)
    logins_before = samples(metrics.REGISTRY, "credsidecar_proxy_clients")
    waits_before = samples(metrics.REGISTRY, "credsidecar_proxy_wait_seconds")
    a = await asyncpg.connect(proxy.dsn(db=role.database))
    b = await asyncpg.connect(proxy.dsn(db=role.database))
    try:
        # logins finish their parameter SETs in the background
        await wait_until(lambda: proxy.server.status()["clients"]["active"] == 0, what="idle")
        async with a.transaction():
            await a.execute("SELECT 1")
            status = proxy.server.status()
            assert status["clients"]["active"] == 1
            assert status["clients"]["idle"] == 1
            assert status["generation"] == 1
            assert status["user"] == role.name
            (pool,) = status["pools"]
            assert pool["database"] == role.database
            assert [c["state"] for c in pool["connections"]].count("active") == 1
            text = generate_latest(proxy.server._registry).decode()
            assert 'credsidecar_proxy_client_connections{state="active"} 1.0' in text
            assert (
                'credsidecar_proxy_server_connections{generation="current",state="active"} 1.0'
                in text
            )
            assert "credsidecar_proxy_credential_generation 1.0" in text
        assert role.password not in str(status)
        assert role.password not in text
    finally:
        await a.close()
        await b.close()
    ok = ("credsidecar_proxy_clients_total", (("result", "ok"),))
    assert samples(metrics.REGISTRY, "credsidecar_proxy_clients")[ok] == logins_before[ok] + 2
    waits = samples(metrics.REGISTRY, "credsidecar_proxy_wait_seconds")
    count = ("credsidecar_proxy_wait_seconds_count", ())
    infinite = ("credsidecar_proxy_wait_seconds_bucket", (("le", "+Inf"),))
    assert waits[count] == waits_before[count] + 2
    assert waits[infinite] == waits[count]


async def test_graceful_stop_lets_transactions_finish(make_proxy: ProxyFactory, role: Role) -> None:
    proxy = await make_proxy()
    busy = await asyncpg.connect(proxy.dsn(db=role.database))
    idle = await asyncpg.connect(proxy.dsn(db=role.database))
    await busy.execute("CREATE TABLE IF NOT EXISTS stopcheck (x int)")
    tx = busy.transaction()
    await tx.start()
    await busy.execute("INSERT INTO stopcheck VALUES (1)")
    stopping = asyncio.create_task(proxy.server.stop(timeout=30))
    await wait_until(idle.is_closed, what="idle client closed")
    with pytest.raises(OSError):
        await asyncpg.connect(proxy.dsn(db=role.database))  # no longer accepting
    assert not stopping.done()
    await tx.commit()  # the transaction in flight still finishes
    await stopping
    assert busy.is_closed() or await _closed_soon(busy)
    check = await asyncpg.connect(
        f"postgresql://{role.name}:{role.password}@127.0.0.1:"
        f"{proxy.config.upstream.port}/{role.database}"
    )
    assert await check.fetchval("SELECT count(*) FROM stopcheck") >= 1
    await check.execute("DROP TABLE stopcheck")
    await check.close()


async def _closed_soon(conn: asyncpg.Connection) -> bool:
    await wait_until(conn.is_closed, what="client closed after its transaction")
    return True


async def test_stop_deadline_ends_long_transactions_with_57p01(
    make_proxy: ProxyFactory, role: Role, postgres: PostgresCluster
) -> None:
    proxy = await make_proxy()
    conn = await asyncpg.connect(proxy.dsn(db=role.database))
    query = asyncio.create_task(conn.fetchval("SELECT pg_sleep(30)"))
    # "active" in the proxy is already true while asyncpg prepares; stopping then ends the
    # session at the prepare's Sync instead. Wait until the server runs the query itself.
    running = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'"
    )
    await wait_until(
        lambda: asyncio.to_thread(lambda: postgres.psql(running).strip() == "1"),
        what="query running",
    )
    await proxy.server.stop(timeout=0.5)
    with pytest.raises(
        (asyncpg.exceptions.AdminShutdownError, asyncpg.ConnectionDoesNotExistError),
        match="shutting down",
    ):
        await query
    await conn.close()


async def test_no_secret_in_logs(
    make_proxy: ProxyFactory, postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    own = make_role(postgres, "leak")
    wrong = "wrong-" + secrets.token_hex(8)
    proxy = await make_proxy(creds=(own.name, own.password))
    conn = await asyncpg.connect(proxy.dsn(db=own.database, password="client-" + wrong))
    await conn.fetchval("SELECT 1")
    write_credentials(proxy.creds_file, own.name, wrong)  # rejected by the server
    await wait_until(
        lambda: any(r.getMessage() == "proxy_generation_rejected" for r in caplog.records),
        what="rejection logged",
    )
    proxy.creds_file.write_text('{"username": "x", "password": "' + wrong)  # half-written
    await wait_until(
        lambda: any(r.getMessage() == "proxy_credentials_invalid" for r in caplog.records),
        what="invalid file logged",
    )
    await conn.close()
    await proxy.server.stop(timeout=1)
    dump = "\n".join(str(r.__dict__) for r in caplog.records)
    assert "proxy_credentials_invalid" in dump
    for value in (own.password, wrong):
        assert value not in dump


async def test_standalone_entry_under_uvloop(
    postgres: PostgresCluster, role: Role, tmp_path: Path
) -> None:
    """``python -m proxy -c FILE``: uvloop, file credentials, graceful SIGTERM."""
    port = free_port()
    creds = tmp_path / "db.json"
    write_credentials(creds, role.name, role.password)
    upstream_port = postgres.port
    (tmp_path / "proxy.yaml").write_text(
        "proxy:\n"
        f"  listen: 127.0.0.1:{port}\n"
        f"  upstream: {{host: 127.0.0.1, port: {upstream_port}, sslmode: disable}}\n"
        "  credentials: {file: db.json}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "-c",
        str(tmp_path / "proxy.yaml"),
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def connects() -> bool:
            try:
                conn = await asyncpg.connect(f"postgresql://x:y@127.0.0.1:{port}/{role.database}")
            except OSError:
                return False
            value = await conn.fetchval("SELECT current_user")
            await conn.close()
            return bool(value == role.name)

        await wait_until(connects, what="standalone proxy serving")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert b"proxy_stopped" in err
    assert role.password.encode() not in err


async def test_default_registry_has_no_name_clash(make_proxy: ProxyFactory, role: Role) -> None:
    proxy = await make_proxy()
    collector = metrics.StateCollector(proxy.server.status)
    metrics.REGISTRY.register(collector)  # raises on a duplicated time series
    try:
        text = generate_latest(metrics.REGISTRY).decode()
        assert "credsidecar_proxy_client_connections" in text
    finally:
        metrics.REGISTRY.unregister(collector)


async def test_start_failure_leaves_nothing_running(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    from proxy.config import parse_proxy_config
    from proxy.credentials import FileCredentialProvider
    from proxy.server import ProxyServer

    busy = await make_proxy()
    write_credentials(tmp_path / "c.json", "u", "p")
    config = parse_proxy_config(
        {"listen": f"127.0.0.1:{busy.port}", "credentials": {"file": "c.json"}}, tmp_path
    )
    provider = FileCredentialProvider(tmp_path / "c.json")
    server = ProxyServer(config, provider, CollectorRegistry())
    with pytest.raises(OSError):
        await server.start()
    assert provider._task is None  # the watcher was stopped again
