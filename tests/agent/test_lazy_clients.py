"""A config pays only for the clients it uses: a PostgreSQL-only config never imports the
AWS, Redis or MySQL clients (the agent's idle RSS is benchmarked in benchmarks/agent.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("botocore", "aiobotocore", "redis", "aiomysql", "pymysql")

PROBE = """
import json, sys
from agent.config import parse_config
from agent.lazy import load_class
from agent.rotate.base import _KINDS as ROTATORS
from agent.rotate.manager import RotationManager
from agent.runtime import Runtime
from agent.sources import _KINDS as SOURCES

config = parse_config(json.loads(sys.argv[1]), env={})
Runtime(config)
for secret in config.secrets.values():
    load_class(SOURCES[secret.kind])
for rotation in config.rotate.values():
    load_class(ROTATORS[rotation.kind])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2:])))
"""


def loaded(config: dict[str, object]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(config), *HEAVY],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


VAULT = {"address": "http://127.0.0.1:8200", "auth": {"token": "t-not-secret"}}


def test_a_postgres_only_config_loads_no_other_client() -> None:
    config = {
        "vault": VAULT,
        "secrets": {
            "db": {"kind": "database", "path": "database/creds/app"},
            "admin": {"kind": "kv", "path": "secret/data/admin"},
        },
        "rotate": {
            "pw": {
                "kind": "postgres-dual-user",
                "admin": {"secret": "admin"},
                "role": "app",
                "store": {"vault_kv": "secret/data/app/pw"},
            }
        },
    }
    assert loaded(config) == []


def test_each_client_comes_with_its_kind() -> None:
    config = {
        "secrets": {"api": {"kind": "aws-secretsmanager", "secret_id": "x", "region": "eu-west-1"}}
    }
    assert {"botocore", "aiobotocore"} <= {m.split(".")[0] for m in loaded(config)}
    redis = {
        "vault": VAULT,
        "secrets": {"admin": {"kind": "kv", "path": "secret/data/admin"}},
        "rotate": {
            "cache": {
                "kind": "redis-acl",
                "admin": {"secret": "admin"},
                "user": "app",
                "store": {"vault_kv": "secret/data/app/cache"},
            }
        },
    }
    assert {m.split(".")[0] for m in loaded(redis)} == {"redis"}
