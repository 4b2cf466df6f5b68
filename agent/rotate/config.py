"""The ``rotate:`` section: YAML -> frozen :class:`RotateConfig` objects.

Problems carry their key path, like the rest of the config:
``rotate.db-password.every: "soon" is not a duration (use 200ms, 30s, 5m, 1h)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.config import (
    as_command,
    as_fraction,
    as_mapping,
    as_str,
    parse_duration,
    show_value,
)

T = TypeVar("T")
Add = Callable[[str, str], None]  # (key path, message)

KINDS = ("postgres-password", "postgres-dual-user", "jwt-keys", "tls-cert", "command")
JWT_ALGORITHMS = ("ES256", "ES384", "RS256")

_COMMON = ("kind", "store", "every", "grace", "poll", "notify_webhook", "retry", "claim_timeout")
_KEYS: dict[str, tuple[str, ...]] = {
    "postgres-password": ("admin", "role", "verify_query", "password_length"),
    "postgres-dual-user": (
        "admin",
        "role",
        "verify_query",
        "password_length",
        "terminate_after",
    ),
    "jwt-keys": ("algorithm",),
    "tls-cert": ("pki", "params", "ca_cert", "ca_key", "common_name", "ttl", "renew_fraction"),
    "command": ("create", "verify", "revoke", "timeout"),
}


@dataclass(frozen=True)
class AdminConfig:
    """Where and as whom the sidecar connects to PostgreSQL to change roles."""

    secret: str  # a secret of the agent with username and password fields
    host: str = "127.0.0.1"
    port: int = 5432
    database: str = "postgres"


@dataclass(frozen=True)
class RotateConfig:
    name: str
    kind: str
    store: str  # KV v2 data path, e.g. secret/data/app/db
    every: float = 86400.0
    grace: float = 600.0
    poll: float = 30.0  # how often a replica re-reads the store to adopt others' rotations
    notify_webhook: str | None = field(default=None, repr=False)  # URLs often embed a token
    retry_initial: float = 1.0
    retry_max: float = 300.0
    claim_timeout: float = 120.0  # a claim older than this is abandoned; another may take over
    # postgres kinds
    admin: AdminConfig | None = None
    role: str | None = None
    verify_query: str | None = None
    password_length: int = 32
    terminate_after: float | None = None  # dual-user: end the retired user's sessions after
    # jwt-keys
    algorithm: str = "ES256"
    # tls-cert
    pki: str | None = None  # pki/issue/<role>
    params: Mapping[str, Any] = field(default_factory=dict)
    ca_cert: Path | None = None
    ca_key: Path | None = None
    common_name: str | None = None
    ttl: float = 86400.0  # local CA certificates
    renew_fraction: float = 2 / 3
    # command
    create: tuple[str, ...] | None = None
    verify: tuple[str, ...] | None = None
    revoke: tuple[str, ...] | None = None
    timeout: float = 30.0

    @property
    def metadata_path(self) -> str:
        """KV v2 metadata path of the store (``secret/metadata/app/db``)."""
        mount, _, rest = self.store.partition("/data/")
        return f"{mount}/metadata/{rest}"


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{show_value(value)} is not a positive integer")
    return value


def _url(value: object) -> str:
    text = as_str(value)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError("is not an http:// or https:// URL")  # the URL may hold a token
    return text


class _Reader:
    def __init__(self, add: Add, path: str, raw: Mapping[str, Any]) -> None:
        self.add, self.path, self.raw = add, path, raw

    def get(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        if self.raw.get(key) is None:
            return default
        try:
            return convert(self.raw[key])
        except (ValueError, TypeError) as exc:
            self.add(f"{self.path}.{key}", str(exc))
            return default

    def required(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        if self.raw.get(key) in (None, ""):
            self.add(f"{self.path}.{key}", f"is required for kind {self.raw.get('kind')}")
            return default
        return self.get(key, convert, default)


def _store(r: _Reader) -> str:
    raw = r.raw.get("store")
    path = f"{r.path}.store"
    if not isinstance(raw, Mapping) or set(raw) != {"vault_kv"}:
        r.add(path, "must be {vault_kv: <mount>/data/<path>} (a KV v2 path)")
        return ""
    where = str(raw["vault_kv"]).strip("/")
    if not re.fullmatch(r"[^/]+/data/.+", where):
        r.add(
            f"{path}.vault_kv",
            f"{show_value(where)} is not a KV v2 data path (<mount>/data/<path>)",
        )
    return where


def _admin(r: _Reader, secrets: Mapping[str, object]) -> AdminConfig | None:
    raw = r.raw.get("admin")
    path = f"{r.path}.admin"
    if not isinstance(raw, Mapping):
        r.add(path, "is required: {secret: NAME, host: HOST, port: PORT, database: DB}")
        return None
    a = _Reader(r.add, path, raw)
    for key in raw:
        if key not in ("secret", "host", "port", "database"):
            r.add(f"{path}.{key}", "unknown key (expected one of: secret, host, port, database)")
    secret = a.required("secret", as_str, "")
    if secret and secret not in secrets:
        r.add(f"{path}.secret", f"{show_value(secret)} is not a secret in secrets")
    port = a.get("port", _int, 5432)
    if not 0 < port < 65536:
        r.add(f"{path}.port", f"{port} is not a port")
    return AdminConfig(
        secret=secret,
        host=a.get("host", as_str, "127.0.0.1"),
        port=port,
        database=a.get("database", as_str, "postgres"),
    )


def _one(add: Add, name: str, raw: object, secrets: Mapping[str, object], base: Path) -> Any:
    path = f"rotate.{name}"
    if not isinstance(raw, Mapping):
        add(path, "must be a mapping")
        return None
    r = _Reader(add, path, raw)
    kind = r.required("kind", as_str, "")
    if kind not in KINDS:
        if kind:
            add(f"{path}.kind", f"{show_value(kind)} is not one of {', '.join(KINDS)}")
        return None
    known = _COMMON + _KEYS[kind]
    for key in raw:
        if key not in known:
            add(f"{path}.{key}", f"unknown key (expected one of: {', '.join(known)})")
    retry = raw.get("retry") or {}
    rr = _Reader(add, f"{path}.retry", retry if isinstance(retry, Mapping) else {})
    every = r.get("every", parse_duration, 86400.0)
    if every <= 0:
        add(f"{path}.every", "must be longer than 0s")
    cfg = RotateConfig(
        name=name,
        kind=kind,
        store=_store(r),
        every=every,
        grace=r.get("grace", parse_duration, 600.0),
        # replicas re-read the store often enough to follow a rotation within ~1/10 period
        poll=r.get("poll", parse_duration, max(1.0, min(30.0, every / 10))),
        notify_webhook=r.get("notify_webhook", _url, None),
        retry_initial=rr.get("initial", parse_duration, 1.0),
        retry_max=rr.get("max", parse_duration, 300.0),
        claim_timeout=r.get("claim_timeout", parse_duration, 120.0),
        password_length=r.get("password_length", _int, 32),
        verify_query=r.get("verify_query", as_str, None),
        terminate_after=r.get("terminate_after", parse_duration, None),
        algorithm=r.get("algorithm", as_str, "ES256"),
        pki=r.get("pki", as_str, None),
        params=r.get("params", as_mapping, {}),
        ca_cert=r.get("ca_cert", lambda v: base / as_str(v), None),
        ca_key=r.get("ca_key", lambda v: base / as_str(v), None),
        common_name=r.get("common_name", as_str, None),
        ttl=r.get("ttl", parse_duration, 86400.0),
        renew_fraction=r.get("renew_fraction", as_fraction, 2 / 3),
        timeout=r.get("timeout", parse_duration, 30.0),
    )
    extra: dict[str, Any] = {}
    if kind.startswith("postgres-"):
        extra["admin"] = _admin(r, secrets)
        extra["role"] = r.required("role", as_str, "")
        if cfg.password_length < 16:
            add(f"{path}.password_length", f"{cfg.password_length} is shorter than 16")
    if kind == "jwt-keys" and cfg.algorithm not in JWT_ALGORITHMS:
        add(f"{path}.algorithm", f"{show_value(cfg.algorithm)} is not one of {JWT_ALGORITHMS}")
    if kind == "tls-cert":
        local = cfg.ca_cert is not None or cfg.ca_key is not None
        if (cfg.pki is None) == (not local):
            add(path, "needs exactly one of pki (Vault PKI issue path) or ca_cert + ca_key")
        elif local and (cfg.ca_cert is None or cfg.ca_key is None):
            add(path, "a local CA needs both ca_cert and ca_key")
        if cfg.pki is not None and "common_name" not in cfg.params:
            add(f"{path}.params.common_name", "is required with pki")
        if local and not cfg.common_name:
            add(f"{path}.common_name", "is required with a local CA")
    if kind == "command":
        extra["create"] = r.required("create", as_command, None)
        extra["verify"] = r.get("verify", as_command, None)
        extra["revoke"] = r.get("revoke", as_command, None)
    return RotateConfig(**{**cfg.__dict__, **extra})


def parse_rotate(
    raw: object, add: Add, secrets: Mapping[str, object], base: Path
) -> dict[str, RotateConfig]:
    """Validate the ``rotate:`` mapping; problems go to ``add(key_path, message)``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        add("rotate", "must be a mapping of name -> rotated credential")
        return {}
    out: dict[str, RotateConfig] = {}
    stores: dict[str, str] = {}
    for name, item in raw.items():
        name = str(name)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
            add(f"rotate.{name}", "name must be letters, digits, _ and -")
        if name in secrets:
            add(f"rotate.{name}", "is also the name of a secret in secrets")
        cfg = _one(add, name, item, secrets, base)
        if cfg is None:
            continue
        if cfg.store and cfg.store in stores:
            add(f"rotate.{name}.store", f"is already the store of rotate.{stores[cfg.store]}")
        stores[cfg.store] = name
        out[name] = cfg
    return out
