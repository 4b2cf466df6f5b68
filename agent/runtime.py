"""Wires sources, renders, notification, exec, HTTP and the proxy into one supervisor.

Every task has an owner (one TaskGroup). Shutdown goes in order, like uvicorn's:
stop accepting (proxy), stop obtaining (sources), finish the render in flight,
deliver pending notifications, optionally revoke, stop the child, stop HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import metrics
from agent.config import Config, TemplateConfig
from agent.errors import RenderError, SidecarError, VaultUnavailable
from agent.files import check_memory_backed, write_destination
from agent.leases import Backoff, readiness_margin
from agent.logs import event
from agent.render import Template
from agent.secret import SecretValue
from agent.sources import create as create_source
from agent.sources.base import Source, SourceContext

if TYPE_CHECKING:
    from agent.notify import Notifier
    from agent.rotate.manager import Outcome, RotationManager
    from agent.supervise import Child
    from agent.vault.client import VaultClient


@dataclass
class TemplateState:
    config: TemplateConfig
    template: Template
    needs: frozenset[str]
    rendered_at: float | None = None
    last_error: str | None = None
    writes: int = 0


@dataclass
class Burst:
    """What one render pass did."""

    written: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Runtime:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.values: dict[str, SecretValue] = {}
        self.templates = [self._compile(t) for t in config.templates]
        self.vault: VaultClient | None = None
        self.sources: dict[str, Source] = {}
        self.notifiers: list[Notifier] = []
        self.child: Child | None = None
        self.proxy: Any = None
        self.proxy_provider: Any = None
        self.rotations: RotationManager | None = None
        self._dirty = asyncio.Event()
        self._render_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._started_at = time.time()
        self.exit_code = 0
        self._tg: asyncio.TaskGroup
        self._tasks: list[asyncio.Task[Any]] = []
        self._rng = random.Random()

    def _compile(self, cfg: TemplateConfig) -> TemplateState:
        template = Template(cfg)
        # a template that picks secrets dynamically waits for all of them
        needs = set(self.config.secrets) if template.dynamic else template.secret_names()
        return TemplateState(cfg, template, frozenset(needs))

    # ------------------------------------------------------------------ setup

    async def _connect(self) -> None:
        """Log in to Vault when a secret needs it, and create the sources."""
        ledger = None
        if self.config.secrets:
            from agent.ledger import Ledger

            ledger = Ledger(self.config.state_dir)  # refuses a state_dir that is not ours
        if self.config.needs_vault():
            from agent.vault.client import VaultClient

            assert self.config.vault is not None
            self.vault = VaultClient(self.config.vault)
            await self.vault.login()
        context = SourceContext(publish=self._publish, vault=self.vault, ledger=ledger)
        self.sources = {
            name: create_source(cfg, context) for name, cfg in self.config.secrets.items()
        }

    async def _start_source(self, source: Source) -> None:
        value = await source.start()
        self.values[source.name] = value

    async def _publish(self, value: SecretValue) -> None:
        self.values[value.name] = value
        self._dirty.set()

    # ------------------------------------------------------------------ rendering

    def _check_destinations(self) -> list[str]:
        problems = []
        for state in self.templates:
            cfg = state.config
            if not cfg.destination.parent.is_dir():
                problems.append(
                    f"template {cfg.name}: directory {cfg.destination.parent} does not exist"
                )
                continue
            if not cfg.allow_disk:
                try:
                    check_memory_backed(cfg.destination)
                except RenderError as exc:
                    problems.append(str(exc))
        return problems

    async def render_all(self) -> Burst:
        """Render every template whose secrets are known; write the ones that changed.

        All renders of a burst happen before any write, and all writes before anyone is
        notified, so a consumer woken by the notification sees every file updated.
        """
        burst = Burst()
        async with self._render_lock:
            outputs: list[tuple[TemplateState, bytes]] = []
            for state in self.templates:
                if not state.needs <= self.values.keys():
                    continue
                try:
                    outputs.append((state, state.template.render(self.values)))
                except RenderError as exc:
                    self._render_failed(state, burst, str(exc))
            for state, data in outputs:
                cfg = state.config
                try:
                    changed = await asyncio.to_thread(write_destination, cfg, data)
                except RenderError as exc:
                    self._render_failed(state, burst, str(exc))
                    continue
                state.rendered_at, state.last_error = time.time(), None
                metrics.renders_total.labels(cfg.name, "written" if changed else "unchanged").inc()
                if changed:
                    state.writes += 1
                    burst.written.append(cfg.name)
                    event("rendered", template=cfg.name, bytes=len(data))
        return burst

    def _render_failed(self, state: TemplateState, burst: Burst, reason: str) -> None:
        state.last_error = reason
        burst.failed.append(reason)
        metrics.renders_total.labels(state.config.name, "error").inc()
        event("render_failed", logging.ERROR, template=state.config.name, error=reason)

    def _notify(self) -> None:
        for notifier in self.notifiers:
            notifier.trigger()
        if self.child is not None:
            self.child.trigger()

    async def _render_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            burst = await self.render_all()
            self._push_proxy_credentials()
            if burst.written:
                self._notify()

    # ------------------------------------------------------------------ proxy

    def _push_proxy_credentials(self) -> None:
        if self.proxy_provider is None:
            return
        name = self.config.proxy.credentials.secret if self.config.proxy else None
        value = self.values.get(name) if name else None
        if value is not None:
            self.proxy_provider.update(
                str(value.data.get("username", "")), str(value.data.get("password", ""))
            )

    async def _start_proxy(self) -> None:
        if self.config.proxy is None:
            return
        from proxy.credentials import FileCredentialProvider, StaticCredentialProvider
        from proxy.server import ProxyServer

        pcfg = self.config.proxy
        if pcfg.credentials.file is not None:
            provider: Any = FileCredentialProvider(pcfg.credentials.file)
        else:
            provider = self.proxy_provider = StaticCredentialProvider()
            self._push_proxy_credentials()
        self.proxy = ProxyServer(pcfg, provider)
        await self.proxy.start()

    # ------------------------------------------------------------------ observation

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        now = time.time()
        for name in self.config.secrets:
            value = self.values.get(name)
            if value is None:
                reasons.append(f"secret {name}: not obtained yet")
                continue
            remaining = value.remaining(now)
            if remaining is not None:
                duration = value.lease_duration or max(remaining, 1.0)
                if remaining <= readiness_margin(duration):
                    reasons.append(f"secret {name}: expires in {remaining:.1f}s")
        if self.rotations is not None:
            reasons.extend(self.rotations.not_ready())
        for state in self.templates:
            if state.rendered_at is None:
                reasons.append(f"template {state.config.name}: not rendered yet")
        ready = not reasons and not self._stopping.is_set()
        if self._stopping.is_set():
            reasons.append("shutting down")
        metrics.ready.set(1 if ready else 0)
        return ready, reasons

    def _update_gauges(self) -> None:
        now = time.time()
        for name, value in self.values.items():
            metrics.secret_age_seconds.labels(name).set(now - value.issued_at)
            remaining = value.remaining(now)
            if remaining is not None:
                metrics.lease_ttl_remaining_seconds.labels(name).set(max(0.0, remaining))

    def metrics_text(self) -> bytes:
        from agent.http import metrics_text

        self._update_gauges()
        self.readiness()
        registries: list[Any] = [metrics.REGISTRY]
        if self.proxy is not None:
            from proxy.metrics import REGISTRY as PROXY_REGISTRY

            registries.append(PROXY_REGISTRY)
        return metrics_text(*registries)

    def status(self) -> dict[str, Any]:
        ready, reasons = self.readiness()
        secrets = {}
        for name, cfg in self.config.secrets.items():
            value = self.values.get(name)
            secrets[name] = {
                "kind": cfg.kind,
                "path": cfg.path,
                **(value.status() if value else {"version": None}),
            }
        out: dict[str, Any] = {
            "ready": ready,
            "reasons": reasons,
            "started_at": self._started_at,
            "secrets": secrets,
            "templates": [
                {
                    "destination": s.config.name,
                    "rendered_at": s.rendered_at,
                    "writes": s.writes,
                    "last_error": s.last_error,
                }
                for s in self.templates
            ],
        }
        if self.vault is not None:
            out["vault"] = {"reachable": self.vault.reachable, "last_error": self.vault.last_error}
        if self.proxy is not None:
            out["proxy"] = self.proxy.status()
        if self.rotations is not None:
            out["rotations"] = self.rotations.status()
        return out

    async def rotate(self, name: str, *, now: bool = False) -> Outcome:
        """Rotate ``name`` now (admin ``POST /rotate/<name>``); KeyError when it is not
        rotated; ``now`` overrides the previous credential's grace."""
        if name not in self.config.rotate:
            raise KeyError(name)
        if self.rotations is None:
            raise SidecarError("the agent is still starting: rotations are not running yet")
        return await self.rotations.rotate_now(name, now)

    def refresh(self, secret: str | None) -> list[str]:
        if secret is not None and secret not in self.sources:
            raise KeyError(secret)
        names = [secret] if secret else list(self.sources)
        for name in names:
            self.sources[name].wake()
        return names

    # ------------------------------------------------------------------ once

    async def run_once(self) -> list[str]:
        """Obtain every secret and render every template once. Returns the failures."""
        failures = self._check_destinations()
        if failures:
            return failures
        try:
            await self._connect()
        except SidecarError as exc:
            return [f"vault: {exc}"]
        results = await asyncio.gather(
            *(self._start_source(s) for s in self.sources.values()), return_exceptions=True
        )
        for source, result in zip(self.sources.values(), results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failures.append(f"secret {source.name}: {result}")
        burst = await self.render_all()
        failures.extend(burst.failed)
        for state in self.templates:
            if state.rendered_at is None and not any(state.config.name in f for f in failures):
                missing = sorted(state.needs - self.values.keys())
                failures.append(f"template {state.config.name}: missing secrets {missing}")
        if self.vault is not None:
            await self.vault.close()
        return failures

    # ------------------------------------------------------------------ run

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set (or the exec child exits). Returns the exit code."""
        problems = self._check_destinations()
        if problems:
            raise SidecarError("; ".join(problems))
        from agent import statedir
        from agent.admin import AdminServer

        statedir.prepare(self.config.state_dir)  # ours, or refuse to start
        admin = AdminServer(self.config.admin, self) if self.config.admin else None
        health = None
        try:
            if admin is not None:
                await admin.start()  # owner-only: status, refresh, rotate
            if self.config.health is not None:
                from agent.http import HealthServer

                listen = self.config.health
                health = HealthServer(self, listen.listen_host, listen.listen_port)
                await health.start()
                event("listening", address=f"{listen.listen_host}:{health.bound_port}")
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self._serve(stop)
        finally:
            if health is not None:
                await health.aclose()
            if admin is not None:
                await admin.aclose()
        return self.exit_code

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self._tasks.append(self._tg.create_task(coro, name=name))

    async def _serve(self, stop: asyncio.Event) -> None:
        # these three are owned here (awaited or cancelled below), not by the TaskGroup,
        # so a startup failure still gets the ordered shutdown instead of a group abort
        startup = asyncio.create_task(self._startup(), name="startup")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        child_exit: asyncio.Task[int] | None = None
        try:
            done, _ = await asyncio.wait({startup, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if startup not in done:
                return
            startup.result()  # a startup error ends the run, after the ordered shutdown
            if self.child is None:
                await stopper
                return
            child_exit = asyncio.create_task(self.child.wait(), name="child")
            await asyncio.wait([stopper, child_exit], return_when=asyncio.FIRST_COMPLETED)
            if child_exit.done():
                self.exit_code = child_exit.result()
        finally:
            for task in (stopper, startup, child_exit):
                if task is not None:
                    task.cancel()
            await asyncio.gather(stopper, startup, return_exceptions=True)
            await self._shutdown()

    async def _startup(self) -> None:
        await self._retry(self._connect, VaultUnavailable, operation="login")
        if self.vault is not None:
            self._spawn(self.vault.keep_token_fresh(), "vault-token")
        await asyncio.gather(
            *(
                self._retry(functools.partial(self._start_source, s), SidecarError, secret=s.name)
                for s in self.sources.values()
            )
        )
        first = await self.render_all()
        for source in self.sources.values():
            self._spawn(source.run(), f"source-{source.name}")
        self._spawn(self._render_loop(), "render")
        if self.config.rotate:
            from agent.rotate.manager import RotationManager

            # after the sources: a rotation logs in with an admin secret of the agent
            self.rotations = RotationManager(
                self.config.rotate, self.vault, self.values.get, self._publish
            )
            self._spawn(self.rotations.run(), "rotate")
        if self.config.notify:
            from agent.notify import Notifier

            self.notifiers = [Notifier(cfg) for cfg in self.config.notify.values()]
            for notifier in self.notifiers:
                self._spawn(notifier.run(), f"notify-{notifier.cfg.name}")
                if first.written:  # an app already running must learn of the new files
                    notifier.trigger()
        await self._start_proxy()
        if self.config.exec is not None:
            from agent.supervise import Child

            self.child = Child(self.config.exec)
            await self.child.start()

    async def _retry(
        self, attempt: Callable[[], Awaitable[None]], retryable: type[Exception], **fields: Any
    ) -> None:
        """Call ``attempt`` until it succeeds, backing off (with jitter) on ``retryable``."""
        vault = self.config.vault
        backoff = Backoff(
            vault.retry_initial if vault else 0.5, vault.retry_max if vault else 30.0, self._rng
        )
        while True:
            try:
                await attempt()
                return
            except retryable as exc:
                delay = backoff.next()
                event("startup_retry", logging.WARNING, error=str(exc), retry_in=delay, **fields)
                await asyncio.sleep(delay)

    async def _shutdown(self) -> None:
        tasks = self._tasks
        self._stopping.set()
        event("stopping")
        if self.proxy is not None:
            await self.proxy.stop(timeout=10.0)
        if self.rotations is not None:
            await self.rotations.aclose(30.0)  # half a rotation costs a claim timeout
        for task in tasks:
            if task.get_name().startswith(("source-", "vault-token")):
                task.cancel()
        # let a render already in flight finish, then deliver what is pending
        async with self._render_lock:
            pass
        for notifier in self.notifiers:
            await notifier.flush()
        for task in tasks:
            task.cancel()
        for source in self.sources.values():
            with contextlib.suppress(SidecarError):
                await source.close(revoke=self.config.revoke_on_shutdown)
        if self.child is not None:
            code = await self.child.aclose()
            if code is not None and self.exit_code == 0:
                self.exit_code = code
        if self.vault is not None:
            await self.vault.close()
        event("stopped", code=self.exit_code)


def install_signal_handlers(stop: asyncio.Event, runtime: Runtime) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        event("signal_received", signal=sig.name)
        if runtime.child is not None:
            runtime.child.forward(sig)  # the child's exit ends the run
        else:
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
