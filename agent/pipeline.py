"""The render pipeline: secrets in, files out, the application told - and who holds what.

A **pass** renders every template whose secrets are known, then writes those whose
bytes changed, then tells the targets (notifiers, the exec child) once. All renders
happen before any write and all writes before anyone is told, so a consumer woken by
the notification sees every file of the pass updated. Renders and writes run in a
worker thread: a template is CPU work of unbounded size and a write is I/O that can
stall, and neither may hold up the event loop that answers probes. The threads are
daemons, so neither can hold up the process's exit; a render also stops at its next
step when the pipeline closes (:mod:`agent.sandbox`).

A template that fails keeps its previous file and is retried with backoff.

The exec child's templated variables (:mod:`agent.execenv`) are templates too: their
output is staged for the child instead of written to a file, and a changed value
triggers the child (which restarts for it). They are delivered like files: once the
child that holds the new value is running.

**Delivery.** Each template remembers the secret values its file holds. Once every
template that uses a secret holds its current version and every target was told of
those writes (:class:`agent.acks.Acks`), the pipeline reports the version delivered
(``on_delivered``); only then does the source start the grace of what that version
replaced. While a render keeps failing, what the file still holds stays valid.

**Readiness** is per template: a destination that holds credentials expiring within
the readiness margin, or revoked ones, makes the agent not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from agent import metrics
from agent.acks import Acks
from agent.config import EnvTemplateConfig, TemplateConfig
from agent.errors import RenderError
from agent.execenv import ExecEnv
from agent.files import write_destination
from agent.leases import Backoff, readiness_margin
from agent.logs import event
from agent.render import Template
from agent.secret import SecretValue

T = TypeVar("T")
Delivered = Callable[[str, str, float], None]  # (secret, version, when)
Consumer = Callable[[Mapping[str, SecretValue]], None]  # sees the values after each pass


class Target(Protocol):
    """Something to tell after a pass that wrote files (a notifier, the exec child)."""

    acks: Acks

    @property
    def name(self) -> str: ...  # as a template's ``notify`` list names it

    def trigger(self) -> None: ...


@dataclass
class TemplateState:
    config: TemplateConfig | EnvTemplateConfig  # a file, or a variable of the exec child
    template: Template
    needs: frozenset[str]
    rendered_at: float | None = None
    last_error: str | None = None
    writes: int = 0
    holds: dict[str, SecretValue] = field(default_factory=dict)  # what the file holds now
    owed: list[tuple[Acks, int]] = field(default_factory=list)  # tickets of its last write


@dataclass
class Burst:
    """What one pass did."""

    written: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a daemon thread of its own and await the result.

    Not ``asyncio.to_thread``: its executor's threads are joined at exit, so a render
    that never ends or a write stuck on a dead mount would keep the process alive.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=work, name=f"credsidecar {fn.__name__}", daemon=True).start()
    return await future


def _render(
    states: Sequence[TemplateState],
    values: Mapping[str, SecretValue],
    stop: threading.Event,
) -> list[tuple[TemplateState, bytes | RenderError]]:
    out: list[tuple[TemplateState, bytes | RenderError]] = []
    for state in states:
        try:
            out.append((state, state.template.render(values, stop)))
        except RenderError as exc:
            out.append((state, exc))
    return out


def _write(
    outputs: Sequence[tuple[TemplateState, bytes]],
) -> list[tuple[TemplateState, int, bool | RenderError]]:
    """Write each output; per template its size and whether the file changed (or why not)."""
    out: list[tuple[TemplateState, int, bool | RenderError]] = []
    for state, data in outputs:
        assert isinstance(state.config, TemplateConfig)
        try:
            out.append((state, len(data), write_destination(state.config, data)))
        except RenderError as exc:
            out.append((state, len(data), exc))
    return out


class RenderPipeline:
    def __init__(
        self,
        templates: Sequence[TemplateConfig],
        secrets: Collection[str],
        *,
        on_delivered: Delivered,
        consumers: Sequence[Consumer] = (),
        retry: tuple[float, float] = (0.5, 30.0),
        clock: Callable[[], float] = time.time,
        exec_env: ExecEnv | None = None,
    ) -> None:
        self.secrets = tuple(secrets)
        self.values: dict[str, SecretValue] = {}
        self.exec_env = exec_env
        configs: list[TemplateConfig | EnvTemplateConfig] = list(templates)
        configs += exec_env.templates if exec_env is not None else ()
        self.templates = [self._compile(cfg) for cfg in configs]
        self.targets: list[Target] = []
        self.on_delivered = on_delivered
        self.consumers = list(consumers)
        self.clock = clock
        self.revoked: set[tuple[str, str]] = set()  # (secret, version) known dead
        self._delivered: dict[str, str] = {}  # secret -> version reported delivered
        self._backoff = Backoff(*retry, random.Random())
        self._dirty = asyncio.Event()
        self._busy = False
        self._passed = asyncio.Event()  # set at the end of every pass
        self._stop = threading.Event()  # tells renders in threads to give up
        self._waiters: set[asyncio.Task[None]] = set()

    @property
    def files(self) -> list[TemplateConfig]:
        return [s.config for s in self.templates if isinstance(s.config, TemplateConfig)]

    def _compile(self, cfg: TemplateConfig | EnvTemplateConfig) -> TemplateState:
        template = Template(cfg)
        # a template that picks secrets dynamically waits for all of them
        needs = set(self.secrets) if template.dynamic else template.secret_names()
        return TemplateState(cfg, template, frozenset(needs))

    # ------------------------------------------------------------------ input

    async def publish(self, value: SecretValue) -> None:
        """A source's new value (the ``publish`` of :class:`agent.sources.base.SourceContext`)."""
        self.values[value.name] = value
        self._dirty.set()

    def mark_revoked(self, name: str, version: str) -> None:
        """A credential stopped working; only matters while a destination holds it."""
        for state in self.templates:
            held = state.holds.get(name)
            if held is not None and held.version == version:
                self.revoked.add((name, version))

    # ------------------------------------------------------------------ passes

    async def render_all(self) -> Burst:
        """Render every template whose secrets are known; write the ones that changed."""
        burst = Burst()
        self._busy = True
        try:
            values = dict(self.values)
            ready = [s for s in self.templates if s.needs <= values.keys()]
            rendered = await in_thread(_render, ready, values, self._stop)
            outputs: list[tuple[TemplateState, bytes]] = []
            variables: list[tuple[TemplateState, bytes]] = []
            for state, result in rendered:
                if isinstance(result, RenderError):
                    self._failed(state, burst, str(result))
                else:
                    is_file = isinstance(state.config, TemplateConfig)
                    (outputs if is_file else variables).append((state, result))
            for state, size, written in await in_thread(_write, outputs):
                if isinstance(written, RenderError):
                    self._failed(state, burst, str(written))
                    continue
                self._rendered(state, burst, values, written, size)
            # staged together, with no await in between: a child never starts with a mix
            for state, data in variables:
                assert self.exec_env is not None and isinstance(state.config, EnvTemplateConfig)
                try:
                    changed = self.exec_env.stage(state.config, data)
                except RenderError as exc:
                    self._failed(state, burst, str(exc))
                    continue
                self._rendered(state, burst, values, changed, len(data))
        finally:
            self._busy = False
            self._passed.set()
            self._passed = asyncio.Event()
        return burst

    def _rendered(
        self,
        state: TemplateState,
        burst: Burst,
        values: Mapping[str, SecretValue],
        changed: bool,
        size: int,
    ) -> None:
        cfg = state.config
        state.rendered_at, state.last_error = self.clock(), None
        state.holds = {name: values[name] for name in state.needs if name in values}
        metrics.renders_total.labels(cfg.name, "written" if changed else "unchanged").inc()
        if changed:
            state.writes += 1
            burst.written.append(cfg.name)
            event("rendered", template=cfg.name, bytes=size)

    def _failed(self, state: TemplateState, burst: Burst, reason: str) -> None:
        state.last_error = reason
        burst.failed.append(reason)
        metrics.renders_total.labels(state.config.name, "error").inc()
        event(
            "render_failed",
            logging.ERROR,
            template=state.config.name,
            error=reason,
            kept="the previous file",
        )

    async def run_pass(self) -> Burst:
        """One pass, then what follows it: consumers, targets told, deliveries."""
        self._dirty.clear()
        burst = await self.render_all()
        for consumer in self.consumers:
            consumer(self.values)
        if burst.written:
            self._tell(burst)
        self._check_deliveries()
        return burst

    def _tell(self, burst: Burst) -> None:
        """Trigger, once, every target that a written template names (default: all)."""
        written = set(burst.written)
        changed = [s for s in self.templates if s.config.name in written]
        tickets: dict[str, tuple[Acks, int]] = {}
        for target in self.targets:
            if any(_names(s.config, target.name) for s in changed):
                target.trigger()
                tickets[target.name] = (target.acks, target.acks.issued)
        for state in changed:
            state.owed = [t for name, t in tickets.items() if _names(state.config, name)]
        owed = list(tickets.values())
        if owed:
            waiter = asyncio.create_task(self._await_acks(owed), name="told")
            self._waiters.add(waiter)
            waiter.add_done_callback(self._waiters.discard)

    async def _await_acks(self, owed: list[tuple[Acks, int]]) -> None:
        for acks, ticket in owed:
            await acks.wait(ticket)
        self._check_deliveries()

    def _check_deliveries(self) -> None:
        now = self.clock()
        for name, value in list(self.values.items()):
            if self._delivered.get(name) == value.version:
                continue
            users = [s for s in self.templates if name in s.needs]
            if any(name not in s.holds or s.holds[name].version != value.version for s in users):
                continue  # a destination still holds another version (or none)
            if any(acks.covered < ticket for s in users for acks, ticket in s.owed):
                continue  # the application was not told yet
            self._delivered[name] = value.version
            self.on_delivered(name, value.version, now)
        held = {(n, v.version) for s in self.templates for n, v in s.holds.items()}
        self.revoked &= held  # forget dead credentials no destination holds any more

    async def run(self) -> None:
        """Pass after pass: on every new value, and again (with backoff) while one fails."""
        failing = False
        while True:
            if failing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), self._backoff.next())
            else:
                await self._dirty.wait()
            burst = await self.run_pass()
            failing = bool(burst.failed)
            if not failing:
                self._backoff.reset()

    async def settle(self, limit: float) -> bool:
        """Let the loop finish what it has (a pass in flight, a value not yet rendered),
        for at most ``limit`` seconds. False when that was not enough."""
        try:
            async with asyncio.timeout(limit):
                while self._busy or self._dirty.is_set():
                    await self._passed.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop renders still running in threads and the delivery waiters."""
        self._stop.set()
        for waiter in list(self._waiters):
            waiter.cancel("shutdown")
        await asyncio.gather(*self._waiters, return_exceptions=True)

    # ------------------------------------------------------------------ observation

    def readiness(self, now: float) -> list[str]:
        reasons = [f"secret {n}: not obtained yet" for n in self.secrets if n not in self.values]
        for state in self.templates:
            name = state.config.name
            if state.rendered_at is None:
                reasons.append(f"template {name}: not rendered yet")
                continue
            for secret, held in sorted(state.holds.items()):
                if (secret, held.version) in self.revoked:
                    reasons.append(
                        f"template {name}: holds revoked credentials of secret {secret} "
                        f"(version {held.version})"
                    )
                    continue
                current = self.values.get(secret)
                # a renewal extends the version the file holds without rewriting it
                fresh = current if current is not None and current.version == held.version else held
                if (left := _expiring(fresh, now)) is not None:
                    reasons.append(f"template {name}: secret {secret} expires in {left:.1f}s")
        used = {n for s in self.templates for n in s.needs}
        for secret, value in sorted(self.values.items()):
            if secret not in used and (left := _expiring(value, now)) is not None:
                reasons.append(f"secret {secret}: expires in {left:.1f}s")
        return reasons

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "destination": s.config.name,
                "rendered_at": s.rendered_at,
                "writes": s.writes,
                "last_error": s.last_error,
                "holds": {name: value.version for name, value in sorted(s.holds.items())},
            }
            for s in self.templates
        ]


def _names(cfg: TemplateConfig | EnvTemplateConfig, target: str) -> bool:
    """Whether a change to ``cfg``'s file is for ``target`` to hear about."""
    return cfg.notify is None or target in cfg.notify


def _expiring(value: SecretValue, now: float) -> float | None:
    """Seconds left when ``value`` expires within the readiness margin, else None."""
    remaining = value.remaining(now)
    if remaining is None:
        return None
    duration = value.lease_duration or max(remaining, 1.0)
    return remaining if remaining <= readiness_margin(duration) else None
