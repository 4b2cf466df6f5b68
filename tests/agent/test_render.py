"""Templates: context, filters (checked by the real consumers: sh, psql, asyncpg),
errors that never carry a secret value, and which secrets a template uses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from devservers import AUDIT, PostgresCluster, pg_bindir

from agent.config import TemplateConfig
from agent.errors import RenderError
from agent.render import Template
from agent.secret import SecretValue

# every character the quoting filters must survive
NASTY = 'p@ss:w/o\'rd\\ %x "q" $HOME `id` ;&|=#?'
AUDIT.secret(NASTY)


def template(contents: str, **options: Any) -> Template:
    return Template(
        TemplateConfig(destination=Path("/dev/shm/app/t.conf"), contents=contents, **options)
    )


def db(username: str = "app_user", password: str = NASTY, **extra: object) -> SecretValue:
    return SecretValue(
        name="db",
        data={"username": username, "password": password, **extra},
        version="database/creds/app/abc",
        issued_at=1000.0,
        expires_at=1006.0,
        lease_id="database/creds/app/abc",
        lease_duration=6.0,
        renewable=True,
    )


def render(contents: str, *secrets: SecretValue, **options: Any) -> str:
    return template(contents, **options).render({s.name: s for s in secrets}).decode()


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ("{{ secrets.db.username }}", "app_user"),
        ("{{ secrets.db.lease.id }} {{ secrets.db.lease.duration }}", "database/creds/app/abc 6.0"),
        ("{{ secrets.db.lease.renewable }} {{ secrets.db.lease.expires_at }}", "True 1006.0"),
        ("{{ secrets.db.username }}\n", "app_user\n"),  # trailing newline kept
        ("{{ '<&>' }}", "<&>"),  # no autoescape
        ('{{ {"b": 1, "a": [1, "x"]} | tojson }}', '{"a":[1,"x"],"b":1}'),
        ('{{ {"b": 1, "a": 2} | tojson(indent=1) }}', '{\n "a": 2,\n "b": 1\n}'),
        ('{{ "it\'s" | shell_quote }}', "'it'\\''s'"),
        ("{{ 'a\"b$c`d\\\\e\nf' | env_quote }}", '"a\\"b\\$c\\`d\\\\e\\nf"'),
        ("{{ 'hello' | b64encode }}", "aGVsbG8="),
        ("{{ 'aGVsbG8=' | b64decode }}", "hello"),
        (
            '{{ secrets.db | pgpass(host="db.local", port=5432, database="app") }}',
            'db.local:5432:app:app_user:p@ss\\:w/o\'rd\\\\ %x "q" $HOME `id` ;&|=#?',
        ),
        (
            '{{ secrets.db | libpq_dsn(host="db", port=5432, dbname="app", sslmode="require") }}',
            "host=db port=5432 dbname=app user=app_user "
            "password='p@ss:w/o\\'rd\\\\ %x \"q\" $HOME `id` ;&|=#?' sslmode=require",
        ),
        (
            '{{ secrets.db | pg_uri(host="::1", port=5432, database="app", sslmode="require") }}',
            "postgresql://app_user:p%40ss%3Aw%2Fo%27rd%5C%20%25x%20%22q%22%20%24HOME%20%60id%60"
            "%20%3B%26%7C%3D%23%3F@[::1]:5432/app?sslmode=require",
        ),
    ],
)
def test_context_and_filters_render_byte_exact(contents: str, expected: str) -> None:
    assert render(contents, db()) == expected


def test_equal_data_renders_equal_bytes() -> None:
    tmpl = template("{{ secrets.db | tojson }}")
    a = tmpl.render({"db": db(extra_b=1, extra_a=2)})
    reordered = SecretValue(
        **{
            **db().__dict__,
            "data": {"extra_a": 2, "password": NASTY, "extra_b": 1, "username": "app_user"},
        }
    )
    assert tmpl.render({"db": reordered}) == a


@pytest.mark.parametrize("value", [NASTY, "", "'", "a\nb", "tab\there", "ünïcødé"])
def test_shell_quote_is_one_word_for_sh(value: str) -> None:
    script = render(
        "printf %s {{ secrets.s.v | shell_quote }}", SecretValue("s", {"v": value}, "1")
    )
    out = subprocess.run(["sh", "-s"], input=script.encode(), capture_output=True, check=True)
    assert out.stdout.decode() == value


@pytest.mark.parametrize("value", [NASTY, "", "plain", "back\\slash\\"])
def test_env_quote_reads_back_through_sh(value: str, tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text(
        render("X={{ secrets.s.v | env_quote }}\n", SecretValue("s", {"v": value}, "1"))
    )
    out = subprocess.run(
        ["sh", "-s"],
        input=f'. "{env_file}"; printf %s "$X"'.encode(),
        capture_output=True,
        check=True,
    )
    assert out.stdout.decode() == value


@pytest.fixture(scope="module")
def nasty_role(postgres: PostgresCluster) -> SecretValue:
    """A real login whose user and password need every kind of quoting."""
    user = "render user:1\\x"
    sql_user = user.replace('"', '""')
    sql_password = NASTY.replace("'", "''")
    postgres.psql(f'DROP ROLE IF EXISTS "{sql_user}"')
    postgres.psql(f"CREATE ROLE \"{sql_user}\" LOGIN PASSWORD '{sql_password}'")
    return SecretValue("db", {"username": user, "password": NASTY}, "1")


def psql(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [str(pg_bindir() / "psql"), "-X", "-A", "-t", "-w", *args, "-c", "SELECT current_user"],
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")} | (env or {}),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_pgpass_line_logs_in_with_psql(
    postgres: PostgresCluster, nasty_role: SecretValue, tmp_path: Path
) -> None:
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(
        render(
            "{{ secrets.db | pgpass(host='127.0.0.1', port=" + str(postgres.port) + ") }}\n",
            nasty_role,
        )
    )
    pgpass.chmod(0o600)
    user = nasty_role.data["username"]
    args = ["-h", "127.0.0.1", "-p", str(postgres.port), "-U", user, "-d", "postgres"]
    assert psql(*args, env={"PGPASSFILE": str(pgpass)}) == user


def test_libpq_dsn_logs_in_with_psql(postgres: PostgresCluster, nasty_role: SecretValue) -> None:
    dsn = render(
        "{{ secrets.db | libpq_dsn(host='127.0.0.1', port="
        + str(postgres.port)
        + ", dbname='postgres') }}",
        nasty_role,
    )
    assert psql("-d", dsn) == nasty_role.data["username"]


async def test_pg_uri_logs_in_with_asyncpg(
    postgres: PostgresCluster, nasty_role: SecretValue
) -> None:
    uri = render(
        "{{ secrets.db | pg_uri(host='127.0.0.1', port="
        + str(postgres.port)
        + ", database='postgres') }}",
        nasty_role,
    )
    conn = await asyncpg.connect(uri)
    try:
        assert await conn.fetchval("SELECT current_user") == nasty_role.data["username"]
    finally:
        await conn.close()


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("contents", "line", "reason"),
    [
        ("ok\n{{ secrets.db.missing }}", 2, "has no attribute 'missing'"),
        ("{{ secrets.other.password }}", 1, "has no attribute 'other'"),
        ("a\nb\n{{ secrets.db.password + 1 }}", 3, "TypeError"),
        ("{{ ''.__class__.__mro__ }}", 1, "SecurityError"),
        ("{{ secrets.db.password.__class__ }}", 1, "unsafe"),
        ("{{ {}[secrets.db.password] }}", 1, "has no attribute"),  # Jinja quotes the key
        ("{{ secrets.db.password | b64decode }}", 1, "not base64"),
        ("{{ secrets.db | pgpass(password=secrets.db) }}", 1, "must be a string"),
        ("{{ secrets.db.password | shell_quote | int(x) }}", 1, "'x' is undefined"),
    ],
)
def test_render_errors_name_template_and_line_never_the_value(
    contents: str, line: int, reason: str
) -> None:
    with pytest.raises(RenderError) as info:
        render(contents, db())
    message = str(info.value)
    assert message.startswith(f"template /dev/shm/app/t.conf line {line}: ")
    assert reason in message
    assert NASTY not in message and "p@ss" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_short_secret_in_a_message_hides_the_message() -> None:
    with pytest.raises(RenderError) as info:
        render("{{ {}[secrets.db.password] }}", db(password="ab1"))
    assert "ab1" not in str(info.value)
    assert "hidden" in str(info.value)


@pytest.mark.parametrize(
    ("contents", "reason"),
    [
        ("{{ secrets.db.password | no_such_filter }}", "No filter named 'no_such_filter'"),
        ("line\n{% if %}", "Expected an expression"),
        ("{{ secrets.db.password", "unexpected end of template"),
    ],
)
def test_compile_errors_are_raised_at_construction(contents: str, reason: str) -> None:
    with pytest.raises(RenderError, match=reason) as info:
        template(contents)
    assert str(info.value).startswith("template /dev/shm/app/t.conf line ")


def test_source_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "db.conf.j2"
    source.write_text("user={{ secrets.db.username }}\n\n{% for %}\n")
    with pytest.raises(RenderError) as info:
        Template(TemplateConfig(destination=Path("/dev/shm/app/db.conf"), source=source))
    assert str(info.value).startswith(f"template /dev/shm/app/db.conf (source {source}) line 3:")

    source.unlink()
    with pytest.raises(RenderError, match=r"cannot read source .*No such file"):
        Template(TemplateConfig(destination=Path("/dev/shm/app/db.conf"), source=source))


def test_missing_keys_render_empty_when_allowed() -> None:
    out = render(
        "[{{ secrets.db.nope }}][{{ secrets.gone.a.b }}]", db(), error_on_missing_key=False
    )
    assert out == "[][]"


def test_sandbox_holds_when_missing_keys_are_allowed() -> None:
    # an unsafe attribute is Undefined in the lax mode: it renders as nothing, never the object
    out = render(
        "{{ ''.__class__.__mro__ }}|{{ secrets.db.password.__class__ }}",
        db(),
        error_on_missing_key=False,
    )
    assert out == "|"


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("contents", "names", "dynamic"),
    [
        ("{{ secrets.db.username }} {{ secrets['api'].key }}", {"db", "api"}, False),
        ("{% set s = secrets.tls %}{{ s.cert }}{{ s.key }}", {"tls"}, False),
        ("{% if secrets.kv.flag %}{{ secrets.db | pgpass }}{% endif %}", {"kv", "db"}, False),
        ("static text", set(), False),
        ("{% for name, s in secrets.items() %}{{ name }}{% endfor %}", set(), True),
        ("{{ secrets | tojson }}", set(), True),
        ("{% set n = 'db' %}{{ secrets[n].username }} {{ secrets.api.key }}", {"api"}, True),
    ],
)
def test_secret_names(contents: str, names: set[str], dynamic: bool) -> None:
    tmpl = template(contents)
    assert tmpl.secret_names() == names
    assert tmpl.dynamic is dynamic


# --------------------------------------------------------------------------- bounds

LOOP = (
    "{% for i in range(4000) %}{% for j in range(4000) %}"
    "{{ secrets.db.password }}{% endfor %}{% endfor %}"
)


def test_output_past_max_size_is_a_clear_error() -> None:
    with pytest.raises(RenderError, match=r"output exceeds max_size \(4194304 bytes\)"):
        template(LOOP).render({"db": db()})  # the default cap: 4 MiB
    with pytest.raises(RenderError, match=r"output exceeds max_size \(100 bytes\)"):
        render("{{ secrets.db.password }}" * 3, db(), max_size=100)
    assert render("{{ secrets.db.username }}", db(), max_size=8) == "app_user"  # exactly fits


@pytest.mark.parametrize(
    ("contents", "what"),
    [
        ('{{ "x" * 200000000 }}', "the '\\*' operation"),
        ('{{ ("x" * 4000000) + ("y" * 4000000) }}', "the '\\+' operation"),
        ("{{ 10 ** 100000000 }}", "the '\\*\\*' operation"),
        ('{{ "%200000000s" % "x" }}', "the '%' operation"),
        ('{{ "x".ljust(200000000) }}', "str.ljust"),
        ('{{ "{:>200000000}".format("x") }}', "str.format"),
        ('{{ ("x" * 3000000).replace("x", "yy") }}', "str.replace"),
        ('{{ "x" | center(200000000) }}', "the center filter"),
        ('{{ ("a\\n" * 1000000) | indent(8) }}', "the indent filter"),
    ],
)
def test_amplifying_operations_are_refused_before_they_allocate(contents: str, what: str) -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(RenderError, match=f"{what}.* would exceed max_size"):
            template(contents).render({"db": db()})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, f"{peak} bytes allocated on the way to the refusal"


def test_a_render_stops_when_told_from_another_thread() -> None:
    import threading

    stop = threading.Event()
    slow = template(
        "{% for i in range(4000) %}{% for j in range(4000) %}"
        "{% if secrets.db.password == 'x' %}x{% endif %}{% endfor %}{% endfor %}"
    )
    errors: list[RenderError] = []

    def run() -> None:
        try:
            slow.render({"db": db()}, stop)
        except RenderError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    stop.set()  # a 16-million-step loop: it can only end early by noticing this
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(errors) == 1 and "stopped: the agent is shutting down" in str(errors[0])


def test_a_max_size_in_the_config_is_read_and_checked(tmp_path: Path) -> None:
    from agent.config import ConfigError, parse_config

    dest = str(tmp_path / "out")
    config = parse_config(
        {"templates": [{"destination": dest, "contents": "x", "max_size": 1024}]},
        base_dir=tmp_path,
        env={},
    )
    assert config.templates[0].max_size == 1024
    assert (
        parse_config(
            {"templates": [{"destination": dest, "contents": "x"}]}, base_dir=tmp_path, env={}
        )
        .templates[0]
        .max_size
        == 4 * 1024 * 1024
    )
    with pytest.raises(ConfigError, match=r"templates\[0\]\.max_size"):
        parse_config(
            {"templates": [{"destination": dest, "contents": "x", "max_size": 0}]},
            base_dir=tmp_path,
            env={},
        )
