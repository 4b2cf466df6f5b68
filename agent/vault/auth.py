"""Log in to Vault: token, token file, AppRole, Kubernetes and JWT.

Synchronous (hvac is); :class:`agent.vault.client.VaultClient` runs these in a
thread and maps errors. Credentials read from files are re-read on every login,
so a rotated token file or projected service-account token is picked up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AuthConfig
from agent.errors import VaultAuthError


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


def login(client: Any, auth: AuthConfig) -> Token:
    """Obtain a token with ``auth`` on the hvac ``client`` (which keeps it set)."""
    now = time.time()
    method = auth.method
    if method == "token":
        client.token = _value(auth.token, auth.token_file, "token")
        data = client.auth.token.lookup_self()["data"]
        return Token(
            value=client.token,
            ttl=float(data.get("ttl") or 0),
            renewable=bool(data.get("renewable")),
            obtained_at=now,
            accessor=data.get("accessor"),
        )
    if method == "approle":
        response = client.auth.approle.login(
            role_id=_value(auth.role_id, auth.role_id_file, "role_id"),
            secret_id=_value(auth.secret_id, auth.secret_id_file, "secret_id"),
            mount_point=auth.mount or "approle",
            use_token=False,
        )
    elif method == "kubernetes":
        response = client.auth.kubernetes.login(
            role=auth.role,
            jwt=_value(None, auth.jwt_file, "service account token"),
            mount_point=auth.mount or "kubernetes",
            use_token=False,
        )
    elif method == "jwt":
        response = client.auth.jwt.jwt_login(
            role=auth.role,
            jwt=_value(None, auth.jwt_file, "jwt"),
            path=auth.mount or "jwt",
            use_token=False,
        )
    else:
        raise VaultAuthError(f"login: unknown auth method {method!r}")
    info = response["auth"]
    client.token = info["client_token"]
    return Token(
        value=info["client_token"],
        ttl=float(info.get("lease_duration") or 0),
        renewable=bool(info.get("renewable")),
        obtained_at=now,
        accessor=info.get("accessor"),
    )
