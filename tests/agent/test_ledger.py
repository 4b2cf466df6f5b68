"""The lease ledger: round trips, permissions, retired leases, corrupt files."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from agent.ledger import RETIRED_FILE, Ledger
from agent.secret import SecretValue


def value(name: str = "db", **kw: Any) -> SecretValue:
    base: dict[str, Any] = {
        "name": name,
        "data": {"username": "v-app-1", "password": "pw-ledger-secret"},
        "version": "database/creds/app/abc",
        "issued_at": 1000.0,
        "expires_at": 1006.0,
        "lease_id": "database/creds/app/abc",
        "lease_duration": 6.0,
        "renewable": True,
    }
    base.update(kw)
    return SecretValue(**base)


def test_round_trip_with_strict_permissions(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "state")
    ledger.save(value(), token_expires_at=2000.0, token_accessor="acc")
    entry = ledger.load_entry("db")
    assert entry is not None and entry.value == value()
    assert entry.token_expires_at == 2000.0
    assert entry.token_accessor == "acc"
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "db.json").stat().st_mode) == 0o600


def test_missing_and_forgotten(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.load_entry("db") is None
    ledger.save(value())
    ledger.forget("db")
    ledger.forget("db")  # twice is fine
    assert ledger.load_entry("db") is None


def test_corrupt_or_foreign_files_are_ignored_and_logged(tmp_path: Path, caplog: Any) -> None:
    ledger = Ledger(tmp_path)
    (tmp_path / "db.json").write_text('{"name": "db", "data": {"password": "half-writ')
    assert ledger.load_entry("db") is None
    (tmp_path / "db.json").write_text(json.dumps({"name": "db"}))
    assert ledger.load_entry("db") is None
    ledger.save(value(name="other"))
    (tmp_path / "db.json").write_text((tmp_path / "other.json").read_text())
    assert ledger.load_entry("db") is None  # a file renamed by hand is not adopted
    corrupt = [r for r in caplog.records if r.getMessage() == "ledger_corrupt"]
    assert len(corrupt) == 3
    assert all("half-writ" not in str(r.__dict__) for r in caplog.records)


def test_retired_leases_survive_a_new_ledger_object(tmp_path: Path) -> None:
    Ledger(tmp_path).add_retired("database/creds/app/old1", 50.0)
    Ledger(tmp_path).add_retired("database/creds/app/old2", 60.0)
    ledger = Ledger(tmp_path)
    assert ledger.retired() == {"database/creds/app/old1": 50.0, "database/creds/app/old2": 60.0}
    ledger.remove_retired("database/creds/app/old1")
    ledger.remove_retired("database/creds/app/unknown")
    assert Ledger(tmp_path).retired() == {"database/creds/app/old2": 60.0}
    (tmp_path / RETIRED_FILE).write_text("[")
    assert Ledger(tmp_path).retired() == {}  # a corrupt list is ignored (and logged)


def test_names_cannot_escape_the_state_dir(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "s")
    try:
        ledger.load_entry("../etc")
    except ValueError:
        pass
    else:
        raise AssertionError("a path-like name was accepted")


def test_a_full_state_volume_keeps_the_lease_in_memory_and_says_the_ledger_is_stale(
    tiny_volume: Any, caplog: Any
) -> None:
    """ENOSPC on state_dir (a real full tmpfs): nothing raises, nothing is lost in memory."""
    ledger = Ledger(tiny_volume.path / "state")
    assert ledger.save(value()) is True
    tiny_volume.fill()
    renewed = value(expires_at=2000.0)
    assert ledger.save(renewed) is False  # the renewal is not on disk...
    assert ledger.save(value(expires_at=3000.0)) is False
    ledger.add_retired("database/creds/app/old", 50.0)
    assert ledger.retired() == {"database/creds/app/old": 50.0}  # ...but kept in memory
    assert ledger.stale == {"db", "retired-leases"}
    assert stale_gauge("db") == 1.0
    warnings = [r for r in caplog.records if r.getMessage() == "ledger_write_failed"]
    assert [(r.entry, r.error) for r in warnings] == [  # once per entry, not per write
        ("db", "No space left on device"),
        ("retired-leases", "No space left on device"),
    ]
    tiny_volume.free()
    assert ledger.save(renewed) is True  # the next write catches up
    assert ledger.stale == {"retired-leases"} and stale_gauge("db") == 0.0
    entry = ledger.load_entry("db")
    assert entry is not None and entry.value == renewed


def stale_gauge(entry: str) -> float | None:
    from agent.metrics import REGISTRY

    return REGISTRY.get_sample_value("credsidecar_ledger_stale", {"entry": entry})
