"""Wires sources, the render pipeline, notification, exec, HTTP and the proxy together.

Every part that runs on its own - the token keeper, each source, the render loop, the
rotations, each notifier, the proxy - runs under one :class:`Supervisor`, which
restarts a failed part alone while the others keep serving. The runtime holds the
handles and shuts them down in the order written in :meth:`Runtime._shutdown`.

:meth:`Runtime.run` returns the exit code and never raises an error of ours: the last
log line (``stopped``) gives the code and, for a failure, why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent import metrics
from agent.config import Config
from agent.errors import RenderError, SidecarError, VaultUnavailable
from agent.execenv import ExecEnv
from agent.files import check_memory_backed, non_regular
from agent.leases import Backoff
from agent.logs import event
from agent.pipeline import RenderPipeline
from agent.secret import SecretValue
from agent.sources import create as create_source
from agent.sources.base import Source, SourceContext
from agent.supervisor import Supervisor, describe_failure

if TYPE_CHECKING:
    from agent.ledger import Ledger
    from agent.notify import Notifier
    from agent.proxybridge import ProxyBridge
    from agent.rotate.manager import Outcome, RotationManager
    from agent.supervise import Child
    from agent.vault.client import VaultClient

EXIT_OK, EXIT_FAILURE = 0, 1
PROXY_DRAIN = 10.0  # seconds for transactions through the proxy to end at shutdown
ROTATION_DRAIN = 30.0  # half a rotation costs a claim timeout: let it finish
RENDER_SETTLE = 10.0  # for the render pass in flight at shutdown


class Runtime:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        vault = config.vault
        retry = (vault.retry_initial, vault.retry_max) if vault else (0.5, 30.0)
        # the exec child's templated variables, rendered by the pipeline like files
        self.exec_env = ExecEnv(config.exec.env_template) if config.exec is not None else None
        self.pipeline = RenderPipeline(
            config.templates,
            config.secrets,
            on_delivered=self._delivered,
            retry=retry,
            clock=clock,
            exec_env=self.exec_env,
        )
        self.supervisor = Supervisor(initial=retry[0], maximum=retry[1])
        self.vault: VaultClient | None = None
        self.ledger: Ledger | None = None
        self.sources: dict[str, Source] = {}
        self.notifiers: list[Notifier] = []
        self.child: Child | None = None
        self.proxy: ProxyBridge | None = None
        self.rotations: RotationManager | None = None
        self._stopping = asyncio.Event()
        self._started_at = clock()
        self.exit_code = EXIT_OK
        self.exit_reason: str | None = None
        self._rng = random.Random()

    @property
    def values(self) -> dict[str, SecretValue]:
        return self.pipeline.values

    # ------------------------------------------------------------------ setup

    async def _connect(self) -> None:
        """Log in to Vault when a secret needs it, and create the sources."""
        if self.config.secrets and self.ledger is None:
            from agent.ledger import Ledger

            self.ledger = Ledger(self.config.state_dir)  # refuses a state_dir that is not ours
        if self.config.needs_vault() and self.vault is None:
            from agent.vault.client import VaultClient

            assert self.config.vault is not None
            self.vault = VaultClient(self.config.vault, clock=self.clock)
        if self.vault is not None:
            await self.vault.login()
        context = SourceContext(
            publish=self.pipeline.publish,
            vault=self.vault,
            ledger=self.ledger,
            revoked=self.pipeline.mark_revoked,
            clock=self.clock,
        )
        self.sources = {
            name: create_source(cfg, context) for name, cfg in self.config.secrets.items()
        }

    async def _start_source(self, source: Source) -> None:
        await self.pipeline.publish(await source.start())

    def _delivered(self, name: str, version: str, at: float) -> None:
        source = self.sources.get(name)
        if source is not None:
            source.delivered(version, at)

    def _check_destinations(self) -> list[str]:
        problems = []
        for cfg in self.pipeline.files:
            if not cfg.destination.parent.is_dir():
                problems.append(
                    f"template {cfg.name}: directory {cfg.destination.parent} does not exist"
                )
                continue
            if (why := non_regular(cfg.destination)) is not None:
                problems.append(f"template {cfg.name}: destination {cfg.destination}: {why}")
            if not cfg.allow_disk:
                try:
                    check_memory_backed(cfg.destination)
                except RenderError as exc:
                    problems.append(str(exc))
        return problems

    # ------------------------------------------------------------------ observation

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = self.pipeline.readiness(self.clock())
        if self.rotations is not None:
            reasons.extend(self.rotations.not_ready())
        if self.proxy is not None:
            reasons.extend(self.proxy.not_ready())
        if self._stopping.is_set():
            reasons.append("shutting down")
        ready = not reasons
        metrics.ready.set(1 if ready else 0)
        return ready, reasons

    def _update_gauges(self) -> None:
        now = self.clock()
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
        if self.config.proxy is not None:
            from agent.proxybridge import ProxyBridge

            registries.append(ProxyBridge.registry())
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
            "templates": self.pipeline.status(),
            "parts": self.supervisor.status(),
        }
        if self.ledger is not None:
            out["ledger"] = {"stale": sorted(self.ledger.stale)}
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
                failures.append(f"secret {source.name}: {describe_failure(result)['error']}")
        burst = await self.pipeline.render_all()
        failures.extend(burst.failed)
        for state in self.pipeline.templates:
            if state.rendered_at is None and not any(state.config.name in f for f in failures):
                missing = sorted(state.needs - self.values.keys())
                failures.append(f"template {state.config.name}: missing secrets {missing}")
        if self.vault is not None:
            await self.vault.close()
        return failures

    # ------------------------------------------------------------------ run

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set (or the exec child exits). Returns the exit code."""
        try:
            await self._serve(stop)
        except SidecarError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug in the runtime itself: still end cleanly, and say so
            self._fail("unexpected " + " at ".join(describe_failure(exc).values()))
        if self.exit_reason is None:
            event("stopped", code=self.exit_code)
        else:
            event("stopped", logging.ERROR, code=self.exit_code, error=self.exit_reason)
        return self.exit_code

    def _fail(self, reason: str) -> None:
        self.exit_reason = reason
        if self.exit_code == EXIT_OK:
            self.exit_code = EXIT_FAILURE

    async def _serve(self, stop: asyncio.Event) -> None:
        problems = self._check_destinations()
        if problems:
            raise SidecarError("; ".join(problems))
        from agent import statedir

        statedir.prepare(self.config.state_dir)  # ours, or refuse to start
        admin = await self._start_admin()
        try:
            await self._serve_probed(stop)
        finally:
            if admin is not None:
                await admin.aclose()

    async def _serve_probed(self, stop: asyncio.Event) -> None:
        health = await self._start_health()
        # owned here (awaited or cancelled below), so that a startup failure still gets
        # the ordered shutdown
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
            owned = [t for t in (stopper, startup, child_exit) if t is not None]
            for task in owned:
                task.cancel("shutdown")
            await asyncio.gather(*owned, return_exceptions=True)
            try:
                await self._shutdown()
            finally:
                if health is not None:
                    await health.aclose()  # last: probes see "shutting down" until the end

    async def _start_admin(self) -> Any:
        if not self.config.admin:
            return None
        from agent.admin import AdminServer

        admin = AdminServer(self.config.admin, self)
        await admin.start()  # owner-only: status, refresh, rotate
        return admin

    async def _start_health(self) -> Any:
        if self.config.health is None:
            return None
        from agent.http import HealthServer

        listen = self.config.health
        health = HealthServer(self, listen.listen_host, listen.listen_port)
        try:
            await health.start()
        except OSError as exc:
            where = f"{listen.listen_host}:{listen.listen_port}"
            raise SidecarError(f"health.listen {where}: {exc.strerror or exc}") from None
        event("listening", address=f"{listen.listen_host}:{health.bound_port}")
        return health

    async def _startup(self) -> None:
        await self._retry(self._connect, VaultUnavailable, operation="login")
        if self.vault is not None:
            self.supervisor.start("vault-token", self.vault.keep_token_fresh)
        await asyncio.gather(
            *(
                self._retry(functools.partial(self._start_source, s), Exception, secret=s.name)
                for s in self.sources.values()
            )
        )
        if self.config.notify:
            from agent.notify import Notifier

            self.notifiers = [Notifier(cfg) for cfg in self.config.notify.values()]
            self.pipeline.targets.extend(self.notifiers)
        if self.config.proxy is not None:
            from agent.proxybridge import ProxyBridge

            self.proxy = ProxyBridge(self.config.proxy)
            self.pipeline.consumers.append(self.proxy.push)
        # the first pass: an application already running learns of the new files
        await self.pipeline.run_pass()
        for source in self.sources.values():
            self.supervisor.start(f"source:{source.name}", source.run)
        self.supervisor.start("render", self.pipeline.run)
        if self.config.rotate:
            from agent.rotate.manager import RotationManager

            # after the sources: a rotation logs in with an admin secret of the agent
            self.rotations = RotationManager(
                self.config.rotate, self.vault, self.values.get, self.pipeline.publish
            )
            self.supervisor.start("rotate", self.rotations.run)
        for notifier in self.notifiers:
            self.supervisor.start(f"notify:{notifier.cfg.name}", notifier.run)
        if self.proxy is not None:
            self.supervisor.start("proxy", self.proxy.run)
        if self.config.exec is not None:
            from agent.supervise import Child

            assert self.exec_env is not None
            child = Child(self.config.exec, self.exec_env)
            await child.start()  # after the first pass: it starts with its files and variables
            self.child = child  # only a started child is stopped (and waited for) at shutdown
            self.pipeline.targets.append(child)

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
                if isinstance(exc, SidecarError):
                    level, failure = logging.WARNING, {"error": str(exc)}
                else:  # not a failure we know: counted like a part's, and retried
                    metrics.task_failures_total.labels("startup").inc()
                    level, failure = logging.ERROR, describe_failure(exc)
                event("startup_retry", level, retry_in=delay, **failure, **fields)
                await asyncio.sleep(delay)

    async def _shutdown(self) -> None:
        self._stopping.set()  # /readyz says "shutting down" from here on
        event("stopping")
        parts = self.supervisor.parts
        # 1. stop accepting: the proxy closes its listeners, lets transactions end (up to
        #    its deadline), then ends the rest with 57P01
        if self.proxy is not None:
            await self.proxy.stop(timeout=PROXY_DRAIN)
        # 2. no new rotation step; a step in flight finishes (it holds a claim), then the
        #    rotations' own tasks end and their stores close
        if self.rotations is not None:
            await self.rotations.aclose(ROTATION_DRAIN)
        if "rotate" in parts:
            await parts["rotate"].stop()
        # 3. stop obtaining: the sources, then the token keeper that serves them
        for source in self.sources.values():
            if (part := parts.get(f"source:{source.name}")) is not None:
                await part.stop()
        if "vault-token" in parts:
            await parts["vault-token"].stop()
        # 4. render what was obtained: the pass in flight (or due) finishes, up to a deadline
        if "render" in parts:
            if not await self.pipeline.settle(RENDER_SETTLE):
                event("render_abandoned", logging.WARNING, after=RENDER_SETTLE)
            await parts["render"].stop()
        await self.pipeline.aclose()  # a render still running in a thread gives up
        # 5. tell the application about what was written, then stop the notifiers
        for notifier in self.notifiers:
            await notifier.flush()
            if (part := parts.get(f"notify:{notifier.cfg.name}")) is not None:
                await part.stop()
        # 6. release what the sources hold (revoke only when configured)
        for source in self.sources.values():
            with contextlib.suppress(SidecarError):
                await source.close(revoke=self.config.revoke_on_shutdown)
        # 7. the child last but one: it ran on our credentials until now
        if self.child is not None:
            code = await self.child.aclose()
            if code is not None and self.exit_code == EXIT_OK:
                self.exit_code = code
        # 8. whatever part is left (the proxy's, finished by now), then Vault
        await self.supervisor.aclose()
        if self.vault is not None:
            await self.vault.close()


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
