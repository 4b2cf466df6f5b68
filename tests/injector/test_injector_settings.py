"""The injector's settings (flags, a file) and the agent's config from an environment
variable, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from injectorproc import REPO

from agent.errors import ConfigError
from agent.injector.settings import parse_settings

TLS = {"tls_cert": "/tls/tls.crt", "tls_key": "/tls/tls.key"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_settings_defaults_and_flags_over_the_file() -> None:
    settings = parse_settings(
        {**TLS, "image": "from-file", "on_invalid": "warn"}, {"image": "flag"}
    )
    assert settings.image == "flag" and settings.on_invalid == "warn"
    assert settings.listen == ("0.0.0.0", 8443) and settings.vault_compat is True
    assert settings.resources.spec() == {
        "requests": {"cpu": "10m", "memory": "48Mi"},
        "limits": {"memory": "96Mi"},
    }


def test_every_settings_problem_names_its_key() -> None:
    raw = {
        "listen": "nowhere",
        "on_invalid": "shrug",
        "resources": {"limits": {"memory": "lots"}, "requests": {"gpu": 1}},
        "run_as_user": 0,
        "token_expiration": 60,
        "vault_address": "openbao:8200",
        "annotation_prefix": "Not_A_Domain",
        "colour": "blue",
    }
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    problems = "\n".join(info.value.problems)
    for expected in (
        "injector.tls_cert: is required",
        "injector.tls_key: is required",
        'injector.listen: "nowhere" is not host:port',
        'injector.on_invalid: "shrug" is not one of deny, warn',
        'injector.resources.limits.memory: "lots" is not a Kubernetes quantity',
        "injector.resources.requests.gpu: unknown key",
        "injector.run_as_user: 0 is root",
        "injector.token_expiration: 60 is shorter than 600 seconds",
        'injector.vault_address: "openbao:8200" is not an http:// or https:// URL',
        'injector.annotation_prefix: "Not_A_Domain" is not a lowercase DNS name',
        "injector.colour: unknown key",
    ):
        assert expected in problems, f"{expected!r} not in:\n{problems}"


def test_the_injector_command_reports_bad_settings_and_unreadable_tls(tmp_path: Path) -> None:
    bad = tmp_path / "settings.yaml"
    bad.write_text("on_invalid: shrug\n")
    done = cli("injector", "-c", str(bad), "--tls-cert", "/x", "--tls-key", "/y")
    assert done.returncode == 2
    assert 'injector.on_invalid: "shrug" is not one of deny, warn' in done.stderr
    done = cli(
        "injector",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        str(tmp_path / "none.crt"),
        "--tls-key",
        str(tmp_path / "none.key"),
    )
    assert done.returncode == 1 and "none.crt" in done.stderr and "Traceback" not in done.stderr


def test_run_and_check_read_a_config_from_the_environment(tmp_path: Path) -> None:
    config = json.dumps(
        {
            "secrets": {"db-admin": {"kind": "file", "path": str(tmp_path / "creds.json")}},
            "templates": [
                {
                    "destination": str(tmp_path / "out"),
                    "contents": '{{ secrets["db-admin"].user }}',
                    "allow_disk": True,
                }
            ],
            "state_dir": str(tmp_path / "state"),
        }
    )
    (tmp_path / "creds.json").write_text('{"user": "alice"}')
    done = cli("check", "--config-env", "GENERATED", env={"GENERATED": config})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("$GENERATED: ok (1 secrets, 1 templates)")
    done = cli("run", "--config-env", "GENERATED", "--once", env={"GENERATED": config})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out").read_text() == "alice"

    done = cli("check", "--config-env", "NOT_SET_ANYWHERE")
    assert (
        done.returncode == 2
        and "the environment variable NOT_SET_ANYWHERE is not set" in done.stderr
    )
    done = cli("check", "--config-env", "GENERATED", env={"GENERATED": "secrets: [unclosed"})
    assert (
        done.returncode == 2 and "$GENERATED:1:" in done.stderr and "malformed YAML" in done.stderr
    )
    done = cli("check", "-c", "x.yaml", "--config-env", "GENERATED")
    assert done.returncode == 2  # one source or the other, never both
