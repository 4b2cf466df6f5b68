"""The ``proxy:`` config section -> a frozen, validated :class:`ProxyConfig`.

Every problem is collected and reported with its key path and the bad value, e.g.
``proxy.pool_size: "x" is not an integer``. Relative paths are resolved against the
config file's directory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

POOL_MODES = ("transaction", "session")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
CLIENT_AUTH_METHODS = ("trust", "scram", "peer")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ProxyConfigError(ValueError):
    """Invalid ``proxy:`` section; ``problems`` each start with the key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid proxy configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    sslmode: str = "prefer"
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
    method: str = "trust"
    users_file: Path | None = None  # scram: lines "user" "SCRAM-SHA-256$..." (PgBouncer style)
    allowed_uids: tuple[int, ...] = ()  # peer: uids allowed (empty: our own uid only)


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
    upstream: UpstreamConfig = UpstreamConfig()
    pool_mode: str = "transaction"
    pool_size: int = 20
    max_client_conn: int = 1000
    drain_timeout: float = 60.0
    client_auth: ClientAuthConfig = ClientAuthConfig()
    tls: TLSConfig | None = None
    pool_timeout: float = 30.0  # how long a client waits for a server connection
    server_reset_query: str = "DISCARD ALL"

    @property
    def unix_socket_path(self) -> Path | None:
        if self.listen_unix is None:
            return None
        port = self.listen[1] if self.listen else 5432
        return self.listen_unix / f".s.PGSQL.{port}"


def _show(value: object) -> str:
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_duration(value: object) -> float:
    """``"200ms"``, ``"30s"``, ``"1m30s"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{_show(value)} is negative")
        return float(value)
    if isinstance(value, str) and value.strip():
        parts = _DURATION_RE.findall(value.strip())
        if parts and "".join(n + u for n, u in parts) == value.strip():
            return sum(float(n) * _UNITS[u] for n, u in parts)
    raise ValueError(f"{_show(value)} is not a duration (use 200ms, 30s, 5m, 1h)")


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_show(value)} is not an integer")
    if value < 1:
        raise ValueError(f"{_show(value)} must be at least 1")
    return value


def _address(value: object) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"{_show(value)} is not host:port")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise ValueError(f"{_show(value)} is not host:port")
    return host, int(port)


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in options:
            raise ValueError(f"{_show(value)} is not one of {', '.join(options)}")
        return str(value)

    return check


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{_show(value)} is not a non-empty string")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not true or false")
    return value


class _Section:
    """Reads one mapping, collecting problems under its key path."""

    def __init__(self, raw: object, path: str, problems: list[str], base_dir: Path) -> None:
        self.path = path
        self.problems = problems
        self.base_dir = base_dir
        self.raw: Mapping[str, Any] = {}
        if raw is None:
            return
        if not isinstance(raw, Mapping):
            problems.append(f"{path}: must be a mapping")
        else:
            self.raw = raw

    def check_keys(self, known: tuple[str, ...]) -> None:
        for key in self.raw:
            if key not in known:
                self.problems.append(f"{self.path}.{key}: unknown key")

    def get(self, key: str, convert: Callable[[object], T], default: T) -> T:
        if key not in self.raw:
            return default
        try:
            return convert(self.raw[key])
        except ValueError as exc:
            self.problems.append(f"{self.path}.{key}: {exc}")
            return default

    def path_value(self, key: str) -> Path | None:
        value = self.get(key, _string, "")
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def sub(self, key: str) -> _Section:
        return _Section(self.raw.get(key), f"{self.path}.{key}", self.problems, self.base_dir)


def parse_proxy_config(raw: Mapping[str, Any], base_dir: Path) -> ProxyConfig:
    """Validate the ``proxy:`` mapping; raise :class:`ProxyConfigError` with every problem."""
    problems: list[str] = []
    top = _Section(raw, "proxy", problems, base_dir)
    top.check_keys(
        (
            "listen",
            "listen_unix",
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
        )
    )
    listen: tuple[str, int] | None = ("127.0.0.1", 6432)
    if "listen" in top.raw and top.raw["listen"] is None:
        listen = None
    else:
        listen = top.get("listen", _address, listen)
    listen_unix = top.path_value("listen_unix")
    if listen is None and listen_unix is None:
        problems.append("proxy.listen: needed unless proxy.listen_unix is set")

    up = top.sub("upstream")
    up.check_keys(
        (
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
    )
    sslmode = up.get("sslmode", _choice(SSLMODES), "prefer")
    ca_cert = up.path_value("ca_cert")
    if sslmode in ("verify-ca", "verify-full") and ca_cert is None:
        problems.append(f"proxy.upstream.ca_cert: needed for sslmode {sslmode}")
    upstream = UpstreamConfig(
        host=up.get("host", _string, "127.0.0.1"),
        port=up.get("port", _positive_int, 5432),
        sslmode=sslmode,
        ca_cert=ca_cert,
        client_cert=up.path_value("client_cert"),
        client_key=up.path_value("client_key"),
        server_name=up.get("server_name", _string, None),
        connect_timeout=up.get("connect_timeout", parse_duration, 5.0),
        allow_cleartext=up.get("allow_cleartext", _bool, False),
    )

    cred = top.sub("credentials")
    cred.check_keys(("secret", "file"))
    credentials = CredentialsConfig(
        secret=cred.get("secret", _string, None),
        file=cred.path_value("file"),
    )
    if "credentials" not in top.raw:
        problems.append("proxy.credentials: missing (use {secret: NAME} or {file: PATH})")
    elif (credentials.secret is None) == (credentials.file is None) and cred.raw:
        problems.append("proxy.credentials: give exactly one of secret or file")

    ca = top.sub("client_auth")
    ca.check_keys(("method", "users_file", "allowed_uids"))
    method = ca.get("method", _choice(CLIENT_AUTH_METHODS), "trust")
    users_file = ca.path_value("users_file")
    if method == "scram" and users_file is None:
        problems.append("proxy.client_auth.users_file: needed for method scram")
    if method == "peer" and listen_unix is None:
        problems.append("proxy.client_auth.method: peer needs proxy.listen_unix")
    if method == "trust" and listen is not None and not _is_loopback(listen[0]):
        problems.append(
            f"proxy.client_auth.method: trust is refused on the non-loopback listener "
            f"{listen[0]} (use scram, or listen on 127.0.0.1 / listen_unix)"
        )
    no_uids: tuple[int, ...] = ()
    uids = ca.get("allowed_uids", _uid_list, no_uids)
    client_auth = ClientAuthConfig(method=method, users_file=users_file, allowed_uids=uids)

    tls = None
    if "tls" in top.raw:
        t = top.sub("tls")
        t.check_keys(("cert", "key"))
        cert, key = t.path_value("cert"), t.path_value("key")
        if cert is None:
            problems.append("proxy.tls.cert: missing (a certificate, or a key+cert bundle)")
        else:
            tls = TLSConfig(cert, key)

    config = ProxyConfig(
        credentials=credentials,
        listen=listen,
        listen_unix=listen_unix,
        upstream=upstream,
        pool_mode=top.get("pool_mode", _choice(POOL_MODES), "transaction"),
        pool_size=top.get("pool_size", _positive_int, 20),
        max_client_conn=top.get("max_client_conn", _positive_int, 1000),
        drain_timeout=top.get("drain_timeout", parse_duration, 60.0),
        client_auth=client_auth,
        tls=tls,
        pool_timeout=top.get("pool_timeout", parse_duration, 30.0),
        server_reset_query=top.get("server_reset_query", _string, "DISCARD ALL"),
    )
    if problems:
        raise ProxyConfigError(problems)
    return config


def _uid_list(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{_show(value)} is not a list of uids")
    return tuple(value)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
