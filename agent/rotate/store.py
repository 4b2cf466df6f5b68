"""The shared record of a rotated credential, and the KV v2 store written with check-and-set.

Any store implements :class:`RecordStore`: ``read``, a ``write`` that fails with
:class:`CasConflict` when someone else wrote since the record was read, ``stage`` (the
new credential, before it is verified) and ``aclose``. :class:`Store` keeps the record in
KV v2; ``awsstore.py`` keeps it in AWS Secrets Manager with AWS's staging labels.

Replicas coordinate only through this record. Every write carries ``cas=<the KV
version the writer read>``, so of several replicas acting on the same reading
exactly one write succeeds; the others get :class:`CasConflict`, re-read and adopt.

The record::

    version     credential version, 1, 2, ... (0: nothing rotated yet)
    rotated_at  when ``current`` was published (epoch seconds)
    current     the credential's fields (what templates see)
    previous    the credential it replaced, kept until it is retired
    retire_at   when ``previous`` is retired; ``retired`` says whether that happened
    claim       {owner, until}: a rotation in progress; others wait for it, and take
                over only once ``until`` has passed (the claimer died)

In KV the current credential's fields are the top level of the secret's data, as
every other tool expects (``bao kv get -field=password``, a Vault Agent template's
``.Data.data.password``, External Secrets Operator), and the rest of the record is
under the one reserved key :data:`BOOKKEEPING`. A record of the older nested layout
(the record itself as the data, ``current`` inside it) is read as it is and written
back in the flat layout by the next write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import VaultError, VaultNotFound

if TYPE_CHECKING:
    from agent.rotate.config import RotateConfig
    from agent.vault.client import VaultClient

_TORN_READS = 20
BOOKKEEPING = "_credsidecar"  # the KV data key holding everything but the current fields


class CasConflict(VaultError):
    """Someone else wrote the record since we read it."""


class StoreError(VaultError):
    """A store other than Vault failed; the manager retries it like a Vault outage."""


@dataclass(frozen=True)
class Claim:
    owner: str
    until: float

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.until


@dataclass(frozen=True)
class Record:
    kv_version: int = 0  # the KV v2 version this was read at: the next write's cas
    version: int = 0
    rotated_at: float | None = None
    current: Mapping[str, Any] | None = field(default=None, repr=False)
    previous: Mapping[str, Any] | None = field(default=None, repr=False)
    retire_at: float | None = None
    retired: bool = True
    claim: Claim | None = None
    etag: str | None = None  # stores other than KV: the revision the next write must follow

    def data(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "rotated_at": self.rotated_at,
            "current": dict(self.current) if self.current is not None else None,
            "previous": dict(self.previous) if self.previous is not None else None,
            "retire_at": self.retire_at,
            "retired": self.retired,
            "claim": (
                {"owner": self.claim.owner, "until": self.claim.until} if self.claim else None
            ),
        }

    @classmethod
    def parse(cls, kv_version: int, data: Mapping[str, Any] | None) -> Record:
        if not data:
            return cls(kv_version=kv_version)
        claim = data.get("claim")
        return cls(
            kv_version=kv_version,
            version=int(data.get("version") or 0),
            rotated_at=data.get("rotated_at"),
            current=data.get("current"),
            previous=data.get("previous"),
            retire_at=data.get("retire_at"),
            retired=bool(data.get("retired", True)),
            claim=Claim(str(claim["owner"]), float(claim["until"]))
            if isinstance(claim, Mapping)
            else None,
        )

    def retire_due(self, now: float) -> bool:
        return not self.retired and self.retire_at is not None and now >= self.retire_at

    def but(self, **changes: Any) -> Record:
        return replace(self, **changes)


def kv_layout(record: Record) -> dict[str, Any]:
    """The KV data of ``record``: the current fields flat, the bookkeeping beside them."""
    book = record.data()
    current = book.pop("current") or {}
    if BOOKKEEPING in current:  # never quote the fields: they are the credential
        raise StoreError(f"the credential has a field named {BOOKKEEPING}, which the store keeps")
    return {**current, BOOKKEEPING: book}


def parse_kv_layout(kv_version: int, data: Mapping[str, Any] | None) -> Record:
    """A record from KV data, flat (ours) or nested (before the flat layout)."""
    if not data or BOOKKEEPING not in data:
        return Record.parse(kv_version, data)  # nested, or nothing of ours yet
    current = {k: v for k, v in data.items() if k != BOOKKEEPING}
    return Record.parse(kv_version, {**data[BOOKKEEPING], "current": current or None})


class RecordStore(Protocol):
    async def read(self) -> Record: ...

    async def write(self, record: Record) -> Record:
        """Write ``record`` if nothing was written since it was read, else CasConflict."""

    async def stage(self, record: Record, new: Mapping[str, Any]) -> None:
        """Store the new, not yet verified credential (AWS: the AWSPENDING version)."""

    async def aclose(self) -> None: ...


def open_store(config: RotateConfig, vault: VaultClient | None) -> RecordStore:
    if config.store_kind == "aws_secretsmanager":
        from agent.rotate.awsstore import SecretsManagerStore  # only AWS configs load botocore

        return SecretsManagerStore(config.store, config.aws)
    if vault is None:
        raise StoreError(f"rotate.{config.name}: a vault_kv store needs vault:")
    return Store(vault, config.store)


class Store:
    """The record in KV v2 at ``path``; every write carries cas=<the version read>."""

    def __init__(self, vault: VaultClient, path: str) -> None:
        self.vault, self.path = vault, path

    async def stage(self, record: Record, new: Mapping[str, Any]) -> None:
        """Nothing to do: the record only ever holds verified credentials."""

    async def aclose(self) -> None:
        """The Vault client belongs to the agent."""

    async def read(self) -> Record:
        # OpenBao can answer a read that races a write with the new version number and no
        # data (an empty answer, or a 404 while the metadata already counts the version).
        # Claiming on such an answer would win a CAS against a live claim, so a version
        # that is neither readable nor deleted is read again.
        for _ in range(_TORN_READS):
            record = await self._read_once()
            if record is not None:
                return record
            await asyncio.sleep(0.05)
        raise VaultError(f"rotate_read {self.path}: the current version has no data")

    async def _read_once(self) -> Record | None:
        try:
            response = await self.vault.read(self.path, "rotate_read")
        except VaultNotFound:
            return await self._read_metadata()
        body = response.get("data") or {}
        metadata = body.get("metadata") or {}
        if not body.get("data"):
            deleted = bool(metadata.get("deletion_time") or metadata.get("destroyed"))
            return Record(kv_version=int(metadata.get("version") or 0)) if deleted else None
        try:
            return parse_kv_layout(int(metadata.get("version") or 0), body.get("data"))
        except (TypeError, ValueError, KeyError, AttributeError):
            # never quote it: the record holds the credential
            raise VaultError(f"rotate_read {self.path}: not a rotation record") from None

    async def _read_metadata(self) -> Record | None:
        """After a 404: nothing stored yet, or a deleted current version (CAS counts it)."""
        mount, _, rest = self.path.partition("/data/")
        try:
            response = await self.vault.read(f"{mount}/metadata/{rest}", "rotate_read")
        except VaultNotFound:
            return Record()
        metadata = response.get("data") or {}
        current = int(metadata.get("current_version") or 0)
        version = (metadata.get("versions") or {}).get(str(current)) or {}
        if current and not (version.get("deletion_time") or version.get("destroyed")):
            return None  # counted but not readable yet: a write in flight
        return Record(kv_version=current)

    async def write(self, record: Record) -> Record:
        """Write ``record`` with cas=its ``kv_version``; returns it at the new KV version."""
        body = {"options": {"cas": record.kv_version}, "data": kv_layout(record)}
        try:
            response = await self.vault.write(self.path, body, "rotate_write")
        except VaultError as exc:
            if "check-and-set" in str(exc):
                raise CasConflict(f"rotate_write {self.path}: written by another replica") from None
            raise
        return record.but(kv_version=int((response.get("data") or {}).get("version") or 0))
