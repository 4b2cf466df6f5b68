"""The ``rotate:`` section: every problem reported with its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.errors import ConfigError

VAULT = {"address": "http://127.0.0.1:8200", "auth": {"token": "t-not-secret"}}
ADMIN = {"secret": "db_admin", "host": "db", "port": 5432, "database": "app"}


def parse(rotate: dict[str, Any]) -> Any:
    return parse_config(
        {
            "vault": VAULT,
            "secrets": {"db_admin": {"kind": "file", "path": "admin.json"}},
            "rotate": rotate,
        },
        base_dir=Path("/tmp"),
        env={},
    )


def problems(rotate: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(rotate)
    return info.value.problems


def test_a_valid_dual_user_entry() -> None:
    cfg = parse(
        {
            "db-password": {
                "kind": "postgres-dual-user",
                "admin": ADMIN,
                "role": "app",
                "store": {"vault_kv": "secret/data/app/db"},
                "every": "24h",
                "grace": "10m",
                "notify_webhook": "https://hooks.example.com/services/T/B/x",
            }
        }
    )
    rot = cfg.rotate["db-password"]
    assert (rot.every, rot.grace, rot.poll) == (86400.0, 600.0, 30.0)
    assert rot.admin.host == "db" and rot.admin.database == "app"
    assert cfg.needs_vault()
    assert "hooks.example.com" not in repr(rot)  # a webhook URL carries a token


def test_problems_name_their_key_path() -> None:
    found = problems(
        {
            "db-password": {
                "kind": "postgres-password",
                "admin": {**ADMIN, "secret": "nope", "port": 99999},
                "store": {"vault_kv": "secret/app"},
                "every": "soon",
                "colour": "blue",
            },
            "keys": {"kind": "jwt-keys", "algorithm": "HS256", "store": {"vault_kv": "s/data/k"}},
            "cert": {"kind": "tls-cert", "store": {"vault_kv": "s/data/c"}},
            "api": {
                "kind": "command",
                "create": "make-key --new",
                "store": {"vault_kv": "s/data/a"},
            },
            "other": {"kind": "ldap", "store": {"vault_kv": "s/data/o"}},
            "db_admin": {"kind": "jwt-keys", "store": {"vault_kv": "s/data/k"}},
        }
    )
    expected = [
        'rotate.db-password.every: "soon" is not a duration (use 200ms, 30s, 5m, 1h)',
        'rotate.db-password.admin.secret: "nope" is not a secret in secrets',
        "rotate.db-password.admin.port: 99999 is not a port",
        "rotate.db-password.role: is required for kind postgres-password",
        "rotate.db-password.colour: unknown key",
        'rotate.db-password.store.vault_kv: "secret/app" is not a KV v2 data path',
        'rotate.keys.algorithm: "HS256" is not one of',
        "rotate.cert: needs exactly one of pki (Vault PKI issue path) or ca_cert + ca_key",
        'rotate.api.create: "make-key --new" must be a non-empty list of strings (no shell)',
        'rotate.other.kind: "ldap" is not one of',
        "rotate.db_admin: is also the name of a secret in secrets",
        "rotate.db_admin.store: is already the store of rotate.keys",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in found), (line, found)


def test_grace_must_be_shorter_than_the_schedule() -> None:
    found = problems(
        {
            "keys": {
                "kind": "jwt-keys",
                "store": {"vault_kv": "s/data/k"},
                "every": "10m",
                "grace": "10m",
            },
            "cert": {
                "kind": "tls-cert",
                "store": {"vault_kv": "s/data/c"},
                "ca_cert": "ca.pem",
                "ca_key": "ca.key",
                "common_name": "app",
                "ttl": "1h",
                "renew_fraction": 0.75,
                "grace": "20m",
            },
        }
    )
    assert "rotate.keys.grace: 600s is not shorter than every (600s)" in found
    assert any(p.startswith("rotate.cert.grace: 1200s is not shorter than the 900s") for p in found)


def test_a_command_rotation_takes_env_and_max_output() -> None:
    cfg = parse(
        {
            "api": {
                "kind": "command",
                "store": {"vault_kv": "s/data/a"},
                "create": ["/bin/make-key"],
                "env": {"pass": ["PATH"], "set": {"PROVIDER": "x"}},
                "max_output": 4096,
            }
        }
    ).rotate["api"]
    assert cfg.env.passed == ("PATH",) and cfg.env.set == {"PROVIDER": "x"}
    assert cfg.max_output == 4096
    entry = {"kind": "command", "store": {"vault_kv": "s/data/a"}, "create": ["x"]}
    (problem,) = problems({"api": {**entry, "max_output": 0}})
    assert problem == "rotate.api.max_output: 0 must be at least 1"
