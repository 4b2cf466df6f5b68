"""Log in to Vault: token, token file, AppRole, Kubernetes and JWT.

Synchronous (hvac is); :class:`agent.vault.client.VaultClient` runs these in a
thread and maps errors. Credentials read from files are re-read on every login,
so a rotated token file or projected service-account token is picked up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AuthConfig
from agent.errors import VaultAuthError
from agent.vault.responses import parse_auth, parse_token_lookup


@dataclass(frozen=True)
class Token:
    """The agent's own token. ``ttl`` 0 means it never expires (a root token)."""

    value: str = field(repr=False)
    ttl: float
    renewable: bool
    obtained_at: float  # wall clock
    accessor: str | None = None

    @property
    def expires_at(self) -> float | None:
        return self.obtained_at + self.ttl if self.ttl > 0 else None


def _read_file(path: Path, what: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise VaultAuthError(f"login: cannot read {what} {path}: {exc.strerror}") from None
    if not text:
        raise VaultAuthError(f"login: {what} {path} is empty")
    return text


def _value(inline: str | None, path: Path | None, what: str) -> str:
    if inline:
        return inline
    if path is not None:
        return _read_file(path, what)
    raise VaultAuthError(f"login: no {what} configured")


def login(client: Any, auth: AuthConfig, now: float) -> Token:
    """Obtain a token with ``auth`` on the hvac ``client`` (which keeps it set); ``now``
    is when it was asked for. A malformed answer is a VaultError naming the field."""
    method = auth.method
    if method == "token":
        token = _value(auth.token, auth.token_file, "token")
        client.token = token
        info = parse_token_lookup(
            "login", "auth/token/lookup-self", client.auth.token.lookup_self(), token
        )
    else:
        mount = auth.mount or method
        if method == "approle":
            response = client.auth.approle.login(
                role_id=_value(auth.role_id, auth.role_id_file, "role_id"),
                secret_id=_value(auth.secret_id, auth.secret_id_file, "secret_id"),
                mount_point=mount,
                use_token=False,
            )
        elif method == "kubernetes":
            jwt = _value(None, auth.jwt_file, "service account token")
            response = client.auth.kubernetes.login(
                role=auth.role, jwt=jwt, mount_point=mount, use_token=False
            )
        elif method == "jwt":
            jwt = _value(None, auth.jwt_file, "jwt")
            response = client.auth.jwt.jwt_login(
                role=auth.role, jwt=jwt, path=mount, use_token=False
            )
        else:
            raise VaultAuthError(f"login: unknown auth method {method!r}")
        info = parse_auth("login", f"auth/{mount}/login", response)
        client.token = info.client_token
    return Token(
        value=info.client_token,
        ttl=info.lease_duration,
        renewable=info.renewable,
        obtained_at=now,
        accessor=info.accessor,
    )
