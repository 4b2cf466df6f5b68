"""Who the proxy lets in, and what it tells those it does not (issue 9, findings 5-8).

Peer auth admits uids, not names, behind a 0660 socket; unknown SCRAM users look like
known ones; trust needs a listener that is loopback however its name resolves; errors
to clients carry PostgreSQL's message and SQLSTATE, never the upstream's address or user.
"""

from __future__ import annotations

import asyncio
import base64
import grp
import logging
import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import scramp
from devservers import PostgresCluster
from proxyhelpers import ProxyFactory, Role, pg_tool, psql, run

from proxy.config import ProxyConfigError, loopback_problem, parse_proxy_config
from proxy.protocol import messages as m

NOBODY = pwd.getpwnam("nobody")
# A PostgreSQL client of the standard library only: the interpreter the tests run on
# may live where `nobody` cannot read it, the system one is readable by everyone.
SYSTEM_PYTHON = "/usr/bin/python3"
PROBE = r"""
import socket, struct, sys
path, user, database = sys.argv[1:4]
body = struct.pack("!i", 196608) + b"".join(
    k.encode() + b"\0" + v.encode() + b"\0" for k, v in (("user", user), ("database", database))
) + b"\0"
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(30)
    s.connect(path)
    s.sendall(struct.pack("!i", len(body) + 4) + body)
    head = s.recv(5, socket.MSG_WAITALL)
    rest = s.recv(struct.unpack("!i", head[1:5])[0] - 4, socket.MSG_WAITALL)
if head[:1] == b"E":
    fields = {f[:1]: f[1:].decode() for f in rest.split(b"\0") if f}
    print("E", fields[b"C"], fields[b"M"])
else:
    print(head[:1].decode(), struct.unpack("!i", rest[:4])[0])
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs clients as nobody (needs root)")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A socket directory `nobody` can reach (pytest's tmp_path is 0700, root's)."""
    path = Path(tempfile.mkdtemp(prefix="proxy-sock-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def as_nobody(*argv: str) -> tuple[int, str]:
    result = await run("runuser", "-u", "nobody", "--", *argv)
    return result.returncode, result.stdout + result.stderr


async def probe_as_nobody(socket_path: Path, database: str) -> str:
    """What the proxy answers a startup packet from uid nobody (``E <sqlstate> <text>``)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run a client as nobody")
    code, out = await as_nobody(SYSTEM_PYTHON, "-c", PROBE, str(socket_path), "nobody", database)
    assert code == 0, out
    return out.strip()


# --- finding 5: peer auth admits uids, the socket is 0660 ------------------------------


@needs_root
async def test_peer_auth_refuses_another_local_user(
    make_proxy: ProxyFactory, role: Role, shared_dir: Path
) -> None:
    """`nobody` asking to be `nobody` is not the application: 28000, with the socket open."""
    proxy = await make_proxy(
        listen_unix=str(shared_dir), unix_socket_mode="0666", client_auth={"method": "peer"}
    )
    path = proxy.server.socket_path
    assert path is not None
    code, out = await as_nobody(
        *psql_argv(shared_dir, proxy.port, "nobody", role.database, "SELECT current_user")
    )
    assert code != 0, out
    assert "peer authentication failed" in out, out
    assert await probe_as_nobody(path, role.database) == (
        'E 28000 peer authentication failed for user "nobody"'
    )
    # our own uid (the default of allowed_uids) still logs in, under any user name
    ok = await psql(str(shared_dir), proxy.port, "someone", role.database, "-c", "SELECT 1")
    assert ok.returncode == 0, ok.stderr


@needs_root
async def test_unix_socket_mode_and_group(
    make_proxy: ProxyFactory, role: Role, shared_dir: Path
) -> None:
    """Default 0660: `nobody` cannot even connect; in the socket's group it reaches the
    proxy, and only `allowed_uids` lets it in."""
    closed = await make_proxy(listen_unix=str(shared_dir / "a"), client_auth={"method": "peer"})
    assert closed.server.socket_path is not None
    st = closed.server.socket_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660
    (shared_dir / "a").chmod(0o755)
    code, out = await as_nobody(
        *psql_argv(shared_dir / "a", closed.port, "nobody", role.database, "SELECT 1")
    )
    assert code != 0
    assert "Permission denied" in out, out

    grouped = await make_proxy(
        listen_unix=str(shared_dir / "b"),
        unix_socket_group="nogroup" if _has_group("nogroup") else NOBODY.pw_gid,
        client_auth={"method": "peer"},
    )
    path = grouped.server.socket_path
    assert path is not None
    assert path.stat().st_gid == NOBODY.pw_gid
    (shared_dir / "b").chmod(0o755)
    assert (await probe_as_nobody(path, role.database)).startswith("E 28000 ")

    admitted = await make_proxy(
        listen_unix=str(shared_dir / "c"),
        unix_socket_mode=0o666,  # YAML's unquoted 0666 arrives as this int
        client_auth={"method": "peer", "allowed_uids": [NOBODY.pw_uid]},
    )
    (shared_dir / "c").chmod(0o755)
    code, out = await as_nobody(
        *psql_argv(shared_dir / "c", admitted.port, "nobody", role.database, "SELECT current_user")
    )
    assert code == 0, out
    assert out.strip() == role.name
    # and the proxy's own uid is no longer in the list
    mine = await psql(str(shared_dir / "c"), admitted.port, "root", role.database, "-c", "SELECT 1")
    assert mine.returncode != 0
    assert "peer authentication failed" in mine.stderr


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def psql_argv(host: Path, port: int, user: str, database: str, sql: str) -> list[str]:
    """psql's command line, for running it as another user."""
    options = ("-X", "-A", "-t", "-h", str(host), "-p", str(port), "-U", user, "-d", database)
    return [pg_tool("psql"), *options, "-c", sql]


def test_socket_settings_are_checked(tmp_path: Path) -> None:
    base = {"listen_unix": str(tmp_path), "credentials": {"file": "db.json"}}
    assert parse_proxy_config(base, tmp_path).unix_socket_mode == 0o660
    assert parse_proxy_config({**base, "unix_socket_mode": "0600"}, tmp_path).unix_socket_mode == (
        0o600
    )
    with pytest.raises(ProxyConfigError) as info:
        parse_proxy_config(
            {**base, "unix_socket_mode": "rw", "unix_socket_group": "no-such-group-x"}, tmp_path
        )
    assert 'proxy.unix_socket_mode: "rw" is not an octal mode' in info.value.problems
    assert (
        'proxy.unix_socket_group: "no-such-group-x" is not a group on this system'
        in info.value.problems
    )


# --- finding 6: unknown SCRAM users look like known ones -------------------------------


async def scram_server_first(port: int, user: str, database: str) -> tuple[bytes, int]:
    """(salt, iterations) of the proxy's SCRAM server-first message for ``user``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        params = m.cstr("user") + m.cstr(user) + m.cstr("database") + m.cstr(database) + b"\0"
        body = (3 << 16).to_bytes(4, "big") + params
        writer.write((len(body) + 4).to_bytes(4, "big") + body)
        assert await read_auth(reader) == (m.AUTH_SASL, m.cstr("SCRAM-SHA-256") + b"\0")
        first = b"n,,n=,r=" + base64.b64encode(os.urandom(18))
        payload = m.cstr("SCRAM-SHA-256") + len(first).to_bytes(4, "big") + first
        writer.write(m.message(b"p", payload))
        code, server_first = await read_auth(reader)
        assert code == m.AUTH_SASL_CONTINUE
    finally:
        writer.close()
        await writer.wait_closed()
    attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
    return base64.b64decode(attrs["s"]), int(attrs["i"])


async def read_auth(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(30):
        head = await reader.readexactly(5)
        body = await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
    assert head[:1] == b"R", (head, body)
    return int.from_bytes(body[:4], "big"), body[4:]


def verifier_line(name: str, password: str, salt_len: int, iterations: int) -> str:
    salt, stored, server, _ = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations, salt=os.urandom(salt_len)
    )
    b64 = base64.b64encode
    return (
        f'"{name}" "SCRAM-SHA-256${iterations}:{b64(salt).decode()}$'
        f'{b64(stored).decode()}:{b64(server).decode()}"\n'
    )


@pytest.mark.parametrize(("salt_len", "iterations"), [(16, 4096), (24, 8192)])
async def test_unknown_scram_user_answers_like_a_known_one(
    make_proxy: ProxyFactory, role: Role, tmp_path: Path, salt_len: int, iterations: int
) -> None:
    users = tmp_path / "users.txt"
    users.write_text(
        verifier_line("alice", "a-pw", salt_len, iterations)
        + verifier_line("carol", "c-pw", salt_len, iterations)
    )
    if salt_len == 16:
        users.write_text(users.read_text() + '"bob" "plain-pw"\n')  # plain: 16 bytes, 4096
    proxy = await make_proxy(client_auth={"method": "scram", "users_file": str(users)})
    seen: dict[str, list[tuple[bytes, int]]] = {}
    for _ in range(2):
        for user in ("alice", "mallory", "eve"):
            seen.setdefault(user, []).append(
                await scram_server_first(proxy.port, user, role.database)
            )
    known, unknown, other = seen["alice"], seen["mallory"], seen["eve"]
    assert known[0] == known[1]
    assert unknown[0] == unknown[1], "an unknown user's salt changes between attempts"
    assert len(unknown[0][0]) == len(known[0][0]) == salt_len
    assert unknown[0][1] == known[0][1] == iterations
    assert unknown[0][0] != other[0][0], "mock salts depend on the user name"
    # and the exchange still fails for the unknown user, like a wrong password
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(proxy.dsn(user="mallory", password="a-pw", db=role.database))
    assert info.value.sqlstate == "28P01"
    ok = await asyncpg.connect(proxy.dsn(user="alice", password="a-pw", db=role.database))
    await ok.close()


# --- finding 7: trust needs a listener that is loopback however its name resolves ------


async def test_trust_listener_must_be_loopback_once_resolved(
    make_proxy: ProxyFactory, role: Role
) -> None:
    for listen in ("127.attacker.example:0", "0.0.0.0:0", "[::]:0"):
        with pytest.raises(ProxyConfigError) as info:
            await make_proxy(listen=listen)
        problem = next(p for p in info.value.problems if p.startswith("proxy.client_auth.method:"))
        assert f'proxy.listen "{listen}"' in problem, problem
    # localhost resolves (here, from /etc/hosts) to loopback only: trust is allowed
    assert loopback_problem("localhost") is None
    proxy = await make_proxy(listen="localhost:0")
    conn = await asyncpg.connect(f"postgresql://app@localhost:{proxy.port}/{role.database}")
    assert await conn.fetchval("SELECT current_user") == role.name
    await conn.close()


def test_a_name_with_any_non_loopback_address_is_refused() -> None:
    """A name resolving to loopback and something else (no such name on this machine:
    the resolver is the one fake here)."""

    def mixed(host: str) -> list[str]:
        return ["127.0.0.1", "::1", "192.0.2.7"]

    assert loopback_problem("localhost", mixed) == (
        "resolves to 192.0.2.7, not only loopback addresses"
    )
    assert loopback_problem("db", lambda _: ["::ffff:127.0.0.1", "127.0.0.2"]) is None
    assert loopback_problem("db", lambda _: []) is not None
    assert loopback_problem("::1") is None
    assert loopback_problem("127.0.0.1") is None
    assert loopback_problem("10.0.0.1") == "is not a loopback address"


# --- finding 8: clients never learn the upstream's address or user ---------------------


def upstream_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        str(getattr(r, "error", "")) for r in caplog.records if r.msg == "proxy_upstream_failed"
    )


async def test_errors_name_neither_upstream_address_nor_user(
    make_proxy: ProxyFactory,
    role: Role,
    postgres: PostgresCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "credsidecar.proxy")
    where = f"127.0.0.1:{postgres.port}"

    def told_nothing(exc: asyncpg.PostgresError) -> str:
        text = str(exc)
        for secret in (where, str(postgres.port), role.name, "127.0.0.1"):
            assert secret not in text, (secret, text)
        return text

    proxy = await make_proxy()
    with pytest.raises(asyncpg.InvalidCatalogNameError) as bad_db:
        await asyncpg.connect(proxy.dsn(db="nosuchdb"))
    assert bad_db.value.sqlstate == "3D000"
    assert told_nothing(bad_db.value) == 'database "nosuchdb" does not exist'
    logged = upstream_log(caplog)
    assert f'upstream {where} as {role.name}: database "nosuchdb" does not exist' in logged

    refused = await make_proxy(creds=(role.name, "not-the-password"))
    with pytest.raises(asyncpg.InvalidPasswordError) as bad_auth:
        await asyncpg.connect(refused.dsn(db=role.database))
    assert bad_auth.value.sqlstate == "28P01"
    assert told_nothing(bad_auth.value) == (
        'password authentication failed for user "(upstream user)"'
    )
    assert (
        f'upstream {where} as {role.name}: password authentication failed for user "{role.name}"'
        in (upstream_log(caplog))
    )

    with socket.socket() as probe:  # a port nothing listens on: the upstream is down
        probe.bind(("127.0.0.1", 0))
        down_port = probe.getsockname()[1]
    down = await make_proxy(upstream={"port": down_port})
    with pytest.raises(asyncpg.PostgresError) as no_server:
        await asyncpg.connect(down.dsn(db=role.database))
    assert no_server.value.sqlstate == "08006"
    text = str(no_server.value)
    assert str(down_port) not in text and "127.0.0.1" not in text, text
    assert text == "could not connect to the database server: Connection refused"
    assert f"upstream 127.0.0.1:{down_port} as {role.name}: " in upstream_log(caplog)
