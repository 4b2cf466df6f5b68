"""The lease ledger on the state dir, so a restarted agent adopts its leases.

One JSON file per secret (``<name>.json``) and one list of replaced leases still to
revoke (``retired-leases.json``; the config reserves that secret name). Files are
``0600`` in a ``0700`` directory: they hold the credential itself, because Vault
cannot hand a dynamic password out twice. The directory is checked by
:mod:`agent.statedir` (ours, not a symlink, not writable by others) and files are read
with ``O_NOFOLLOW``. A corrupt or refused file is logged and ignored; the worst case is
one extra lease.

A write that fails (the state volume is full, read-only, gone) never stops the agent:
the lease lives on in memory, and the ledger is reported stale (a warning, and
``credsidecar_ledger_stale{entry}`` at 1) until a later write of that entry succeeds.
The list of replaced leases is kept in memory too, so a failed write loses none.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import metrics
from agent.config import secret_name_problem
from agent.files import atomic_write
from agent.logs import event
from agent.secret import SecretValue
from agent.statedir import StateDirError, open_owned, prepare

RETIRED_FILE = "retired-leases.json"
RETIRED_ENTRY = "retired-leases"  # its name in metrics and logs


@dataclass(frozen=True)
class Entry:
    value: SecretValue
    # expiry of the token that created the lease, as last known: Vault revokes the
    # lease with that token, so an adopted lease must be replaced before it
    token_expires_at: float | None = None
    # accessor (not the token) of that token: a restart with the same token renews it
    token_accessor: str | None = None


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        """Raises StateDirError when ``state_dir`` is not safely ours."""
        self.state_dir = prepare(Path(state_dir))
        self._retired: dict[str, float] | None = None  # read once, then kept here
        self.stale: set[str] = set()  # entries whose last write failed

    # ------------------------------------------------------------------ secrets

    def load_entry(self, name: str) -> Entry | None:
        raw = self._read(self._path(name))
        if raw is None:
            return None
        try:
            value = SecretValue(
                name=str(raw["name"]),
                data=dict(raw["data"]),
                version=str(raw["version"]),
                issued_at=float(raw["issued_at"]),
                expires_at=_opt_float(raw.get("expires_at")),
                lease_id=raw.get("lease_id"),
                lease_duration=_opt_float(raw.get("lease_duration")),
                renewable=bool(raw.get("renewable", False)),
            )
            token_expires_at = _opt_float(raw.get("token_expires_at"))
            accessor = raw.get("token_accessor")
        except (KeyError, TypeError, ValueError) as exc:
            event("ledger_corrupt", logging.WARNING, file=self._path(name).name, error=repr(exc))
            return None
        if value.name != name:
            event("ledger_corrupt", logging.WARNING, file=self._path(name).name, error="name")
            return None
        return Entry(value, token_expires_at, accessor if isinstance(accessor, str) else None)

    def save(
        self,
        value: SecretValue,
        *,
        token_expires_at: float | None = None,
        token_accessor: str | None = None,
    ) -> bool:
        """Record ``value``; False (logged, counted) when the write failed."""
        record = {
            "name": value.name,
            "data": dict(value.data),
            "version": value.version,
            "issued_at": value.issued_at,
            "expires_at": value.expires_at,
            "lease_id": value.lease_id,
            "lease_duration": value.lease_duration,
            "renewable": value.renewable,
            "token_expires_at": token_expires_at,
            "token_accessor": token_accessor,
        }
        return self._write(value.name, self._path(value.name), record)

    def forget(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._failed(name, path, exc)
            return
        self._fresh(name)

    # ------------------------------------------------------------------ retired leases

    def retired(self) -> dict[str, float]:
        """Replaced leases still to revoke: lease id -> when (epoch seconds)."""
        if self._retired is None:
            self._retired = self._read_retired()
        return dict(self._retired)

    def _read_retired(self) -> dict[str, float]:
        raw = self._read(self.state_dir / RETIRED_FILE)
        if not isinstance(raw, dict):
            return {}
        out: dict[str, float] = {}
        for lease_id, when in raw.items():
            if isinstance(when, int | float) and not isinstance(when, bool):
                out[str(lease_id)] = float(when)
        return out

    def add_retired(self, lease_id: str, revoke_at: float) -> None:
        items = self.retired()
        items[lease_id] = revoke_at
        self._retired = items
        self._write(RETIRED_ENTRY, self.state_dir / RETIRED_FILE, items)

    def remove_retired(self, lease_id: str) -> None:
        items = self.retired()
        if items.pop(lease_id, None) is not None:
            self._retired = items
            self._write(RETIRED_ENTRY, self.state_dir / RETIRED_FILE, items)

    # ------------------------------------------------------------------ files

    def _path(self, name: str) -> Path:
        if secret_name_problem(name):
            raise ValueError(f"{name!r} is not a secret name")
        return self.state_dir / f"{name}.json"

    def _read(self, path: Path) -> Any:
        try:
            raw = open_owned(path)
        except StateDirError as exc:
            event("ledger_refused", logging.WARNING, file=path.name, error=str(exc))
            return None
        except OSError as exc:
            event("ledger_unreadable", logging.WARNING, file=path.name, error=exc.strerror)
            return None
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            # the message has a position only, never the (secret) contents
            event("ledger_corrupt", logging.WARNING, file=path.name, error=str(exc))
            return None

    def _write(self, entry: str, path: Path, record: object) -> bool:
        """Write one file; a failure is reported (once per entry until it recovers)."""
        try:
            # a temp file renamed over the name: a symlink planted there is replaced,
            # never followed
            atomic_write(path, json.dumps(record, sort_keys=True).encode(), mode=0o600)
        except OSError as exc:
            self._failed(entry, path, exc)
            return False
        self._fresh(entry)
        return True

    def _failed(self, entry: str, path: Path, exc: OSError) -> None:
        metrics.ledger_write_failures_total.labels(entry).inc()
        if entry not in self.stale:
            self.stale.add(entry)
            metrics.ledger_stale.labels(entry).set(1)
            event(
                "ledger_write_failed",
                logging.WARNING,
                entry=entry,
                file=path.name,
                error=exc.strerror or type(exc).__name__,
                consequence="kept in memory only: a restart now may not adopt or revoke it",
            )

    def _fresh(self, entry: str) -> None:
        if entry in self.stale:
            self.stale.discard(entry)
            metrics.ledger_stale.labels(entry).set(0)
            event("ledger_written", entry=entry)


def _opt_float(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError("not a number")
    return float(value)
