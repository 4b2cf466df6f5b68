"""Config validation: every problem is reported with its key path and the bad value."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import load_config, parse_config, parse_duration
from agent.errors import ConfigError

BASE = {
    "vault": {"address": "http://127.0.0.1:8200", "auth": {"method": "token", "token_file": "t"}},
    "secrets": {"db": {"kind": "database", "path": "database/creds/app"}},
    "templates": [{"destination": "/dev/shm/x/db.json", "contents": "{{ secrets.db.username }}"}],
}


def problems_of(raw: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=Path("/cfg"), env=env or {})
    return info.value.problems


def test_valid_config_parses() -> None:
    config = parse_config(BASE, base_dir=Path("/cfg"), env={})
    assert config.vault is not None
    assert config.vault.auth.token_file == Path("/cfg/t")
    assert config.secrets["db"].kind == "database"
    assert config.templates[0].perms == 0o600
    assert config.state_dir == Path("/dev/shm/credsidecar")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("200ms", 0.2), ("30s", 30), ("5m", 300), ("1h30m", 5400), (7, 7), (1.5, 1.5), ("2d", 172800)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5 minutes", "-1s", "1x", True, [], "s"])
def test_bad_durations_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_duration_roundtrip(n: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * factor)


def test_every_problem_is_reported_with_its_key_path() -> None:
    raw = {
        **BASE,
        "secrets": {
            "db": {"kind": "database", "path": "database/creds/app", "refesh": "1s"},
            "api": {"kind": "kv", "path": "secret/data/app", "refresh": "soon"},
            "tls": {"kind": "nope", "path": "x"},
        },
        "templates": [
            {"destination": "/dev/shm/a", "contents": "x"},
            {"destination": "/dev/shm/b", "contents": "x", "perms": "0999"},
            {"destination": "/dev/shm/c"},
        ],
        "notify": {
            "app": {"signal": "SIGNOPE", "pid_file": "/p", "wait": {"min": "2s", "max": "1s"}}
        },
        "bogus": 1,
    }
    problems = problems_of(raw)
    expected = [
        "secrets.db.refesh: unknown key",
        'secrets.api.refresh: "soon" is not a duration',
        'secrets.tls.kind: "nope" is not one of',
        'templates[1].perms: "0999" is not an octal mode',
        "templates[2]: needs exactly one of contents or source",
        'notify.app.signal: "SIGNOPE" is not a signal name',
        "notify.app.wait.max: 1s is shorter than min 2s",
        "bogus: unknown key",
    ]
    for fragment in expected:
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)
    assert len(problems) == len(expected), problems


def test_secret_values_are_not_echoed() -> None:
    raw = {**BASE, "vault": {"address": "http://x:1", "auth": {"token": ["s3cr3t-token"]}}}
    problems = problems_of(raw)
    assert "vault.auth.token: (value hidden)" in problems
    assert not any("s3cr3t" in p for p in problems)


def test_vault_environment_is_honoured() -> None:
    raw = {k: v for k, v in BASE.items() if k != "vault"}
    env = {
        "VAULT_ADDR": "https://vault.example:8200/",
        "VAULT_TOKEN": "hvs.from-env",
        "VAULT_CACERT": "/etc/ca.pem",
        "VAULT_NAMESPACE": "team-a",
    }
    config = parse_config(raw, base_dir=Path("/cfg"), env=env)
    assert config.vault is not None
    assert config.vault.address == "https://vault.example:8200"
    assert config.vault.auth.token == "hvs.from-env"
    assert config.vault.ca_cert == Path("/etc/ca.pem")
    assert config.vault.namespace == "team-a"
    assert "hvs.from-env" not in repr(config)


def test_config_beats_environment() -> None:
    env = {"VAULT_ADDR": "http://env:1", "VAULT_TOKEN": "env-token"}
    config = parse_config(BASE, base_dir=Path("/cfg"), env=env)
    assert config.vault is not None
    assert config.vault.address == "http://127.0.0.1:8200"
    assert config.vault.auth.token is None


def test_missing_vault_address_says_how_to_fix() -> None:
    raw = {k: v for k, v in BASE.items() if k != "vault"}
    problems = problems_of(raw, env={"VAULT_TOKEN": "x"})
    assert problems == ["vault.address: is required (or set VAULT_ADDR)"]


def test_file_only_config_needs_no_vault() -> None:
    raw = {"secrets": {"dev": {"kind": "file", "path": "creds.json"}}}
    config = parse_config(raw, base_dir=Path("/cfg"), env={})
    assert config.vault is None
    assert config.secrets["dev"].path == "/cfg/creds.json"


def test_notify_and_exec_parse() -> None:
    raw = {
        **BASE,
        "notify": {"app": {"signal": "usr1", "process": "^python app", "wait": "500ms"}},
        "exec": {"command": ["python", "app.py"], "reload": "restart"},
    }
    config = parse_config(raw, base_dir=Path("/cfg"), env={})
    assert config.notify["app"].signal == signal.SIGUSR1
    assert config.notify["app"].wait.min == pytest.approx(0.5)
    assert config.exec is not None and config.exec.reload == "restart"


def test_a_template_names_the_notifiers_it_triggers() -> None:
    template = {"destination": "/dev/shm/x/a", "contents": "{{ secrets.db.username }}"}
    raw = {
        **BASE,
        "templates": [
            {**template, "notify": ["app", "exec"]},
            {**template, "destination": "/dev/shm/x/b", "notify": []},
            {**template, "destination": "/dev/shm/x/c"},
        ],
        "notify": {"app": {"pid": 4}},
        "exec": {"command": ["app"]},
    }
    config = parse_config(raw, base_dir=Path("/cfg"), env={})
    assert [t.notify for t in config.templates] == [("app", "exec"), (), None]  # None: all


def test_unknown_notifier_names_are_refused_with_their_key_path() -> None:
    template = {"destination": "/dev/shm/x/a", "contents": "{{ secrets.db.username }}"}
    raw = {
        **BASE,
        "templates": [
            {**template, "notify": ["app", "ap", "exec"]},
            {**template, "destination": "/dev/shm/x/b", "notify": "app"},
        ],
        "notify": {"app": {"pid": 4}},
    }
    assert problems_of(raw) == [
        'templates[1].notify: "app" is not a list of notifier names',
        'templates[0].notify[1]: "ap" is not a notify target (known: app)',
        'templates[0].notify[2]: "exec" is not a notify target (known: app)',  # no exec section
    ]
    raw = {**BASE, "templates": [{**template, "notify": ["exec"]}], "exec": {"command": ["a"]}}
    raw["notify"] = {"exec": {"pid": 4}}  # a notifier may be called exec, but not named so then
    assert problems_of(raw) == [
        'templates[0].notify[0]: "exec" names both notify.exec and the exec child'
    ]


def test_exec_env_template_sets_templated_variables_beside_exec_env() -> None:
    raw = {
        **BASE,
        "exec": {
            "command": ["app"],
            "env": {"APP_MODE": "{{ literal }}"},  # the flat exec.env keeps meaning literal values
            "env_template": {"DATABASE_URL": "{{ secrets.db | libpq_dsn }}"},
        },
    }
    config = parse_config(raw, base_dir=Path("/cfg"), env={})
    assert config.exec is not None
    assert config.exec.env.set == {"APP_MODE": "{{ literal }}"}
    (variable,) = config.exec.env_template
    assert (variable.variable, variable.contents) == (
        "DATABASE_URL",
        "{{ secrets.db | libpq_dsn }}",
    )
    assert variable.name == "exec.env_template.DATABASE_URL" and variable.notify == ("exec",)


def test_exec_env_template_problems_name_their_key_path() -> None:
    exec_ = {"command": ["app"], "env": {"set": {"A": "1"}}}
    raw = {**BASE, "exec": {**exec_, "env_template": {"A": "{{ x }}", "1B": "x", "C": ["s3cr3t"]}}}
    assert problems_of(raw) == [
        "exec.env_template.1B: is not a variable name (letters, digits, _)",
        "exec.env_template.C: is not a string",
        "exec.env_template.A: is also set in exec.env: name it once",
    ]
    raw = {**BASE, "exec": {**exec_, "env_template": ["DATABASE_URL"]}}
    assert problems_of(raw) == ["exec.env_template: must be a mapping NAME: TEMPLATE"]


def test_exec_command_must_be_a_list() -> None:
    problems = problems_of({**BASE, "exec": {"command": "python app.py"}})
    assert len(problems) == 1
    assert problems[0].startswith("exec.command:")
    assert "list of strings (no shell)" in problems[0]


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("vault:\n  address: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:")
    assert "malformed YAML" in problem


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty, env={})
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml", env={})


@pytest.mark.parametrize("name", ["db-admin", "db.v2", "_x", "A9", "db-admin.v2"])
def test_secret_names_may_hold_dashes_and_dots(name: str, tmp_path: Path) -> None:
    from agent.ledger import Ledger
    from agent.render import Template
    from agent.secret import SecretValue

    raw = {
        **BASE,
        "secrets": {name: {"kind": "database", "path": "database/creds/app"}},
        "templates": [
            {"destination": "/dev/shm/x/db", "contents": f'{{{{ secrets["{name}"].username }}}}'}
        ],
    }
    config = parse_config(raw, base_dir=Path("/cfg"), env={})
    template = Template(config.templates[0])
    assert template.secret_names() == {name}
    value = SecretValue(name=name, data={"username": "u-1", "password": "p"}, version="1")
    assert template.render({name: value}) == b"u-1"
    ledger = Ledger(tmp_path / "state")  # the lease ledger keeps such a secret too
    ledger.save(value)
    loaded = ledger.load_entry(name)
    assert loaded is not None and loaded.value.data == value.data


@pytest.mark.parametrize("name", ["-x", ".x", "..", "a/b", "a b", "é", "retired-leases"])
def test_secret_names_that_cannot_be_files_are_refused(name: str) -> None:
    raw = {**BASE, "secrets": {name: {"kind": "database", "path": "database/creds/app"}}}
    raw["templates"] = []
    (problem,) = [p for p in problems_of(raw) if p.startswith(f"secrets.{name}:")]
    assert "name" in problem


# --------------------------------------------------------------------------- admin, env


def test_the_admin_api_is_a_socket_in_state_dir_by_default() -> None:
    config = parse_config({**BASE, "state_dir": "/dev/shm/s"}, base_dir=Path("/cfg"), env={})
    assert config.admin is not None
    assert config.admin.socket == Path("/dev/shm/s/admin.sock")
    assert config.admin.listen_host is None
    off = parse_config({**BASE, "admin": {"socket": False}}, base_dir=Path("/cfg"), env={})
    assert off.admin is None


def test_admin_tcp_needs_a_token_file() -> None:
    (loopback,) = problems_of({**BASE, "admin": {"listen": "127.0.0.1:8081"}})
    assert loopback.startswith("admin.token_file: is required with admin.listen")
    (open_,) = problems_of({**BASE, "admin": {"listen": "0.0.0.0:8081"}})
    assert "0.0.0.0 is not a loopback address" in open_
    config = parse_config(
        {**BASE, "admin": {"listen": "127.0.0.1:8081", "token_file": "admin-token"}},
        base_dir=Path("/cfg"),
        env={},
    )
    assert config.admin is not None
    assert (config.admin.listen_host, config.admin.listen_port) == ("127.0.0.1", 8081)
    assert config.admin.token_file == Path("/cfg/admin-token")


def test_env_of_children_parses_both_shapes() -> None:
    raw = {
        **BASE,
        "sensitive_env": ["DB_ADMIN_*"],
        "notify": {
            "cmd": {"command": ["/bin/reload"], "env": {"pass": ["PATH", "LC_*"], "set": {"A": 1}}}
        },
        "exec": {"command": ["app"], "env": {"APP_MODE": "demo"}},  # the older flat spelling
    }
    config = parse_config(raw, base_dir=Path("/cfg"), env={})
    env = config.notify["cmd"].env
    assert env.passed == ("PATH", "LC_*") and env.set == {"A": "1"}
    assert "DB_ADMIN_*" in env.sensitive and "VAULT_TOKEN" in env.sensitive
    assert config.exec is not None
    assert config.exec.env.passed is None and config.exec.env.set == {"APP_MODE": "demo"}
    assert "DB_ADMIN_*" in config.exec.env.sensitive


def test_env_problems_name_their_key_path_and_hide_values() -> None:
    raw = {
        **BASE,
        "sensitive_env": "VAULT_*",
        "notify": {
            "cmd": {"command": ["/bin/x"], "env": {"pass": "PATH", "set": {"1X": "v"}}},
            "sig": {"pid": 4, "env": {"set": {}}},
        },
        "exec": {"command": ["app"], "env": {"set": {"TOKEN": ["s3cr3t-value"]}, "extra": 1}},
    }
    found = problems_of(raw)
    assert 'sensitive_env: "VAULT_*" is not a list of variable names' in found
    assert 'notify.cmd.env.pass: "PATH" is not a list of variable names' in found
    assert "notify.cmd.env.set.1X: is not a variable name (letters, digits, _)" in found
    assert "notify.sig.env: applies to a command target only" in found
    assert "exec.env.set.TOKEN: is not a string" in found
    assert any(p.startswith("exec.env.extra: unknown key") for p in found)
    assert not any("s3cr3t" in p for p in found)
