"""TLS both ways, upstream auth methods, client auth (scram users file, peer)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from devservers import FaultRelay, PostgresCluster
from devservers import make_test_pki as make_certs
from proxyhelpers import ProxyFactory, Role, pg_tool, psql, run, scram_verifier, wait_until

from proxy.config import ProxyConfigError, parse_proxy_config
from proxy.protocol import messages as m


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[tuple[PostgresCluster, dict[str, Path], Role]]:
    """A separate cluster with ssl=on, plus md5 and cleartext-password users."""
    cluster = PostgresCluster()
    certs = make_certs(cluster.workdir / "tls")
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for path in (certs["cert"], certs["key"], certs["ca"], certs["key"].parent):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    cluster.settings.update(
        ssl="on", ssl_cert_file=f"'{certs['cert']}'", ssl_key_file=f"'{certs['key']}'"
    )
    cluster.start()
    role = Role("tlsapp", "pw-" + secrets.token_hex(8), "postgres")
    cluster.psql(f"CREATE ROLE tlsapp LOGIN PASSWORD '{role.password}'")
    cluster.psql(
        f"SET password_encryption = 'md5'; CREATE ROLE md5app LOGIN PASSWORD '{role.password}'"
    )
    cluster.psql(f"CREATE ROLE clearapp LOGIN PASSWORD '{role.password}'")
    hba = cluster.datadir / "pg_hba.conf"
    hba.write_text(
        "host all md5app 127.0.0.1/32 md5\n"
        "host all clearapp 127.0.0.1/32 password\n" + hba.read_text()
    )
    cluster.psql("SELECT pg_reload_conf()")
    yield cluster, certs, role
    cluster.remove()


async def _upstream_ssl(proxy_port: int, db: str = "postgres") -> bool:
    conn = await asyncpg.connect(f"postgresql://x:y@127.0.0.1:{proxy_port}/{db}")
    try:
        return bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("sslmode", "expect_tls"),
    [
        ("disable", False),
        ("prefer", True),
        ("require", True),
        ("verify-ca", True),
        ("verify-full", True),
    ],
)
async def test_upstream_sslmodes(
    make_proxy: ProxyFactory,
    tls_cluster: tuple[PostgresCluster, dict[str, Path], Role],
    sslmode: str,
    expect_tls: bool,
) -> None:
    cluster, certs, role = tls_cluster
    upstream = {"port": cluster.port, "sslmode": sslmode, "host": "localhost"}
    if sslmode.startswith("verify"):
        upstream["ca_cert"] = str(certs["ca"])
    proxy = await make_proxy(creds=(role.name, role.password), upstream=upstream)
    assert await _upstream_ssl(proxy.port) is expect_tls


async def test_upstream_verify_full_rejects_wrong_name_and_wrong_ca(
    make_proxy: ProxyFactory,
    tls_cluster: tuple[PostgresCluster, dict[str, Path], Role],
    tmp_path: Path,
) -> None:
    cluster, certs, role = tls_cluster
    wrong_name = await make_proxy(
        creds=(role.name, role.password),
        upstream={
            "port": cluster.port,
            "sslmode": "verify-full",
            "ca_cert": str(certs["ca"]),
            "host": "127.0.0.1",
            "server_name": "db.example.com",
        },
    )
    with pytest.raises(asyncpg.PostgresError, match="certificate rejected"):
        await asyncpg.connect(f"postgresql://x:y@127.0.0.1:{wrong_name.port}/postgres")
    other_ca = make_certs(tmp_path / "other")["ca"]
    wrong_ca = await make_proxy(
        creds=(role.name, role.password),
        upstream={"port": cluster.port, "sslmode": "verify-ca", "ca_cert": str(other_ca)},
    )
    with pytest.raises(asyncpg.PostgresError, match="certificate rejected"):
        await asyncpg.connect(f"postgresql://x:y@127.0.0.1:{wrong_ca.port}/postgres")


async def test_upstream_require_fails_without_server_tls(
    make_proxy: ProxyFactory, role: Role
) -> None:
    proxy = await make_proxy(upstream={"sslmode": "require"})  # the session cluster: no ssl
    with pytest.raises(asyncpg.PostgresError, match="does not accept TLS"):
        await asyncpg.connect(proxy.dsn(db=role.database))


async def test_stop_lets_go_of_a_silent_tls_server(
    make_proxy: ProxyFactory, tls_cluster: tuple[PostgresCluster, dict[str, Path], Role]
) -> None:
    """A TLS connection's close waits for the server's close_notify; a server that went
    silent must not keep the socket open past the proxy's stop (it was left to the
    garbage collector: a ResourceWarning in whichever test ran next)."""
    cluster, _, role = tls_cluster
    relay = FaultRelay(cluster.port)
    try:
        proxy = await make_proxy(
            creds=(role.name, role.password), upstream={"port": relay.port, "sslmode": "require"}
        )
        assert await _upstream_ssl(proxy.port) is True
        links = [c.link for p in proxy.server.manager.pools.values() for c in p.conns]
        assert links
        relay.silence()  # no close_notify, no end of stream will come
        await proxy.server.stop(timeout=0)
        assert all(link.closed for link in links)
    finally:
        relay.close()


@pytest.mark.parametrize("user", ["md5app", "clearapp"])
async def test_upstream_md5_and_cleartext(
    make_proxy: ProxyFactory,
    tls_cluster: tuple[PostgresCluster, dict[str, Path], Role],
    user: str,
) -> None:
    cluster, _, role = tls_cluster
    proxy = await make_proxy(
        creds=(user, role.password), upstream={"port": cluster.port, "sslmode": "require"}
    )
    conn = await asyncpg.connect(f"postgresql://x:y@127.0.0.1:{proxy.port}/postgres")
    assert await conn.fetchval("SELECT current_user") == user
    await conn.close()


async def test_upstream_cleartext_refused_without_tls(
    make_proxy: ProxyFactory, tls_cluster: tuple[PostgresCluster, dict[str, Path], Role]
) -> None:
    cluster, _, role = tls_cluster
    proxy = await make_proxy(
        creds=("clearapp", role.password), upstream={"port": cluster.port, "sslmode": "disable"}
    )
    with pytest.raises(asyncpg.PostgresError, match="cleartext") as info:
        await asyncpg.connect(f"postgresql://x:y@127.0.0.1:{proxy.port}/postgres")
    assert role.password not in str(info.value)


async def test_client_tls_when_configured(
    make_proxy: ProxyFactory, role: Role, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "client-side")
    with_tls = await make_proxy(tls={"cert": str(certs["cert"]), "key": str(certs["key"])})
    without = await make_proxy()
    sql = "SELECT 'ok'"
    ok = await run(
        pg_tool("psql"),
        "-X",
        "-A",
        "-t",
        f"host=localhost port={with_tls.port} user=x dbname={role.database} "
        f"sslmode=verify-full sslrootcert={certs['ca']}",
        "-c",
        sql,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "ok"
    refused = await run(
        pg_tool("psql"),
        "-X",
        "-A",
        "-t",
        f"host=127.0.0.1 port={without.port} user=x dbname={role.database} sslmode=require",
        "-c",
        sql,
    )
    assert refused.returncode != 0, refused.stdout
    assert "SSL" in refused.stderr, refused.stderr
    plain = await run(
        pg_tool("psql"),
        "-X",
        "-A",
        "-t",
        f"host=127.0.0.1 port={without.port} user=x dbname={role.database} sslmode=prefer",
        "-c",
        sql,
    )
    assert plain.returncode == 0, plain.stderr


async def test_client_stalling_in_the_tls_handshake_is_ended_by_the_login_timeout(
    make_proxy: ProxyFactory, role: Role, tmp_path: Path
) -> None:
    """SSLRequest, 'S', then silence (or half a ClientHello): client_login_timeout ends
    the connection there too, and a real client gets in meanwhile."""
    certs = make_certs(tmp_path / "client-side")
    proxy = await make_proxy(
        tls={"cert": str(certs["cert"]), "key": str(certs["key"])}, client_login_timeout="1s"
    )
    stalled = []
    for hello in (b"", b"\x16\x03\x01\x02\x00\x01"):  # nothing; a ClientHello's head
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(m.ssl_request())
        assert await reader.readexactly(1) == b"S"
        writer.write(hello)
        stalled.append((reader, writer))
    try:
        ok = await asyncpg.connect(proxy.dsn(db=role.database), ssl=False)
        assert await ok.fetchval("SELECT 1") == 1
        await ok.close()
        for reader, _ in stalled:
            # mid-handshake there is no error to tell: the proxy just closes
            async with asyncio.timeout(10):
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""
        await wait_until(lambda: not proxy.server.sessions, what="the stalled sessions gone")
    finally:
        for _, writer in stalled:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_client_scram_users_file(
    make_proxy: ProxyFactory, role: Role, tmp_path: Path
) -> None:
    users = tmp_path / "users.txt"
    verifier = scram_verifier("client-secret")
    users.write_text(f'"alice" "{verifier}"\n"bob" "plain-pw"\n')
    proxy = await make_proxy(client_auth={"method": "scram", "users_file": str(users)})
    # libpq (psql) and asyncpg both log in
    ok = await psql(
        "127.0.0.1",
        str(proxy.port),
        "alice",
        role.database,
        "-c",
        "SELECT current_user",
        env={"PGPASSWORD": "client-secret"},
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == role.name
    conn = await asyncpg.connect(proxy.dsn(user="bob", password="plain-pw", db=role.database))
    await conn.close()
    for user, password in (("alice", "wrong"), ("nobody", "client-secret")):
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await asyncpg.connect(proxy.dsn(user=user, password=password, db=role.database))
        assert info.value.sqlstate == "28P01"


async def test_client_peer_auth_on_unix_socket(
    make_proxy: ProxyFactory, role: Role, tmp_path: Path
) -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    sock_dir = tmp_path / "sock"
    proxy = await make_proxy(listen_unix=str(sock_dir), client_auth={"method": "peer"})
    port = proxy.port
    ok = await psql(
        str(sock_dir),
        str(port),
        me,
        role.database,
        "-c",
        "SELECT current_user",
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == role.name
    # other uids are refused: test_proxy_identity.py runs psql as nobody
    # over TCP, peer cannot work
    tcp = await psql(
        "127.0.0.1",
        str(port),
        me,
        role.database,
        "-c",
        "SELECT 1",
    )
    assert tcp.returncode != 0
    assert shutil.which("psql")


def test_trust_is_refused_on_non_loopback_listener(tmp_path: Path) -> None:
    raw = {"listen": "0.0.0.0:6432", "credentials": {"file": "db.json"}}
    with pytest.raises(ProxyConfigError) as info:
        parse_proxy_config(raw, tmp_path)
    assert any(p.startswith("proxy.client_auth.method:") for p in info.value.problems)


def test_config_problems_name_their_key(tmp_path: Path) -> None:
    raw = {
        "pool_size": "x",
        "pool_mode": "statement",
        "drain_timeout": "soon",
        "upstream": {"sslmode": "verify-full"},
        "credentials": {"secret": "db", "file": "x.json"},
        "bogus": 1,
    }
    with pytest.raises(ProxyConfigError) as info:
        parse_proxy_config(raw, tmp_path)
    problems = info.value.problems
    assert 'proxy.pool_size: "x" is not an integer' in problems
    for prefix in (
        "proxy.pool_mode:",
        "proxy.drain_timeout:",
        "proxy.upstream.ca_cert:",
        "proxy.credentials:",
        "proxy.bogus:",
    ):
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)
    ok = parse_proxy_config({"credentials": {"secret": "db"}, "drain_timeout": "1m30s"}, tmp_path)
    assert ok.credentials.secret == "db"
    assert ok.drain_timeout == 90.0
    assert ok.pool_mode == "transaction"


async def test_client_tls_bundle_reloads_without_restart(
    make_proxy: ProxyFactory, role: Role, tmp_path: Path
) -> None:
    """A renewed key+certificate bundle (one atomic rename) is used at the next handshake."""
    first, second = make_certs(tmp_path / "one"), make_certs(tmp_path / "two")
    bundle = tmp_path / "bundle.pem"

    def install(certs: dict[str, Path]) -> None:
        tmp = bundle.with_suffix(".tmp")
        tmp.write_bytes(certs["key"].read_bytes() + certs["cert"].read_bytes())
        os.replace(tmp, bundle)

    async def login(ca: Path) -> int:
        result = await run(
            pg_tool("psql"),
            "-X",
            "-A",
            "-t",
            f"host=localhost port={proxy.port} user=x dbname={role.database} "
            f"sslmode=verify-full sslrootcert={ca}",
            "-c",
            "SELECT 1",
        )
        return result.returncode

    install(first)
    proxy = await make_proxy(tls={"cert": str(bundle)})
    assert await login(first["ca"]) == 0
    install(second)
    assert await login(second["ca"]) == 0
    assert await login(first["ca"]) != 0
    bundle.write_text("not a certificate")  # broken: the last good one stays in use
    assert await login(second["ca"]) == 0
