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

**Grace is a promise.** The record holds one previous credential, so a rotation
retires the one before; no rotation, scheduled or forced, does that before
``retire_at`` (its successor's publication + ``grace``). A forced rotation inside
the grace is refused (``in_grace``, naming when it becomes possible) unless it says
``now``, which retires the previous credential early and is logged as such
(``rotation_grace_overridden``): its in-flight consumers fail. What to do next is
the pure :func:`plan` of the record and an injected clock, like ``leases.decide``;
:class:`Rotation` only carries it out. Concurrent forced rotations share one run.
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
from typing import Any, Literal

from agent import metrics
from agent.errors import SidecarError, VaultError
from agent.leases import Backoff
from agent.logs import event
from agent.rotate import webhook
from agent.rotate.base import Fields, Rotator, RotatorContext, create_rotator
from agent.rotate.config import RotateConfig
from agent.rotate.store import CasConflict, Claim, Record, RecordStore, open_store
from agent.secret import SecretValue
from agent.taskset import TaskSet

Publish = Callable[[SecretValue], Awaitable[None]]
Clock = Callable[[], float]  # epoch seconds: the record's times are wall-clock

_PUBLISH_ATTEMPTS = 5

# rotated | failed | busy (another replica holds the claim) | not_due
# | in_grace (forced, but the previous credential is still inside its grace)
Result = Literal["rotated", "failed", "busy", "not_due", "in_grace"]
# scheduled: the loop's pass; forced: asked (POST /rotate, CLI); now: asked, grace overridden
Mode = Literal["scheduled", "forced", "now"]


@dataclass(frozen=True)
class Outcome:
    result: Result
    version: int
    error: str | None = None
    not_before: float | None = None  # in_grace: when a forced rotation becomes possible

    @property
    def ok(self) -> bool:
        return self.result == "rotated"


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Timing:
    """What the schedule knows besides the record (epoch seconds)."""

    due_at: float  # the rotator's next due time for this record
    poll: float  # re-read the store at least this often
    retry_at: float = 0.0  # a failed rotation backs off until then
    retire_retry_at: float = 0.0  # a failed retire backs off until then


@dataclass(frozen=True)
class Retire:
    early: bool  # inside the grace: only when asked with ``now``


@dataclass(frozen=True)
class Rotate:
    pass


@dataclass(frozen=True)
class Refuse:
    not_before: float  # the previous credential's grace ends then


@dataclass(frozen=True)
class Busy:
    pass


@dataclass(frozen=True)
class Idle:
    seconds: float  # until the next pass


Action = Retire | Rotate | Refuse | Busy | Idle


def plan(record: Record, now: float, timing: Timing, owner: str, mode: Mode) -> Action:
    """What a pass over ``record`` does at ``now``. Pure: no I/O, no clock."""
    forced = mode != "scheduled"
    pending = not record.retired  # the previous credential is still valid
    if pending:
        retire_at = record.retire_at if record.retire_at is not None else 0.0
        if now < retire_at:
            if mode == "forced":
                return Refuse(retire_at)
            if mode == "now":
                return Retire(early=True)
        elif forced or now >= timing.retire_retry_at:
            return Retire(early=False)
    if record.claim is not None and not record.claim.expired(now):
        return Busy()
    due = now >= timing.due_at and now >= timing.retry_at
    if not pending and (forced or due):
        return Rotate()
    return Idle(next_delay(record, now, timing, owner))


def next_delay(record: Record, now: float, timing: Timing, owner: str) -> float:
    """Seconds until the next pass: the earliest of poll, the retire (or, with nothing
    to retire, the due time) and the end of another replica's claim."""
    delays = [timing.poll]
    if record.retired:
        delays.append(max(timing.due_at, timing.retry_at) - now)
    else:  # nothing rotates before the previous credential is retired: that comes next
        delays.append(max(record.retire_at or 0.0, timing.retire_retry_at) - now)
    if record.claim is not None and record.claim.owner != owner:
        # someone is rotating: follow closely, or take over once the claim expires
        delays.append(min(1.0, record.claim.until - now))
    return max(0.05, min(delays))


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _describe(exc: BaseException) -> str:
    # our errors are written to be shown; anything else only by type (it may quote values)
    return str(exc) if isinstance(exc, SidecarError | OSError) else type(exc).__name__


class Rotation:
    """One rotated credential: its loop, and the steps it takes under one lock.

    Owns every task it starts (forced rotations, shared by concurrent callers) and ends
    them in :meth:`aclose`. Time comes from ``clock``.
    """

    def __init__(
        self,
        config: RotateConfig,
        rotator: Rotator,
        store: RecordStore,
        publish: Publish,
        owner: str,
        rng: random.Random | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.config, self.rotator, self.store = config, rotator, store
        self.publish, self.owner = publish, owner
        self.rng = rng or random.Random()
        self.clock = clock
        self.record: Record | None = None  # the last record read or written
        self.current: SecretValue | None = None
        self.last_result: Result | None = None
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
        self._forced: dict[Mode, asyncio.Task[Outcome]] = {}  # in flight, one per mode
        self._tasks = TaskSet()

    @property
    def name(self) -> str:
        return self.config.name

    async def idle(self) -> None:
        """Return once no step is in flight."""
        async with self._lock:
            pass

    async def aclose(self, limit: float = 30.0) -> None:
        """Start no new step, let one in flight finish (up to ``limit`` s), then end
        every task of ours and of the rotator, and close the store's client."""
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self.idle()
        await self._tasks.aclose()
        await self.rotator.aclose()
        await self.store.aclose()

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """The schedule, until cancelled. Expected failures (Vault, a rotation step) are
        logged and retried with backoff; anything else is a bug and propagates to the
        supervisor."""
        backoff = Backoff(self.config.retry_initial, min(self.config.retry_max, 30.0), self.rng)
        while True:
            try:
                await self.step("scheduled")
                backoff.reset()
                delay = self._next_delay()
            except SidecarError as exc:
                delay = backoff.next()
                event(
                    "vault_unavailable" if isinstance(exc, VaultError) else "rotation_failed",
                    logging.WARNING,
                    secret=self.name,
                    operation="rotate",
                    error=str(exc),
                    retry_in=round(delay, 3),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()

    def _timing(self, record: Record) -> Timing:
        return Timing(
            due_at=self.rotator.due_at(record),
            poll=self.config.poll,
            retry_at=self._retry_at,
            retire_retry_at=self._retire_retry_at,
        )

    def _next_delay(self) -> float:
        if self.record is None:
            return self.config.poll
        return next_delay(self.record, self.clock(), self._timing(self.record), self.owner)

    async def rotate_now(self, now: bool = False) -> Outcome:
        """Rotate whatever the schedule (``POST /rotate/<name>``, ``credsidecar rotate``).

        Inside the previous credential's grace this is refused (``in_grace``) unless
        ``now``. Concurrent calls share one run (per ``now``), which a caller's
        cancellation does not stop.
        """
        mode: Mode = "now" if now else "forced"
        task = self._forced.get(mode)
        if task is None or task.done():
            task = self._tasks.spawn(self._forced_step(mode), f"rotate-now-{self.name}")
            self._forced[mode] = task
        return await asyncio.shield(task)

    async def _forced_step(self, mode: Mode) -> Outcome:
        try:
            return await self.step(mode)
        except VaultError as exc:
            return Outcome("failed", self.record.version if self.record else 0, str(exc))

    async def step(self, mode: Mode = "scheduled") -> Outcome:
        async with self._lock:
            if self.stopping:
                return Outcome("failed", self.record.version if self.record else 0, "stopping")
            record = self.record = await self.store.read()
            await self._adopt(record)
            action = plan(record, self.clock(), self._timing(record), self.owner, mode)
            if isinstance(action, Retire):
                record = await self._retire(record, early=action.early)
                if not record.retired:
                    error = self.last_error or "another replica is retiring the previous one"
                    return Outcome("failed", record.version, error)
                # once retired, a due or forced rotation follows in the same pass
                action = plan(record, self.clock(), self._timing(record), self.owner, mode)
            if isinstance(action, Rotate):
                return await self._rotate(record)
            if isinstance(action, Refuse):
                return self._refused(record, action.not_before)
            if isinstance(action, Busy):
                return Outcome("busy", record.version)
            return Outcome("not_due", record.version)

    def _refused(self, record: Record, not_before: float) -> Outcome:
        left = not_before - self.clock()
        error = (
            f"the previous credential (version {record.version - 1}) is inside its grace "
            f"until {_when(not_before)} ({left:.0f}s from now): rotating now would retire it "
            "early. Rotate after that time, or force it (--now; POST /rotate/<name>?now=true), "
            "accepting that in-flight consumers of that credential fail"
        )
        event(
            "rotation_refused",
            logging.WARNING,
            secret=self.name,
            version=record.version,
            reason="in_grace",
            not_before=round(not_before, 3),
        )
        return Outcome("in_grace", record.version, error, not_before)

    # ------------------------------------------------------------------ steps

    async def _rotate(self, record: Record) -> Outcome:
        version = record.version + 1
        claim = Claim(self.owner, self.clock() + self.config.claim_timeout)
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
        now = self.clock()
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
        backoff = Backoff(self.config.retry_initial, self.config.retry_max, self.rng)
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
                await asyncio.sleep(backoff.next())
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
        self._retry_at = self.clock() + delay
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

    async def _retire(self, record: Record, *, early: bool) -> Record:
        """Retire the previous credential; the CAS write marking it retired elects who does.

        ``early``: inside its grace, because a rotation was forced with ``now``.
        """
        try:
            marked = self.record = await self.store.write(record.but(retired=True))
        except CasConflict:
            self.record = await self.store.read()
            return self.record
        old_version = record.version - 1
        if early:
            left = (record.retire_at or 0.0) - self.clock()
            event(
                "rotation_grace_overridden",
                logging.WARNING,
                secret=self.name,
                version=old_version,
                grace_left=round(max(left, 0.0), 3),
                consequence=f"in-flight consumers of version {old_version} fail",
            )
        try:
            await self.rotator.retire(record.previous or {}, record.current or {})
        except Exception as exc:
            error = self.last_error = _describe(exc)
            delay = self._retire_backoff.next()
            self._retire_retry_at = self.clock() + delay
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
        clock = self.clock
        metrics.rotation_age_seconds.labels(self.name).set_function(lambda: clock() - rotated_at)
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
            "rotating": bool(record and record.claim and not record.claim.expired(self.clock())),
            "last_result": self.last_result,
            "last_error": self.last_error,
        }


class RotationManager:
    """Every ``rotate:`` entry of the config, sharing the agent's Vault client.

    ``run()`` runs every schedule in one TaskGroup; ``aclose()`` ends what requests
    started (forced rotations, the rotators' own tasks).
    """

    def __init__(
        self,
        configs: Mapping[str, RotateConfig],
        vault: Any,
        lookup: Callable[[str], SecretValue | None],
        publish: Publish,
        clock: Clock = time.time,
    ) -> None:
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        context = RotatorContext(vault=vault, lookup=lookup)
        self.rotations = {
            name: Rotation(
                cfg,
                create_rotator(cfg, context),
                open_store(cfg, vault),
                publish,
                owner,
                clock=clock,
            )
            for name, cfg in configs.items()
        }

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for rotation in self.rotations.values():
                tg.create_task(rotation.run(), name=f"rotate-{rotation.name}")

    async def rotate_now(self, name: str, now: bool = False) -> Outcome:
        """Raises KeyError for a name that is not under ``rotate:``."""
        return await self.rotations[name].rotate_now(now)

    async def aclose(self, limit: float = 30.0) -> None:
        """Start no new step; let those in flight finish, up to ``limit`` s in all (half a
        rotation costs a claim timeout); then end every task a request started and close
        the stores' clients (AWS; the Vault client belongs to the agent)."""
        for rotation in self.rotations.values():
            rotation.stopping = True
        async with asyncio.TaskGroup() as tg:
            for rotation in self.rotations.values():
                tg.create_task(rotation.aclose(limit))

    def not_ready(self) -> list[str]:
        return [
            f"rotate {name}: no credential yet"
            for name, rotation in self.rotations.items()
            if rotation.current is None
        ]

    def status(self) -> dict[str, Any]:
        return {name: rotation.status() for name, rotation in self.rotations.items()}
