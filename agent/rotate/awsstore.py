"""The rotation record in AWS Secrets Manager (``store: {aws_secretsmanager: <id>}``),
following AWS's own rotation protocol, so AWS-native consumers and the console see a
normal rotation:

1. the new credential is written as a new version labelled ``AWSPENDING``;
2. it is verified (by the rotator, as with every store);
3. ``AWSCURRENT`` moves to it (``UpdateSecretVersionStage`` with
   ``RemoveFromVersionId``); AWS moves ``AWSPREVIOUS`` to the version it left.

Credential versions hold only the credential's fields (JSON), as consumers expect.
The bookkeeping every store keeps (version, rotated_at, claim, retire_at, retired)
lives in one more version, labelled :data:`RECORD_LABEL`, holding ids of credential
versions instead of credentials. Replicas coordinate through AWS's idempotency key:
each record write uses ``ClientRequestToken = f(the record version it follows)``. Two
writers that read the same record use the same token with different contents, and
AWS accepts only the first (``ResourceExistsException`` for the other: a
:class:`CasConflict`), which is check-and-set without KV.

A publish interrupted between the record write and the ``AWSCURRENT`` move is
finished by the next read of any replica. The secret must exist with a value
(``AWSCURRENT``) before the first rotation: a first version written to an empty
secret would become AWSCURRENT whatever its label.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any

from agent.awsconfig import AwsConfig
from agent.errors import SidecarError
from agent.rotate.store import CasConflict, Record, StoreError
from agent.sources.aws import AwsError, SecretsManager, secret_fields

RECORD_LABEL = "credsidecar-record"
_PREFIX = "credsidecar-"


def next_token(etag: str) -> str:
    """The ClientRequestToken of the record write that follows version ``etag``."""
    return _PREFIX + hashlib.sha256(f"after:{etag}".encode()).hexdigest()[:40]


class SecretsManagerStore:
    def __init__(self, secret_id: str, aws: AwsConfig | None) -> None:
        self.secret_id = secret_id
        self.sm = SecretsManager(aws)
        self._writer = secrets.token_hex(8)  # makes this replica's record contents unique
        self._writes = 0
        self._metas: dict[str, dict[str, Any]] = {}  # record version id -> its bookkeeping
        self._fields: dict[str, dict[str, Any]] = {}  # versions never change: cache by id
        self._aws_current: str | None = None  # where AWSCURRENT was at the last read
        self._staged: tuple[str, Mapping[str, Any]] | None = None  # (version id, fields)

    # ------------------------------------------------------------------ AWS calls

    async def _call(self, operation: str, step: str, **params: Any) -> dict[str, Any]:
        try:
            return await self.sm.call(operation, f"{step} {self.secret_id}", **params)
        except AwsError as exc:
            if exc.code == "ResourceExistsException":
                raise CasConflict(f"{step} {self.secret_id}: written by another replica") from None
            raise StoreError(str(exc)) from None

    async def _stages(self) -> dict[str, list[str]]:
        answer = await self._call("describe_secret", "rotate_read", SecretId=self.secret_id)
        return {str(k): list(v) for k, v in (answer.get("VersionIdsToStages") or {}).items()}

    async def _version(self, version_id: str) -> dict[str, Any]:
        if version_id not in self._fields:
            answer = await self._call(
                "get_secret_value", "rotate_read", SecretId=self.secret_id, VersionId=version_id
            )
            try:
                self._fields[version_id] = secret_fields(answer)
            except SidecarError:
                raise StoreError(f"rotate_read {self.secret_id}: version has no value") from None
        return self._fields[version_id]

    async def _move(self, label: str, to: str | None, away: str | None) -> None:
        params: dict[str, Any] = {"SecretId": self.secret_id, "VersionStage": label}
        if to is not None:
            params["MoveToVersionId"] = to
        if away is not None:
            params["RemoveFromVersionId"] = away
        await self._call("update_secret_version_stage", f"rotate_{label}", **params)

    # ------------------------------------------------------------------ the protocol

    async def read(self) -> Record:
        stages = await self._stages()
        labelled = {label: vid for vid, labels in stages.items() for label in labels}
        aws_current = self._aws_current = labelled.get("AWSCURRENT")
        if aws_current is None:
            raise StoreError(
                f"rotate_read {self.secret_id}: the secret has no AWSCURRENT value; "
                "create it with an initial value (any JSON, e.g. {})"
            )
        record_id = labelled.get(RECORD_LABEL)
        if record_id is None:
            self._metas = {"": {}}
            return Record(etag="")  # nothing rotated by us yet
        if record_id not in self._metas:
            meta = await self._version(record_id)
            if meta.get("credsidecar") != 1:
                raise StoreError(f"rotate_read {self.secret_id}: {RECORD_LABEL} is not a record")
            self._metas = {record_id: meta}
        meta = self._metas[record_id]
        current, previous = meta.get("current"), meta.get("previous")
        if current and aws_current == meta.get("replaced") and current in stages:
            await self._finish_publish(str(current), aws_current)  # a publish was interrupted
        self._fields = {k: v for k, v in self._fields.items() if k in (current, previous)}
        try:
            return Record.parse(
                0,
                {
                    **meta,
                    "current": await self._version(str(current)) if current else None,
                    "previous": await self._version(str(previous)) if previous else None,
                },
            ).but(etag=record_id)
        except (TypeError, ValueError, KeyError, AttributeError):
            raise StoreError(f"rotate_read {self.secret_id}: not a rotation record") from None

    async def stage(self, record: Record, new: Mapping[str, Any]) -> None:
        answer = await self._call(
            "put_secret_value",
            "rotate_stage",
            SecretId=self.secret_id,
            ClientRequestToken=_PREFIX + secrets.token_hex(20),
            SecretString=json.dumps(dict(new), sort_keys=True),
            VersionStages=["AWSPENDING"],
        )
        self._staged = (str(answer["VersionId"]), dict(new))

    async def write(self, record: Record) -> Record:
        base = self._metas.get(record.etag or "", {})
        current, previous = base.get("current"), base.get("previous")
        replaced = base.get("replaced")
        publishing = record.version != int(base.get("version") or 0)
        if publishing:
            if self._staged is None or self._staged[1] != record.current:
                raise StoreError(f"rotate_write {self.secret_id}: nothing staged to publish")
            replaced = self._aws_current
            previous = current if record.previous is not None else None
            current = self._staged[0]
        self._writes += 1
        meta = {
            **record.data(),
            "credsidecar": 1,
            "current": current,
            "previous": previous,
            "replaced": replaced,  # where AWSCURRENT moves away from when this is published
            "writer": f"{self._writer}:{self._writes}",
        }
        try:
            answer = await self._call(
                "put_secret_value",
                "rotate_write",
                SecretId=self.secret_id,
                # the first record follows the secret's AWSCURRENT version of that moment
                ClientRequestToken=next_token(record.etag or f"none:{self._aws_current}"),
                SecretString=json.dumps(meta, sort_keys=True),
                VersionStages=[RECORD_LABEL],
            )
        except CasConflict:
            await self._unstage()  # whoever won, our staged credential is not theirs
            raise
        record_id = str(answer["VersionId"])
        self._metas = {record_id: meta}
        if publishing:
            assert current is not None
            self._fields[current] = dict(self._staged[1]) if self._staged else {}
            self._staged = None
            await self._finish_publish(current, replaced)
        elif record.claim is None:
            await self._unstage()  # a released claim: its staged credential is abandoned
        return record.but(etag=record_id)

    async def _finish_publish(self, current: str, replaced: str | None) -> None:
        """AWSCURRENT to the published version (AWSPREVIOUS follows), AWSPENDING off it."""
        try:
            await self._move("AWSCURRENT", current, replaced)
        except StoreError:
            return  # moved meanwhile (by another replica's read): nothing left to do
        self._aws_current = current
        stages = await self._stages()
        if "AWSPENDING" in stages.get(current, []):
            await self._move("AWSPENDING", None, current)

    async def _unstage(self) -> None:
        staged, self._staged = self._staged, None
        if staged is None:
            return
        with contextlib.suppress(StoreError):  # moved on by a newer stage: nothing of ours
            await self._move("AWSPENDING", None, staged[0])

    async def aclose(self) -> None:
        await self.sm.close()
