"""Drives rotations: schedule, claim, create, verify, publish, retire, roll back.

The protocol, per credential, through the shared record (``store.py``: KV v2 with
check-and-set, or ``awsstore.py``: AWS Secrets Manager with staging labels):

1. read the record; publish its credential if it is newer than ours (adopt);
2. when due (or asked), **claim** it: write ``claim={owner, until}`` with
   cas=<version read>. Of replicas racing, one wins; the others see the claim and
   wait for the result. A loser therefore never touches the credential;
3. the winner creates the new credential, stages it in the store (AWS: the AWSPENDING
   version; KV: nothing) and verifies it. If verification fails it rolls back,
   releases the claim, reports, and backs off;
4. it publishes with cas=<its claim's version>; then every replica adopts it;
5. after ``grace`` one replica (the one whose CAS write marks it retired) retires
   the previous credential. The record keeps ``retire_at``, so a restarted sidecar
   resumes a pending retire.

A claimer that dies leaves a claim that expires after ``claim_timeout``; then
another replica takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent import metrics
from agent.errors import SidecarError, VaultError
from agent.leases import Backoff
from agent.logs import event
from agent.rotate import webhook
from agent.rotate.base import Fields, Rotator, RotatorContext, create_rotator
from agent.rotate.config import RotateConfig
from agent.rotate.store import CasConflict, Claim, Record, RecordStore, open_store
from agent.secret import SecretValue

Publish = Callable[[SecretValue], Awaitable[None]]

_PUBLISH_ATTEMPTS = 5


@dataclass(frozen=True)
class Outcome:
    result: str  # rotated | failed | busy (another replica holds the claim) | not_due
    version: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "rotated"


def _describe(exc: BaseException) -> str:
    # our errors are written to be shown; anything else only by type (it may quote values)
    return str(exc) if isinstance(exc, SidecarError | OSError) else type(exc).__name__


class Rotation:
    """One rotated credential: its loop, and the steps it takes under one lock."""

    def __init__(
        self,
        config: RotateConfig,
        rotator: Rotator,
        store: RecordStore,
        publish: Publish,
        owner: str,
        rng: random.Random | None = None,
    ) -> None:
        self.config, self.rotator, self.store = config, rotator, store
        self.publish, self.owner = publish, owner
        self.rng = rng or random.Random()
        self.record: Record | None = None  # the last record read or written
        self.current: SecretValue | None = None
        self.last_result: str | None = None
        self.last_error: str | None = None
        self._published: tuple[int, bool] | None = None  # (version, retired) last published
        self._mine: set[int] = set()  # versions this process rotated
        self._backoff = Backoff(config.retry_initial, config.retry_max, self.rng)
        self._retry_at = 0.0
        self._retire_backoff = Backoff(config.retry_initial, config.retry_max, self.rng)
        self._retire_retry_at = 0.0  # a failed retire waits for this before trying again
        self._lock = asyncio.Lock()
        self.stopping = False  # shutting down: no new step starts
        self._wake = asyncio.Event()

    @property
    def name(self) -> str:
        return self.config.name

    async def idle(self) -> None:
        """Return once no step is in flight."""
        async with self._lock:
            pass

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        backoff = Backoff(self.config.retry_initial, min(self.config.retry_max, 30.0), self.rng)
        while True:
            try:
                await self.step(force=False)
                backoff.reset()
                delay = self._next_delay()
            except VaultError as exc:
                delay = backoff.next()
                event(
                    "vault_unavailable",
                    logging.WARNING,
                    secret=self.name,
                    operation="rotate",
                    error=str(exc),
                    retry_in=round(delay, 3),
                )
            except Exception as exc:  # a bug or a bad record must not end the whole agent
                delay = backoff.next()
                event(
                    "rotation_failed",
                    logging.ERROR,
                    secret=self.name,
                    version=self.record.version if self.record else None,
                    error=_describe(exc),
                    retry_in=round(delay, 3),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()

    def _next_delay(self) -> float:
        now = time.time()
        delays = [self.config.poll]
        record = self.record
        if record is not None:
            delays.append(max(self.rotator.due_at(record), self._retry_at) - now)
            if not record.retired and record.retire_at is not None:
                delays.append(max(record.retire_at, self._retire_retry_at) - now)
            if record.claim is not None and record.claim.owner != self.owner:
                # someone is rotating: follow closely, or take over once the claim expires
                delays.append(min(1.0, record.claim.until - now))
        return max(0.05, min(delays))

    async def rotate_now(self) -> Outcome:
        """Rotate now, whatever the schedule (``POST /rotate/<name>``, ``credsidecar rotate``)."""
        try:
            return await self.step(force=True)
        except VaultError as exc:
            return Outcome("failed", self.record.version if self.record else 0, str(exc))

    async def step(self, force: bool) -> Outcome:
        async with self._lock:
            if self.stopping:
                return Outcome("failed", self.record.version if self.record else 0, "stopping")
            record = self.record = await self.store.read()
            await self._adopt(record)
            now = time.time()
            retire = record.retire_due(now) and now >= self._retire_retry_at
            if retire or (force and not record.retired):
                record = await self._retire(record)  # a forced rotation supersedes the grace
                if not record.retired:
                    error = self.last_error or "another replica is retiring the previous one"
                    return Outcome("failed", record.version, error)
            if record.claim is not None and not record.claim.expired(now):
                return Outcome("busy", record.version)
            due = now >= self.rotator.due_at(record) and now >= self._retry_at
            if not (force or due):
                return Outcome("not_due", record.version)
            return await self._rotate(record)

    # ------------------------------------------------------------------ steps

    async def _rotate(self, record: Record) -> Outcome:
        version = record.version + 1
        claim = Claim(self.owner, time.time() + self.config.claim_timeout)
        try:
            claimed = self.record = await self.store.write(record.but(claim=claim))
        except CasConflict:
            self._wake.set()  # re-read soon: someone else is rotating
            return Outcome("busy", record.version)
        event("rotation_started", secret=self.name, kind=self.config.kind, version=version)
        try:
            new = await self.rotator.create(record)
        except Exception as exc:  # any failure of the step is reported and retried
            return await self._failed(claimed, version, exc, None)
        try:
            await self.store.stage(claimed, new)  # AWS: the AWSPENDING version, then verified
            await self.rotator.verify(new)
        except Exception as exc:
            return await self._failed(claimed, version, exc, await self._rollback(record, new))
        event("rotation_verified", secret=self.name, version=version)
        now = time.time()
        previous = record.current
        published = claimed.but(
            version=version,
            rotated_at=now,
            current=new,
            previous=self.rotator.keep_previous(previous) if previous else None,
            retire_at=now + self.config.grace if previous else None,
            retired=previous is None,
            claim=None,
        )
        try:
            published = await self._publish_record(published, new)
        except VaultError as exc:
            return await self._failed(claimed, version, exc, await self._rollback(record, new))
        self.record = published
        self._mine.add(version)
        self._backoff.reset()
        self._retry_at = 0.0
        self.last_result, self.last_error = "rotated", None
        metrics.rotations_total.labels(name=self.name, result="ok").inc()
        event("rotation_published", secret=self.name, version=version)
        await self._adopt(published)
        await self._hook(f"credsidecar: rotated {self.name} to version {version}")
        return Outcome("rotated", version)

    async def _publish_record(self, record: Record, new: Fields) -> Record:
        """The CAS write of a verified credential, retried through short Vault outages.

        A conflict after an earlier attempt may mean that attempt landed and only its
        answer was lost: the record then holds our credential, which counts as success.
        """
        delay = 0.5
        for attempt in range(_PUBLISH_ATTEMPTS):
            try:
                return await self.store.write(record)
            except CasConflict:
                if attempt == 0:
                    raise
                stored = await self.store.read()
                if stored.version == record.version and stored.current == new:
                    return stored
                raise
            except VaultError:
                if attempt == _PUBLISH_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _rollback(self, record: Record, new: Fields) -> bool:
        try:
            undone = await self.rotator.rollback(record, new)
        except Exception as exc:
            event(
                "rotation_rollback_failed",
                logging.ERROR,
                secret=self.name,
                version=record.version + 1,
                error=_describe(exc),
            )
            return False
        event("rotation_rolled_back", secret=self.name, version=record.version + 1, undone=undone)
        return undone

    async def _failed(
        self, claimed: Record, version: int, exc: BaseException, rolled_back: bool | None
    ) -> Outcome:
        error = _describe(exc)
        delay = self._backoff.next()
        self._retry_at = time.time() + delay
        self.last_result, self.last_error = "failed", error
        # let the next attempt (ours or another replica's) start without waiting;
        # should this fail, the claim expires on its own
        with contextlib.suppress(VaultError):
            self.record = await self.store.write(claimed.but(claim=None))
        metrics.rotations_total.labels(name=self.name, result="failed").inc()
        event(
            "rotation_failed",
            logging.ERROR,
            secret=self.name,
            version=version,
            error=error,
            rolled_back=rolled_back,
            retry_in=round(delay, 3),
        )
        await self._hook(
            f"credsidecar: rotation of {self.name} to version {version} failed: {error}; "
            f"the current credential stays in service; retry in {delay:.0f}s"
        )
        return Outcome("failed", version, error)

    async def _retire(self, record: Record) -> Record:
        """Retire the previous credential; the CAS write marking it retired elects who does."""
        try:
            marked = self.record = await self.store.write(record.but(retired=True))
        except CasConflict:
            self.record = await self.store.read()
            return self.record
        old_version = record.version - 1
        try:
            await self.rotator.retire(record.previous or {}, record.current or {})
        except Exception as exc:
            error = self.last_error = _describe(exc)
            delay = self._retire_backoff.next()
            self._retire_retry_at = time.time() + delay
            event(
                "rotation_failed",
                logging.ERROR,
                secret=self.name,
                version=old_version,
                step="retire",
                error=error,
                retry_in=round(delay, 3),
            )
            metrics.rotations_total.labels(name=self.name, result="retire_failed").inc()
            with contextlib.suppress(VaultError):  # leave it pending: the next pass retries
                self.record = await self.store.write(marked.but(retired=False))
            return self.record
        self._retire_backoff.reset()
        self._retire_retry_at = 0.0
        event("rotation_retired", secret=self.name, version=old_version)
        await self._adopt(marked)
        return marked

    async def _adopt(self, record: Record) -> None:
        """Publish the record's credential to the agent when it differs from what we have."""
        if record.current is None or record.rotated_at is None:
            return
        key = (record.version, record.retired)
        if key == self._published:
            return
        rotated_at = float(record.rotated_at)
        value = SecretValue(
            name=self.name,
            data=self.rotator.view(record),
            version=str(record.version),
            issued_at=rotated_at,
            expires_at=self.rotator.expires_at(record),
        )
        if record.version not in self._mine and (
            self._published is None or self._published[0] != record.version
        ):
            ttl = value.remaining()
            event(
                "adopted",
                secret=self.name,
                version=value.version,
                ttl=None if ttl is None else round(ttl, 3),
            )
        unchanged = self.current is not None and (
            (self.current.version, self.current.data) == (value.version, value.data)
        )
        self._published, self.current = key, value
        metrics.rotation_age_seconds.labels(self.name).set_function(
            lambda: time.time() - rotated_at
        )
        if not unchanged:  # a retire that changes no field (dual-user) tells no one
            await self.publish(value)

    async def _hook(self, text: str) -> None:
        if self.config.notify_webhook:
            await webhook.post(self.config.notify_webhook, text, rotation=self.name)

    def status(self) -> dict[str, Any]:
        record = self.record
        return {
            "kind": self.config.kind,
            "version": record.version if record else None,
            "rotated_at": record.rotated_at if record else None,
            "next_due": self.rotator.due_at(record) if record else None,
            "retire_at": record.retire_at if record and not record.retired else None,
            "rotating": bool(record and record.claim and not record.claim.expired()),
            "last_result": self.last_result,
            "last_error": self.last_error,
        }


class RotationManager:
    """Every ``rotate:`` entry of the config, sharing the agent's Vault client."""

    def __init__(
        self,
        configs: Mapping[str, RotateConfig],
        vault: Any,
        lookup: Callable[[str], SecretValue | None],
        publish: Publish,
    ) -> None:
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        context = RotatorContext(vault=vault, lookup=lookup)
        self.rotations = {
            name: Rotation(
                cfg, create_rotator(cfg, context), open_store(cfg, vault), publish, owner
            )
            for name, cfg in configs.items()
        }

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for rotation in self.rotations.values():
                tg.create_task(rotation.run(), name=f"rotate-{rotation.name}")

    async def rotate_now(self, name: str) -> Outcome:
        """Raises KeyError for a name that is not under ``rotate:``."""
        return await self.rotations[name].rotate_now()

    async def drain(self, limit: float) -> None:
        """Stop starting steps and let one in flight finish, up to ``limit`` seconds."""
        for rotation in self.rotations.values():
            rotation.stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                for rotation in self.rotations.values():
                    await rotation.idle()

    async def aclose(self) -> None:
        """Close the stores' clients (AWS); the Vault client belongs to the agent."""
        for rotation in self.rotations.values():
            await rotation.store.aclose()

    def not_ready(self) -> list[str]:
        return [
            f"rotate {name}: no credential yet"
            for name, rotation in self.rotations.items()
            if rotation.current is None
        ]

    def status(self) -> dict[str, Any]:
        return {name: rotation.status() for name, rotation in self.rotations.items()}
