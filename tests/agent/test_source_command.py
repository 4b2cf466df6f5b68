"""``kind: command``: a JSON object from a command's stdout, refreshed, bounded in time and
size, run without our Vault token; failures keep the last good value."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from agentproc import run_once

from agent.commands import DEFAULT_MAX_OUTPUT, Command, CommandError, run
from agent.config import parse_config
from agent.errors import ConfigError

SCRIPT = """
import json, os, sys, time
mode = open(sys.argv[1]).read().strip()
if mode == "fail":
    sys.exit(3)
if mode == "garbage":
    print("not json: s3cr3t-value")
elif mode == "env":
    print(json.dumps({"env": sorted(os.environ)}))
elif mode == "flood":
    sys.stdout.write("x" * (2 * 1024 * 1024))
elif mode == "hang":
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1] + ".pid", "w").write(str(child.pid))
    time.sleep(600)
else:
    print(json.dumps({"username": "svc", "password": mode}))
"""


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    """(the file that tells the fake store what to print, the argv of the command)."""
    script, state = tmp_path / "store.py", tmp_path / "state"
    script.write_text(SCRIPT)
    state.write_text("pw-one")
    return state, (sys.executable, str(script), str(state))


async def test_fields_come_from_stdout_and_changes_are_picked_up(
    store: Any, make_source: Any, events: Any, until: Any, run: Any
) -> None:
    state, argv = store
    source, published = make_source("ext", "command", "", command=argv, refresh=0.2)
    first = await source.start()
    assert first.data == {"username": "svc", "password": "pw-one"} and first.version == "1"
    async with run(source):
        state.write_text("pw-two")
        value = await published.wait_for(lambda v: v.data.get("password") == "pw-two")
        assert value.version == "2"
        state.write_text("garbage")  # a broken store: the last good value stays
        await until(lambda: events.named("source_failed", secret="ext"), 10, "a failed run")
        state.write_text("pw-two")
        await until(lambda: len(events.named("source_failed", secret="ext")) == 1, 5, "no more")
    assert [v.version for v in published.values] == ["2"]  # unchanged runs publish nothing
    assert source.current is not None and source.current.data["password"] == "pw-two"
    failure = events.named("source_failed", secret="ext")[0]
    assert "not a JSON object" in failure.error and "s3cr3t" not in failure.error


async def test_a_failing_command_keeps_the_last_value(store: Any, make_source: Any) -> None:
    state, argv = store
    source, _ = make_source("ext", "command", "", command=argv, refresh=0.1)
    await source.start()
    state.write_text("fail")
    with pytest.raises(CommandError, match="exited with 3"):
        await source.fetch()
    assert source.current is not None and source.current.data["password"] == "pw-one"


async def test_the_timeout_kills_the_whole_process_group(store: Any, until: Any) -> None:
    state, argv = store
    state.write_text("hang")
    with pytest.raises(CommandError, match=r"timed out after 1s"):
        await run(Command(argv, 1.0), capture=True)
    pid = int(Path(str(state) + ".pid").read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # reaped by init soon

    await until(gone, 10, "the grandchild to die")


async def test_output_is_capped(store: Any) -> None:
    state, argv = store
    state.write_text("flood")
    with pytest.raises(CommandError, match=f"stdout exceeds {DEFAULT_MAX_OUTPUT} bytes"):
        await run(Command(argv, 30.0), capture=True)


async def test_the_child_gets_no_vault_token(
    store: Any, monkeypatch: pytest.MonkeyPatch, make_source: Any
) -> None:
    state, argv = store
    state.write_text("env")
    monkeypatch.setenv("VAULT_TOKEN", "hvs.not-for-children")
    monkeypatch.setenv("SOME_TOOL_TOKEN", "for-the-tool")  # the command's own login stays
    source, _ = make_source("ext", "command", "", command=argv)
    value = await source.start()
    assert "VAULT_TOKEN" not in value.data["env"] and "SOME_TOOL_TOKEN" in value.data["env"]


def test_config_needs_a_command_and_no_vault(tmp_path: Path) -> None:
    cfg = parse_config(
        {"secrets": {"ext": {"kind": "command", "command": ["op", "read", "x"], "refresh": "1m"}}},
        base_dir=tmp_path,
        env={},
    )
    assert cfg.vault is None and not cfg.needs_vault()
    assert cfg.secrets["ext"].command == ("op", "read", "x") and cfg.secrets["ext"].refresh == 60
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"secrets": {"ext": {"kind": "command", "command": "op read x", "path": "p"}}},
            base_dir=tmp_path,
            env={},
        )
    assert any(
        p.startswith("secrets.ext.command: ") and "no shell" in p for p in info.value.problems
    )
    assert any(p.startswith("secrets.ext.path: unknown key") for p in info.value.problems)
    assert json.dumps(info.value.problems)  # plain strings


# ----------------------------------------------------------------- README recipes, by shape
# Stand-ins for gcloud, az, op and infisical: each checks the arguments the recipe passes
# and prints the shape of the tool's documented JSON output. Not the real services.

STAND_INS = {
    "gcloud": (
        ["secrets", "versions", "access", "latest", "--secret=app-db"],
        {"username": "app", "password": "gcp-pw"},
    ),
    "az": (
        ["keyvault", "secret", "show", "--name", "app-db", "--output", "json"],
        {
            "attributes": {"enabled": True},
            "id": "https://my-vault.vault.azure.net/secrets/app-db/0123",
            "name": "app-db",
            "tags": {},
            "value": "azure-pw",
        },
    ),
    "infisical": (
        ["export", "--format", "json"],
        [
            {"key": "DB_PASSWORD", "value": "infisical-pw", "type": "shared"},
            {"key": "DB_USER", "value": "app", "type": "shared"},
        ],
    ),
}
OP_ITEM = {
    "id": "abc",
    "title": "app-db",
    "category": "LOGIN",
    "fields": [
        {"id": "username", "label": "username", "type": "STRING", "value": "app"},
        {"id": "password", "label": "password", "type": "CONCEALED", "value": "op-pw"},
    ],
}
STAND_IN = """#!{python}
import json, sys
expected, output = json.loads({spec!r})
args = sys.argv[1:]
if not all(a in args for a in expected):
    sys.exit(2)  # the recipe would not work with the real tool either
print(json.dumps(output))
"""
OP = """#!{python}
import json, sys
args = sys.argv[1:]
json_mode = "--format" in args and args[args.index("--format") + 1] == "json"
if args[:2] == ["item", "get"] and json_mode:
    print({item!r})
elif args[:1] == ["read"] and args[1].startswith("op://"):
    print(json.dumps({{"username": "app", "password": "op-cfg-pw"}}))
else:
    sys.exit(2)
"""


def readme_recipes() -> dict[str, Any]:
    import yaml

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("# recipes (tested by shape)")
    block = text[start : text.index("```", start)]
    return dict(yaml.safe_load(block))


def test_the_readme_recipes_work_on_stand_ins(
    tmp_path: Path, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, spec in STAND_INS.items():
        (bin_dir / tool).write_text(STAND_IN.format(python=sys.executable, spec=json.dumps(spec)))
    (bin_dir / "op").write_text(OP.format(python=sys.executable, item=json.dumps(OP_ITEM)))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    config = readme_recipes()
    assert set(config["secrets"]) == {"gcp", "azure", "onepw", "onepw_cfg", "infisical"}
    config["templates"][0]["destination"] = str(shm / "recipes.txt")
    config["state_dir"] = str(shm / "state")
    out = run_once(config, tmp_path, dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert out.returncode == 0, out.stderr
    assert (shm / "recipes.txt").read_text().split() == [
        "gcp=gcp-pw",
        "azure=azure-pw",
        "onepw=op-pw",
        "onepw_cfg=op-cfg-pw",
        "infisical=infisical-pw",
    ]
