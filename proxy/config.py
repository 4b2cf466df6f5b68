"""The ``proxy:`` config section -> a frozen, validated :class:`ProxyConfig`.

Every problem is collected and reported with its key path and the bad value, e.g.
``proxy.pool_size: "x" is not an integer``. Relative paths are resolved against the
config file's directory.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from proxy.configkit import (
    Problems,
    Section,
    as_bool,
    as_group,
    as_int,
    as_int_list,
    as_nonempty_str,
    as_port,
    as_positive_int,
    as_str_list,
    choice,
    parse_duration,
    parse_listen,
    parse_mode,
    show_value,
)
from proxy.protocol.parameters import canonical_name

PoolMode = Literal["transaction", "session"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
ClientAuthMethod = Literal["trust", "scram", "peer"]
POOL_MODES: tuple[PoolMode, ...] = get_args(PoolMode)
SSLMODES: tuple[SslMode, ...] = get_args(SslMode)
CLIENT_AUTH_METHODS: tuple[ClientAuthMethod, ...] = get_args(ClientAuthMethod)


class ProxyConfigError(ValueError):
    """Invalid ``proxy:`` section; ``problems`` each start with the key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid proxy configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    sslmode: SslMode = "prefer"
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None  # name checked by verify-full (default: host)
    connect_timeout: float = 5.0
    allow_cleartext: bool = False  # cleartext passwords over a connection without TLS


@dataclass(frozen=True)
class CredentialsConfig:
    secret: str | None = None  # a secret of the agent, pushed into the proxy
    file: Path | None = None  # or a JSON file {"username": ..., "password": ...}


@dataclass(frozen=True)
class ClientAuthConfig:
    method: ClientAuthMethod = "trust"
    users_file: Path | None = None  # scram: lines "user" "SCRAM-SHA-256$..." (PgBouncer style)
    allowed_uids: tuple[int, ...] = ()  # peer: uids allowed (empty: our own uid only)

    def peer_uids(self) -> tuple[int, ...]:
        """The uids peer auth admits: ``allowed_uids``, or the proxy's own uid."""
        return self.allowed_uids or (os.geteuid(),)


@dataclass(frozen=True)
class TLSConfig:
    """Client-facing TLS; re-read when the files change. Without ``key``, ``cert`` is a
    bundle holding the key too (replaced in one rename, never seen mismatched)."""

    cert: Path
    key: Path | None = None


@dataclass(frozen=True)
class ProxyConfig:
    credentials: CredentialsConfig
    listen: tuple[str, int] | None = ("127.0.0.1", 6432)
    listen_unix: Path | None = None  # directory; the socket is .s.PGSQL.<port> inside it
    unix_socket_mode: int = 0o660  # PgBouncer's name; who may connect at all
    unix_socket_group: int | None = None  # gid given the socket (None: our own group)
    upstream: UpstreamConfig = UpstreamConfig()
    pool_mode: PoolMode = "transaction"
    pool_size: int = 20
    max_client_conn: int = 1000
    drain_timeout: float = 60.0
    client_auth: ClientAuthConfig = ClientAuthConfig()
    tls: TLSConfig | None = None
    pool_timeout: float = 30.0  # how long a client waits for a server connection
    server_reset_query: str = "DISCARD ALL"
    # messages up to this size are held whole, larger ones stream through (per direction)
    message_buffer: int = 256 * 1024
    client_login_timeout: float = 15.0  # PgBouncer's name; startup + client auth
    # a wait this long for an answer the server owes, or in an idle transaction, is
    # logged and counted (0: never); see proxy/watchdog.py
    hang_warning_timeout: float = 60.0
    idle_transaction_timeout: float = 0.0  # PgBouncer's name and default (0: never)
    # PgBouncer's name and default: statements kept per server connection in transaction
    # mode (least recently used closed past it); 0 turns renaming off (names pass through)
    max_prepared_statements: int = 200
    # server connections per database, all generations and trial logins included; 0 is
    # unlimited (PgBouncer's default). Ours: 2 x pool_size, a full pool draining while a
    # full new one serves after a rotation, so the proxy never takes more than that
    max_db_connections: int = 40
    server_idle_timeout: float = 600.0  # PgBouncer's; an idle server connection closes
    server_lifetime: float = 3600.0  # PgBouncer's; closed when released past it (jittered)
    # startup parameters dropped instead of applied (canonical names)
    ignore_startup_parameters: tuple[str, ...] = ()

    @property
    def transaction_pooling(self) -> bool:
        """A server connection per transaction, not per client (else session pooling)."""
        return self.pool_mode == "transaction"

    @property
    def unix_socket_path(self) -> Path | None:
        if self.listen_unix is None:
            return None
        port = self.listen[1] if self.listen else 5432
        return self.listen_unix / f".s.PGSQL.{port}"


def parse_proxy_config(
    raw: object, base_dir: Path, problems: Problems | None = None
) -> ProxyConfig:
    """Validate the ``proxy:`` mapping.

    Alone, raise :class:`ProxyConfigError` with every problem. Given the agent's
    ``problems``, add to them instead and return what could be read (the caller raises).
    """
    collected = Problems() if problems is None else problems
    top = Section(collected, "proxy", raw, _TOP_KEYS, base_dir=base_dir)
    listen: tuple[str, int] | None = ("127.0.0.1", 6432)
    if "listen" in top.raw and top.raw["listen"] is None:
        listen = None
    else:
        listen = top.get("listen", parse_listen, listen)
    listen_unix = top.path_value("listen_unix")
    socket_mode = top.get("unix_socket_mode", parse_mode, 0o660)
    socket_group = top.get("unix_socket_group", as_group, None)
    if listen is None and listen_unix is None:
        collected.add("proxy.listen", "needed unless proxy.listen_unix is set")

    up = top.sub("upstream", _UPSTREAM_KEYS)
    sslmode: SslMode = up.get("sslmode", choice(SSLMODES), "prefer")
    ca_cert = up.path_value("ca_cert")
    if sslmode in ("verify-ca", "verify-full") and ca_cert is None:
        collected.add("proxy.upstream.ca_cert", f"needed for sslmode {sslmode}")
    upstream = UpstreamConfig(
        host=up.get("host", as_nonempty_str, "127.0.0.1"),
        port=up.get("port", as_port, 5432),
        sslmode=sslmode,
        ca_cert=ca_cert,
        client_cert=up.path_value("client_cert"),
        client_key=up.path_value("client_key"),
        server_name=up.get("server_name", as_nonempty_str, None),
        connect_timeout=up.get("connect_timeout", parse_duration, 5.0),
        allow_cleartext=up.get("allow_cleartext", as_bool, False),
    )

    cred = top.sub("credentials", ("secret", "file"))
    credentials = CredentialsConfig(
        secret=cred.get("secret", as_nonempty_str, None), file=cred.path_value("file")
    )
    if "credentials" not in top.raw:
        collected.add("proxy.credentials", "missing (use {secret: NAME} or {file: PATH})")
    elif (credentials.secret is None) == (credentials.file is None) and cred.raw:
        collected.add("proxy.credentials", "give exactly one of secret or file")

    ca = top.sub("client_auth", ("method", "users_file", "allowed_uids"))
    method: ClientAuthMethod = ca.get("method", choice(CLIENT_AUTH_METHODS), "trust")
    users_file = ca.path_value("users_file")
    if method == "scram" and users_file is None:
        collected.add("proxy.client_auth.users_file", "needed for method scram")
    if method == "peer" and listen_unix is None:
        collected.add("proxy.client_auth.method", "peer needs proxy.listen_unix")
    why = loopback_problem(listen[0]) if method == "trust" and listen else None
    if why is not None:
        collected.add(
            "proxy.client_auth.method",
            f"trust is refused: proxy.listen {show_value(top.raw.get('listen'))} {why} "
            "(use scram, or listen on 127.0.0.1 / listen_unix)",
        )
    no_uids: tuple[int, ...] = ()
    uids = ca.get("allowed_uids", as_int_list, no_uids)
    client_auth = ClientAuthConfig(method=method, users_file=users_file, allowed_uids=uids)

    tls = None
    if "tls" in top.raw:
        t = top.sub("tls", ("cert", "key"))
        cert, key = t.path_value("cert"), t.path_value("key")
        if cert is None:
            collected.add("proxy.tls.cert", "missing (a certificate, or a key+cert bundle)")
        else:
            tls = TLSConfig(cert, key)

    pool_size = top.get("pool_size", as_positive_int, 20)
    config = ProxyConfig(
        credentials=credentials,
        listen=listen,
        listen_unix=listen_unix,
        unix_socket_mode=socket_mode,
        unix_socket_group=socket_group,
        upstream=upstream,
        pool_mode=top.get("pool_mode", choice(POOL_MODES), "transaction"),
        pool_size=pool_size,
        max_client_conn=top.get("max_client_conn", as_positive_int, 1000),
        drain_timeout=top.get("drain_timeout", parse_duration, 60.0),
        client_auth=client_auth,
        tls=tls,
        pool_timeout=top.get("pool_timeout", parse_duration, 30.0),
        server_reset_query=top.get("server_reset_query", as_nonempty_str, "DISCARD ALL"),
        message_buffer=top.get("message_buffer", _buffer_size, 256 * 1024),
        client_login_timeout=top.get("client_login_timeout", parse_duration, 15.0),
        hang_warning_timeout=top.get("hang_warning_timeout", parse_duration, 60.0),
        idle_transaction_timeout=top.get("idle_transaction_timeout", parse_duration, 0.0),
        max_prepared_statements=top.get("max_prepared_statements", _statement_count, 200),
        max_db_connections=top.get("max_db_connections", _unlimited_or_count, 2 * pool_size),
        server_idle_timeout=top.get("server_idle_timeout", parse_duration, 600.0),
        server_lifetime=top.get("server_lifetime", parse_duration, 3600.0),
        ignore_startup_parameters=top.get("ignore_startup_parameters", _parameter_names, ()),
    )
    if problems is None and collected:
        raise ProxyConfigError(collected.items)
    return config


_TOP_KEYS = (
    "listen",
    "listen_unix",
    "unix_socket_mode",
    "unix_socket_group",
    "upstream",
    "credentials",
    "pool_mode",
    "pool_size",
    "max_client_conn",
    "drain_timeout",
    "client_auth",
    "tls",
    "pool_timeout",
    "server_reset_query",
    "message_buffer",
    "client_login_timeout",
    "hang_warning_timeout",
    "idle_transaction_timeout",
    "max_prepared_statements",
    "max_db_connections",
    "server_idle_timeout",
    "server_lifetime",
    "ignore_startup_parameters",
)
_UPSTREAM_KEYS = (
    "host",
    "port",
    "sslmode",
    "ca_cert",
    "client_cert",
    "client_key",
    "server_name",
    "connect_timeout",
    "allow_cleartext",
)


def _unlimited_or_count(value: object) -> int:
    number = as_int(value)
    if number < 0:
        raise ValueError(f"{number} is negative (0 means unlimited)")
    return number


def _parameter_names(value: object) -> tuple[str, ...]:
    """Startup parameter names, case-insensitive as PostgreSQL's (canonical spelling)."""
    return tuple(canonical_name(name) for name in as_str_list(value))


def _buffer_size(value: object) -> int:
    size = as_positive_int(value)
    if size < 8192:
        raise ValueError(f"{size} is below the smallest buffer of 8192 bytes")
    return size


def _statement_count(value: object) -> int:
    count = as_int(value)
    if not 0 <= count <= 100_000:
        raise ValueError(f"{count} is outside 0..100000")
    return count


Resolver = Callable[[str], list[str]]


def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to (the system resolver bounds the wait)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]


def loopback_problem(host: str, resolver: Resolver = resolve) -> str | None:
    """``None`` when ``host`` is a loopback address, or a name whose every address is
    one (resolved now, at start); otherwise what is wrong, for the config error."""
    try:
        return None if _loopback(host) else "is not a loopback address"
    except ValueError:
        pass  # a host name
    try:
        addresses = sorted(set(resolver(host)))
    except OSError as exc:
        return f"does not resolve ({exc.strerror or exc})"
    outside = [a for a in addresses if not _loopback(a)]
    if outside or not addresses:
        return f"resolves to {', '.join(outside) or 'nothing'}, not only loopback addresses"
    return None


def _loopback(address: str) -> bool:
    """Raises ValueError when ``address`` is not an IP address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1
    return ip.is_loopback
