"""The ``rotate:`` section: YAML -> frozen :class:`RotateConfig` objects.

Problems carry their key path, like the rest of the config:
``rotate.db-password.every: "soon" is not a duration (use 200ms, 30s, 5m, 1h)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from agent.awsconfig import AwsConfig, parse_aws
from agent.childenv import EnvPolicy, parse_env
from agent.commands import DEFAULT_MAX_OUTPUT
from proxy.configkit import (
    Problems,
    Section,
    as_bool,
    as_command,
    as_fraction,
    as_mapping,
    as_port,
    as_positive_int,
    as_str,
    choice,
    parse_duration,
    show_value,
)

RotateKind = Literal[
    "postgres-password",
    "postgres-dual-user",
    "jwt-keys",
    "tls-cert",
    "command",
    "redis-acl",
    "mysql-password",
    "mysql-dual-user",
]
StoreKind = Literal["vault_kv", "aws_secretsmanager"]
JwtAlgorithm = Literal["ES256", "ES384", "RS256"]
KINDS: tuple[RotateKind, ...] = get_args(RotateKind)
JWT_ALGORITHMS: tuple[JwtAlgorithm, ...] = get_args(JwtAlgorithm)

_COMMON = ("kind", "store", "every", "grace", "poll", "notify_webhook", "retry", "claim_timeout")
_KEYS: dict[RotateKind, tuple[str, ...]] = {
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
    "command": ("create", "verify", "revoke", "timeout", "env", "max_output"),
    "redis-acl": ("admin", "user", "password_length"),
    "mysql-password": ("admin", "user", "host", "verify_query", "password_length"),
    "mysql-dual-user": ("admin", "user", "host", "verify_query", "password_length"),
}
# the server each kind logs in to as ``admin``, and its port when none is given
_ADMIN_PORTS = {
    "postgres-password": 5432,
    "postgres-dual-user": 5432,
    "redis-acl": 6379,
    "mysql-password": 3306,
    "mysql-dual-user": 3306,
}


@dataclass(frozen=True)
class AdminConfig:
    """Where and as whom the sidecar connects to the server whose accounts it rotates."""

    secret: str  # a secret of the agent with username and password fields
    host: str = "127.0.0.1"
    port: int = 5432
    database: str = "postgres"  # PostgreSQL; MySQL/MariaDB: none unless given
    tls: bool = False  # redis-acl, mysql kinds: TLS to the server (verified)
    ca_cert: Path | None = None  # the CA that signed the server's certificate (with tls)


@dataclass(frozen=True)
class RotateConfig:
    name: str
    kind: RotateKind
    store: str  # KV v2 data path (secret/data/app/db), or the AWS secret's name or ARN
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
    algorithm: JwtAlgorithm = "ES256"
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
    env: EnvPolicy = field(default_factory=EnvPolicy)
    max_output: int = DEFAULT_MAX_OUTPUT  # bytes of stdout a command may write
    # redis-acl, mysql kinds: the rotated account (and its host part for MySQL)
    user: str | None = None
    account_host: str = "%"
    # where the record lives: KV v2 (check-and-set), or AWS Secrets Manager (staging labels)
    store_kind: StoreKind = "vault_kv"
    aws: AwsConfig | None = None


def _url(value: object) -> str:
    text = as_str(value)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError("is not an http:// or https:// URL")  # the URL may hold a token
    return text


def _store(r: Section) -> tuple[StoreKind, str, AwsConfig | None]:
    raw = r.raw.get("store")
    path = r.key("store")
    if isinstance(raw, Mapping) and "aws_secretsmanager" in raw:
        s = r.sub("store", ("aws_secretsmanager", "region", "endpoint_url"))
        return "aws_secretsmanager", s.required("aws_secretsmanager", as_str, ""), parse_aws(s)
    if not isinstance(raw, Mapping) or set(raw) != {"vault_kv"}:
        r.problems.add(
            path,
            "must be {vault_kv: <mount>/data/<path>} (a KV v2 path) "
            "or {aws_secretsmanager: <name or ARN>, region: ..., endpoint_url: ...}",
        )
        return "vault_kv", "", None
    where = str(raw["vault_kv"]).strip("/")
    if not re.fullmatch(r"[^/]+/data/.+", where):
        r.problems.add(
            f"{path}.vault_kv",
            f"{show_value(where)} is not a KV v2 data path (<mount>/data/<path>)",
        )
    return "vault_kv", where, None


def _admin(r: Section, secrets: Mapping[str, object], kind: RotateKind) -> AdminConfig | None:
    if not isinstance(r.raw.get("admin"), Mapping):
        r.problems.add(
            r.key("admin"), "is required: {secret: NAME, host: HOST, port: PORT, database: DB}"
        )
        return None
    postgres = kind.startswith("postgres-")
    known: tuple[str, ...] = ("secret", "host", "port")
    known += () if kind == "redis-acl" else ("database",)  # Redis has no database to name
    known += () if postgres else ("tls", "ca_cert")
    a = r.sub("admin", known)
    secret = a.required("secret", as_str, "")
    if secret and secret not in secrets:
        a.problems.add(a.key("secret"), f"{show_value(secret)} is not a secret in secrets")
    ca_cert = a.path_value("ca_cert")
    tls = a.get("tls", as_bool, ca_cert is not None)
    if ca_cert is not None and not tls:
        a.problems.add(a.key("ca_cert"), "is given but tls is false")
    return AdminConfig(
        secret=secret,
        host=a.get("host", as_str, "127.0.0.1"),
        port=a.get("port", as_port, _ADMIN_PORTS[kind]),
        database=a.get("database", as_str, "postgres" if postgres else ""),
        tls=tls,
        ca_cert=ca_cert,
    )


def _account(value: object) -> str:
    text = as_str(value)
    if not text or len(text) > 255 or any(c in text for c in "\x00\r\n"):
        raise ValueError(f"{show_value(text)} is not an account name")
    return text


def _one(
    problems: Problems,
    name: str,
    raw: object,
    secrets: Mapping[str, object],
    base: Path,
    sensitive: tuple[str, ...],
) -> RotateConfig | None:
    path = f"rotate.{name}"
    if not isinstance(raw, Mapping):
        problems.add(path, "must be a mapping")
        return None
    kind = Section(problems, path, raw).required("kind", choice(KINDS), None)
    if kind is None:
        return None
    r = Section(problems, path, raw, _COMMON + _KEYS[kind], base_dir=base)
    retry = r.sub("retry")
    every = r.get("every", parse_duration, 86400.0)
    if every <= 0:
        problems.add(f"{path}.every", "must be longer than 0s")
    why = f"for kind {kind}"
    postgres = kind.startswith("postgres-")
    account = kind in ("redis-acl", "mysql-password", "mysql-dual-user")
    store_kind, store, aws = _store(r)
    cfg = RotateConfig(
        name=name,
        kind=kind,
        store=store,
        store_kind=store_kind,
        aws=aws,
        every=every,
        grace=r.get("grace", parse_duration, 600.0),
        # replicas re-read the store often enough to follow a rotation within ~1/10 period
        poll=r.get("poll", parse_duration, max(1.0, min(30.0, every / 10))),
        notify_webhook=r.get("notify_webhook", _url, None),
        retry_initial=retry.get("initial", parse_duration, 1.0),
        retry_max=retry.get("max", parse_duration, 300.0),
        claim_timeout=r.get("claim_timeout", parse_duration, 120.0),
        admin=_admin(r, secrets, kind) if kind in _ADMIN_PORTS else None,
        user=r.required("user", _account, "", why=why) if account else None,
        account_host=r.get("host", _account, "%"),
        role=r.required("role", as_str, "", why=why) if postgres else None,
        password_length=r.get("password_length", as_positive_int, 32),
        verify_query=r.get("verify_query", as_str, None),
        terminate_after=r.get("terminate_after", parse_duration, None),
        algorithm=r.get("algorithm", choice(JWT_ALGORITHMS), "ES256"),
        pki=r.get("pki", as_str, None),
        params=r.get("params", as_mapping, {}),
        ca_cert=r.path_value("ca_cert"),
        ca_key=r.path_value("ca_key"),
        common_name=r.get("common_name", as_str, None),
        ttl=r.get("ttl", parse_duration, 86400.0),
        renew_fraction=r.get("renew_fraction", as_fraction, 2 / 3),
        create=r.required("create", as_command, None, why=why) if kind == "command" else None,
        verify=r.get("verify", as_command, None),
        revoke=r.get("revoke", as_command, None),
        timeout=r.get("timeout", parse_duration, 30.0),
        env=parse_env(problems, f"{path}.env", r.raw.get("env"), sensitive),
        max_output=r.get("max_output", as_positive_int, DEFAULT_MAX_OUTPUT),
    )
    if cfg.grace >= every > 0:
        # a rotation never retires a credential inside its grace, so it would wait anyway
        problems.add(f"{path}.grace", f"{cfg.grace:g}s is not shorter than every ({every:g}s)")
    if (postgres or account) and cfg.password_length < 16:
        problems.add(f"{path}.password_length", f"{cfg.password_length} is shorter than 16")
    if kind == "tls-cert":
        local = cfg.ca_cert is not None or cfg.ca_key is not None
        if (cfg.pki is None) == (not local):
            problems.add(
                path, "needs exactly one of pki (Vault PKI issue path) or ca_cert + ca_key"
            )
        elif local and (cfg.ca_cert is None or cfg.ca_key is None):
            problems.add(path, "a local CA needs both ca_cert and ca_key")
        if cfg.pki is not None and "common_name" not in cfg.params:
            problems.add(f"{path}.params.common_name", "is required with pki")
        if local and not cfg.common_name:
            problems.add(f"{path}.common_name", "is required with a local CA")
        margin = cfg.ttl * (1 - cfg.renew_fraction)
        if local and cfg.grace >= margin:
            problems.add(
                f"{path}.grace",
                f"{cfg.grace:g}s is not shorter than the {margin:g}s a certificate has left "
                "when it is renewed (ttl x (1 - renew_fraction))",
            )
    return cfg


def parse_rotate(
    raw: object,
    problems: Problems,
    secrets: Mapping[str, object],
    base: Path,
    sensitive: tuple[str, ...],
) -> dict[str, RotateConfig]:
    """Validate the ``rotate:`` mapping; problems are added to ``problems``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.add("rotate", "must be a mapping of name -> rotated credential")
        return {}
    out: dict[str, RotateConfig] = {}
    stores: dict[str, str] = {}
    for name, item in raw.items():
        name = str(name)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
            problems.add(f"rotate.{name}", "name must be letters, digits, _ and -")
        if name in secrets:
            problems.add(f"rotate.{name}", "is also the name of a secret in secrets")
        cfg = _one(problems, name, item, secrets, base, sensitive)
        if cfg is None:
            continue
        where = f"{cfg.store_kind}:{cfg.store}"
        if cfg.store and where in stores:
            problems.add(f"rotate.{name}.store", f"is already the store of rotate.{stores[where]}")
        stores[where] = name
        out[name] = cfg
    return out
