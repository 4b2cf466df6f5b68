"""File secrets (no Vault): JSON or YAML, watched with watchfiles; bad files ignored."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.errors import SidecarError


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_json_changes_are_published_and_bad_writes_ignored(
    tmp_path: Path, run: Any, make_source: Any, events: Any, until: Any
) -> None:
    path = tmp_path / "db.json"
    path.write_text(json.dumps({"username": "app", "password": "file-secret-one"}))
    # refresh of an hour: only the watcher can make this test see changes
    source, published = make_source("dev", "file", str(path), refresh=3600)
    first = await source.start()
    assert first.data == {"username": "app", "password": "file-secret-one"}
    async with run(source):
        replace_file(path, json.dumps({"username": "app", "password": "file-secret-two"}))
        await published.wait_for(lambda v: v.data["password"] == "file-secret-two", 30)

        # written in place and caught half-way: logged, ignored, last good value kept
        path.write_text('{"username": "app", "password": "file-sec')
        await until(lambda: events.named("file_invalid", secret="dev"), 30, "file_invalid")
        assert source.current.data["password"] == "file-secret-two"
        assert len(published.values) == 1
        invalid = events.named("file_invalid", secret="dev")
        assert all("file-sec" not in r.error for r in invalid)  # no contents in logs

        path.write_text(json.dumps({"username": "app", "password": "file-secret-three"}))
        await published.wait_for(lambda v: v.data["password"] == "file-secret-three", 30)


async def test_yaml_by_extension(
    tmp_path: Path, run: Any, make_source: Any, events: Any, until: Any
) -> None:
    path = tmp_path / "creds.yaml"
    path.write_text("username: app\npassword: yaml-secret-one\n")
    source, published = make_source("dev", "file", str(path), refresh=3600)
    assert (await source.start()).data == {"username": "app", "password": "yaml-secret-one"}
    async with run(source):
        replace_file(path, "username: app\npassword: [yaml-secret-broken\n")
        await until(lambda: events.named("file_invalid", secret="dev"), 30, "file_invalid")
        assert all("yaml-secret" not in r.error for r in events.named("file_invalid"))
        replace_file(path, "- a list\n- is not a mapping\n")
        await until(lambda: len(events.named("file_invalid", secret="dev")) >= 2, 30)
        replace_file(path, "username: app\npassword: yaml-secret-two\n")
        await published.wait_for(lambda v: v.data["password"] == "yaml-secret-two", 30)
    assert source.current.data["password"] == "yaml-secret-two"


async def test_refresh_polls_and_wake_reads_now(tmp_path: Path, run: Any, make_source: Any) -> None:
    path = tmp_path / "db.json"
    path.write_text('{"k": "file-poll-one"}')
    source, published = make_source("dev", "file", str(path), refresh=3600)
    await source.start()
    async with run(source):
        path.write_text('{"k": "file-poll-two"}')
        source.wake()
        await published.wait_for(lambda v: v.data["k"] == "file-poll-two", 30)


async def test_start_fails_clearly_on_a_missing_or_bad_file(
    tmp_path: Path, make_source: Any
) -> None:
    source, _ = make_source("dev", "file", str(tmp_path / "absent.json"))
    with pytest.raises(SidecarError, match=r"secrets\.dev: .*absent\.json: cannot read"):
        await source.start()
    bad = tmp_path / "bad.json"
    bad.write_text('{"password": "file-start-secret"')
    source, _ = make_source("dev", "file", str(bad))
    with pytest.raises(SidecarError, match="invalid JSON") as err:
        await source.start()
    assert "file-start-secret" not in str(err.value)
