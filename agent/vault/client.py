"""Async layer over hvac: every request runs in a thread and fails with our errors.

hvac is synchronous, so calls go through :func:`asyncio.to_thread` on one
``requests.Session`` per client. Errors become :class:`VaultUnavailable`
(connection refused, timeout, 5xx, sealed, rate limited), :class:`VaultAuthError`
(401/403), :class:`VaultNotFound` (404, unknown or expired lease) or
:class:`VaultError`; messages name the operation and path, never a token.

The agent's own token: :meth:`VaultClient.keep_token_fresh` renews it at about
two thirds of its TTL and logs in again when it cannot be extended. Vault revokes a
token's leases together with the token, so the old token is *not* revoked on
re-login: its leases stay valid until it expires, and :meth:`token_deadline` tells
the sources when that is, so they replace those leases (make-before-break) in time.
This is what Vault Agent amounts to: after a re-authentication its templates fetch
fresh dynamic secrets with the new token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from agent import metrics
from agent.config import VaultConfig
from agent.errors import VaultAuthError, VaultError, VaultNotFound, VaultUnavailable
from agent.leases import Backoff, Relogin, Renew, TokenState, Wait, plan_token, renew_delay
from agent.logs import event
from agent.vault import auth
from agent.vault.auth import Token
from agent.vault.responses import Answer, Lease, Renewal, parse_auth, parse_lease, parse_renewal

T = TypeVar("T")

_UNAVAILABLE = (
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.VaultDown,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.RateLimitExceeded,
)
# 400 answers that mean "this lease is gone", not "you asked wrongly"
_GONE = ("lease not found", "invalid lease", "lease is not renewable", "lease expired")


_NETWORK_REASONS = (
    ("refused", "connection refused"),
    ("timed out", "timed out"),
    ("name or service not known", "unknown host"),
    ("certificate verify failed", "TLS certificate rejected"),
    ("reset by peer", "connection reset"),
)


def _network_reason(exc: BaseException) -> str:
    """A short cause for a requests failure; its own text is long and repeats the URL."""
    text = str(exc).lower()
    for needle, reason in _NETWORK_REASONS:
        if needle in text:
            return reason
    return type(exc).__name__


def map_error(operation: str, path: str, exc: BaseException, address: str = "") -> VaultError:
    """Our error for a failed hvac/requests call; the message never carries a token."""
    where = f"{operation} {path}" + (f" at {address}" if address else "")
    if isinstance(exc, VaultError):
        return exc
    if isinstance(exc, requests.exceptions.RequestException):
        return VaultUnavailable(f"{where}: Vault unreachable ({_network_reason(exc)})")
    if isinstance(exc, hvac.exceptions.VaultError):
        reason = str(exc.errors[0] if exc.errors else type(exc).__name__)[:200]
        if isinstance(exc, _UNAVAILABLE):
            return VaultUnavailable(f"{where}: {reason}")
        refused = hvac.exceptions.Unauthorized | hvac.exceptions.Forbidden
        if isinstance(exc, refused) or (
            # a login answers 400 to bad credentials ("invalid role or secret ID")
            operation == "login" and isinstance(exc, hvac.exceptions.InvalidRequest)
        ):
            return VaultAuthError(f"{where}: {reason}")
        if isinstance(exc, hvac.exceptions.InvalidPath):
            return VaultNotFound(f"{where}: not found")
        if isinstance(exc, hvac.exceptions.InvalidRequest) and any(
            g in reason.lower() for g in _GONE
        ):
            return VaultNotFound(f"{where}: {reason}")
        return VaultError(f"{where}: {reason}")
    return VaultError(f"{where}: {type(exc).__name__}")


def _kind(error: VaultError) -> str:
    if isinstance(error, VaultUnavailable):
        return "unavailable"
    if isinstance(error, VaultAuthError):
        return "auth"
    if isinstance(error, VaultNotFound):
        return "not_found"
    return "other"


class VaultClient:
    def __init__(
        self,
        config: VaultConfig,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.clock = clock  # wall clock, injectable: token decisions are tested without sleeping
        self.last_error: str | None = None
        self.reachable = False
        self.token_generation = 0
        self._token: Token | None = None
        self._token_requested = 0.0  # the TTL a fresh token gets; renewals ask for it
        self._token_capped = False  # a renewal was cut short: the token is at its max TTL
        self._token_refused = False  # Vault refused it (revoked, expired): log in again
        self._token_renew_at: float | None = None
        self._deadlines: dict[int, float | None] = {}  # superseded generation -> its expiry
        self._trouble = asyncio.Event()  # a request was refused: check the token now
        self._login_lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._session = requests.Session()
        verify: bool | str = not config.tls_skip_verify
        if config.ca_cert is not None and not config.tls_skip_verify:
            verify = str(config.ca_cert)
        if config.tls_skip_verify:
            # asked for explicitly: say so once, not with a warning on every request
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            event("tls_verify_disabled", logging.WARNING, address=config.address)
        # hvac lets a session's verify override its own argument, so set it on the session
        self._session.verify = verify
        # token="" keeps hvac from picking VAULT_TOKEN or ~/.vault-token behind our back
        self._hvac = hvac.Client(
            url=config.address,
            token="",
            verify=verify,
            timeout=config.timeout,
            session=self._session,
            namespace=config.namespace,
        )

    # ------------------------------------------------------------------ plumbing

    async def _call(self, operation: str, path: str, fn: Callable[[], T]) -> T:
        try:
            result = await asyncio.to_thread(fn)
        except Exception as exc:  # every failure is mapped below
            error = map_error(operation, path, exc, self.config.address)
            metrics.vault_errors_total.labels(operation=operation, kind=_kind(error)).inc()
            self.last_error = str(error)
            self.reachable = not isinstance(error, VaultUnavailable)
            if isinstance(error, VaultAuthError) and operation != "login":
                self._trouble.set()
            raise error from None
        self.reachable = True
        self.last_error = None
        return result

    # ------------------------------------------------------------------ requests

    async def read(self, path: str, operation: str = "read") -> dict[str, Any]:
        """GET ``/v1/<path>``; raises :class:`VaultNotFound` when there is nothing."""
        result = await self._call(operation, path, lambda: self._hvac.adapter.get(f"/v1/{path}"))
        if not isinstance(result, dict):
            raise VaultNotFound(f"{operation} {path}: empty response")
        return result

    async def write(
        self, path: str, data: dict[str, Any], operation: str = "write"
    ) -> dict[str, Any]:
        """POST ``/v1/<path>`` with a JSON body."""
        result = await self._call(
            operation, path, lambda: self._hvac.adapter.post(f"/v1/{path}", json=data)
        )
        return result if isinstance(result, dict) else {}

    async def issue_lease(self, path: str, operation: str = "issue") -> Lease:
        """GET a dynamic secret (``database/creds/<role>``): its lease and data.

        When the answer is malformed but names its lease, that lease is revoked at once:
        a credential we cannot use must not live on (one per retry) until its TTL.
        """
        raw = await self.read(path, operation)
        try:
            return parse_lease(operation, path, raw)
        except VaultError:
            lease_id = raw.get("lease_id")
            if isinstance(lease_id, str) and lease_id:
                with contextlib.suppress(VaultError):
                    await self.revoke_lease(lease_id)
            raise

    async def renew_lease(self, lease_id: str, increment: float | None = None) -> Renewal:
        inc = None if increment is None else max(1, int(increment))
        operation, path = "renew_lease", "sys/leases/renew"
        result = await self._call(
            operation, path, lambda: self._hvac.sys.renew_lease(lease_id=lease_id, increment=inc)
        )
        return parse_renewal(operation, path, result)

    async def lookup_lease(self, lease_id: str) -> dict[str, Any]:
        operation, path = "lookup_lease", "sys/leases/lookup"
        result = await self._call(operation, path, lambda: self._hvac.sys.read_lease(lease_id))
        return dict(Answer(operation, path, result).mapping("data"))

    async def revoke_lease(self, lease_id: str) -> None:
        await self._call(
            "revoke_lease", "sys/leases/revoke", lambda: self._hvac.sys.revoke_lease(lease_id)
        )

    # ------------------------------------------------------------------ the agent's token

    @property
    def token_expires_at(self) -> float | None:
        return self._token.expires_at if self._token else None

    @property
    def token_accessor(self) -> str | None:
        return self._token.accessor if self._token else None

    def token_deadline(self, generation: int) -> float | None:
        """When the token of ``generation`` dies for sure (and its leases with it).

        None while that token may still be extended; known once it was superseded
        by a re-login or its renewals hit the max TTL.
        """
        if generation != self.token_generation:
            return self._deadlines.get(generation)
        if self._token is not None and (self._token_capped or not self._token.renewable):
            return self._token.expires_at
        return None

    def on_token_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every re-login (sources re-check their leases).

        Returns a function that removes the callback again.
        """
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    async def login(self) -> None:
        """Log in with the configured method; VaultAuthError or VaultUnavailable on failure."""
        async with self._login_lock:
            method = self.config.auth.method
            mount = self.config.auth.mount or method
            where = "auth/token/lookup-self" if method == "token" else f"auth/{mount}/login"
            now = self.clock()
            token = await self._call(
                "login", where, lambda: auth.login(self._hvac, self.config.auth, now)
            )
            previous = self._token
            if previous is not None:
                # never revoke the old token: its leases live until it expires
                self._deadlines[self.token_generation] = previous.expires_at
                self.token_generation += 1
            self._token = token
            self._token_requested = token.ttl
            self._token_capped = self._token_refused = False
            self._token_renew_at = (
                token.obtained_at + renew_delay(token.ttl, self.rng) if token.ttl > 0 else None
            )
            self._trouble.clear()
            metrics.token_renewals_total.labels(action="login", result="ok").inc()
            event(
                "token_relogin" if previous else "logged_in",
                method=method,
                ttl=token.ttl,
                renewable=token.renewable,
            )
        if previous is not None:
            for callback in self._listeners:
                callback()

    async def _renew_token(self) -> None:
        token = self._token
        assert token is not None
        requested = self._token_requested
        operation, path = "renew_token", "auth/token/renew-self"
        result = await self._call(
            operation,
            path,
            lambda: self._hvac.auth.token.renew_self(increment=max(1, int(requested))),
        )
        info = parse_auth(operation, path, result)
        now = self.clock()
        ttl = info.lease_duration
        self._token = Token(
            value=token.value,
            ttl=ttl,
            renewable=info.renewable,
            obtained_at=now,
            accessor=token.accessor,
        )
        self._token_capped = ttl < requested
        self._token_renew_at = now + renew_delay(ttl, self.rng) if ttl > 0 else None
        metrics.token_renewals_total.labels(action="renew", result="ok").inc()
        event("token_renewed", ttl=ttl, capped=self._token_capped)

    async def _wait_trouble(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when a refused request said the token is in trouble."""
        try:
            await asyncio.wait_for(self._trouble.wait(), max(0.0, seconds))
        except TimeoutError:
            return False
        self._trouble.clear()
        return True

    def next_token_step(self) -> Wait | Renew | Relogin:
        """What the token keeper does next (:func:`agent.leases.plan_token`, now)."""
        token = self._token
        state = None
        if token is not None and not self._token_refused:
            # at the max TTL: log in now, while the old token's leases have time
            state = TokenState(self._token_renew_at, token.renewable, self._token_capped)
        return plan_token(state, self.clock())

    async def keep_token_fresh(self) -> None:
        """Renew the token at ~2/3 of its TTL; log in again when it cannot be renewed.

        Runs until cancelled. Failures back off with jitter (capped by the time the
        token has left) and are logged once per attempt. A request refused with 401/403
        makes it look the token up at once (and log in again when that fails too).
        """
        backoff = Backoff(self.config.retry_initial, self.config.retry_max, self.rng)
        check = False  # a refused request: look the token up before anything else
        while True:
            step = self.next_token_step()
            if isinstance(step, Wait) and not check:
                check = await self._wait_trouble(step.seconds)
                continue
            action = "check" if check else "renew" if isinstance(step, Renew) else "login"
            try:
                if action == "check":
                    await self._call(
                        "lookup_token",
                        "auth/token/lookup-self",
                        lambda: self._hvac.auth.token.lookup_self(),
                    )
                elif action == "renew":
                    await self._renew_token()  # capped: the next step logs in again
                else:
                    await self.login()
                check = False
                backoff.reset()
            except VaultAuthError as exc:
                if action != "login":
                    # the token was refused or revoked: get a new one now
                    check, self._token_refused = False, True
                    continue
                await self._back_off(backoff, "login", exc)
            except VaultError as exc:
                metrics.token_renewals_total.labels(action=action, result="error").inc()
                await self._back_off(backoff, action, exc)

    async def _back_off(self, backoff: Backoff, operation: str, exc: VaultError) -> None:
        expires = self.token_expires_at
        delay = backoff.next(None if expires is None else expires - self.clock())
        event(
            "vault_unavailable",
            logging.WARNING,
            operation=f"token_{operation}",
            error=str(exc),
            retry_in=round(delay, 3),
        )
        await asyncio.sleep(delay)

    async def close(self) -> None:
        self._session.close()
