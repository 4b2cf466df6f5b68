"""The state directory is ours or the agent does not start (issue 8, finding 6): the
checks on a real filesystem, with files owned by another uid where we may chown."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.ledger import RETIRED_FILE, Ledger
from agent.statedir import MAX_STATE_FILE, StateDirError, open_owned, prepare

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_creates_the_directory_0700(tmp_path: Path) -> None:
    path = tmp_path / "a" / "state"
    assert prepare(path) == path
    assert mode(path) == 0o700 and path.stat().st_uid == os.geteuid()
    prepare(path)  # again: fine


def test_an_own_directory_readable_by_others_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    prepare(path)
    assert mode(path) == 0o700


def test_a_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir()
    path.chmod(0o777)
    with pytest.raises(StateDirError, match=r"writable by group or others \(mode 0777\)"):
        prepare(path)
    assert mode(path) == 0o777  # refused, not "fixed": its contents cannot be trusted


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(real)
    with pytest.raises(StateDirError, match="is a symlink"):
        prepare(tmp_path / "state")


def test_entries_must_be_our_own_files(tmp_path: Path) -> None:
    path = prepare(tmp_path / "state")
    (path / "db.json").symlink_to("/etc/passwd")
    with pytest.raises(StateDirError, match=r"db\.json is a symlink"):
        prepare(path)
    (path / "db.json").unlink()
    (path / "db.json").write_text("{}")
    (path / "db.json").chmod(0o666)
    with pytest.raises(StateDirError, match=r"db\.json is a file writable by group or others"):
        prepare(path)


@as_root
def test_a_directory_of_another_uid_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(StateDirError, match=f"belongs to uid {NOBODY}, not to the agent"):
        prepare(path)


@as_root
def test_a_ledger_file_of_another_uid_is_refused(tmp_path: Path) -> None:
    path = prepare(tmp_path / "state")
    planted = path / RETIRED_FILE
    planted.write_text(json.dumps({"database/creds/app/victim": 0}))
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(StateDirError, match=f"{RETIRED_FILE} belongs to uid {NOBODY}"):
        Ledger(path)


def test_reads_never_follow_a_symlink_or_block_on_a_fifo(tmp_path: Path, caplog: Any) -> None:
    ledger = Ledger(tmp_path / "state")
    secret = tmp_path / "elsewhere.json"
    secret.write_text(json.dumps({"database/creds/app/victim": 0}))
    # planted after the start-up check (only root could, in a 0700 directory)
    (ledger.state_dir / RETIRED_FILE).symlink_to(secret)
    assert ledger.retired() == {}
    os.mkfifo(ledger.state_dir / "db.json", 0o600)
    assert ledger.load_entry("db") is None  # not a regular file: refused, not read
    refused = [r for r in caplog.records if r.getMessage() == "ledger_refused"]
    assert len(refused) == 2
    with pytest.raises(StateDirError, match="symlink"):
        open_owned(ledger.state_dir / RETIRED_FILE)


def test_a_state_file_has_a_size_bound(tmp_path: Path) -> None:
    path = prepare(tmp_path / "state")
    (path / "big.json").write_bytes(b" " * (MAX_STATE_FILE + 1))
    with pytest.raises(StateDirError, match="larger than"):
        open_owned(path / "big.json")
    assert open_owned(path / "absent.json") is None
