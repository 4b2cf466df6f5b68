"""``credsidecar check`` on the sections beyond PostgreSQL: redis-acl, the mysql kinds, the
AWS store, and the command and aws-secretsmanager sources; every problem has its key path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

VALID: dict[str, Any] = {
    "vault": {"address": "http://127.0.0.1:8200", "auth": {"token": "t-not-secret"}},
    "secrets": {
        "redis_admin": {"kind": "kv", "path": "secret/data/redis-admin"},
        "my_admin": {"kind": "aws-secretsmanager", "secret_id": "db/admin", "region": "eu-west-1"},
        "ext": {"kind": "command", "command": ["op", "item", "get", "db", "--format", "json"]},
    },
    "rotate": {
        "cache": {
            "kind": "redis-acl",
            "admin": {"secret": "redis_admin", "host": "redis.internal", "tls": True},
            "user": "app",
            "store": {"vault_kv": "secret/data/app/redis"},
            "grace": "10m",
        },
        "db": {
            "kind": "mysql-password",
            "admin": {"secret": "my_admin", "host": "mysql.internal", "port": 3306},
            "user": "app",
            "host": "10.%",
            "store": {"aws_secretsmanager": "app/db", "region": "eu-west-1"},
            "verify_query": "SELECT 1",
        },
        "db2": {
            "kind": "mysql-dual-user",
            "admin": {"secret": "my_admin"},
            "user": "svc",
            "store": {"vault_kv": "secret/data/app/db2"},
        },
    },
}


def check(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "agent", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_the_new_sections_are_valid(tmp_path: Path) -> None:
    out = check(tmp_path, VALID)
    assert out.returncode == 0, out.stderr
    assert "ok (3 secrets" in out.stdout


def test_every_problem_names_its_key_path(tmp_path: Path) -> None:
    config = json.loads(json.dumps(VALID))
    config["rotate"]["cache"]["admin"]["database"] = "0"  # Redis has no database to name
    del config["rotate"]["cache"]["user"]
    config["rotate"]["db"]["store"]["region"] = "moon-1"
    config["rotate"]["db"]["password_length"] = 8
    config["rotate"]["db2"]["admin"]["ca_cert"] = "/etc/ca.pem"
    config["rotate"]["db2"]["admin"]["tls"] = False
    config["secrets"]["ext"]["command"] = "op read op://vault/item/password"
    config["secrets"]["ext"]["timeout"] = "0s"
    config["secrets"]["my_admin"]["endpoint_url"] = "ftp://x"
    del config["secrets"]["my_admin"]["secret_id"]
    out = check(tmp_path, config)
    assert out.returncode == 2, out.stdout
    problems = [line.split(": ", 1)[1] for line in out.stderr.strip().splitlines()]
    expected = [
        "rotate.cache.admin.database: unknown key",
        "rotate.cache.user: is required for kind redis-acl",
        'rotate.db.store.region: "moon-1" is not an AWS region',
        "rotate.db.password_length: 8 is shorter than 16",
        "rotate.db2.admin.ca_cert: is given but tls is false",
        "secrets.ext.command: ",
        "secrets.ext.timeout: must be longer than 0s",
        "secrets.my_admin.endpoint_url: ",
        "secrets.my_admin.secret_id: is required",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == len(expected), problems
