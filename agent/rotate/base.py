"""What every kind of rotated credential provides to the manager.

The manager owns the protocol (claim, publish, retire, audit); a rotator only
knows how to make, check, undo and retire one kind of credential.
"""

from __future__ import annotations

import secrets
import ssl
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.errors import SidecarError
from agent.lazy import load_class
from agent.rotate.config import AdminConfig, RotateConfig
from agent.rotate.store import Record
from agent.secret import SecretValue

if TYPE_CHECKING:
    from agent.vault.client import VaultClient

Fields = dict[str, Any]
_ALPHABET = string.ascii_letters + string.digits


def alternate(users: tuple[str, str], record: Record) -> tuple[str, str | None]:
    """Dual-user kinds: (the user to rotate now, the active one whose grants it copies)."""
    a, b = users
    active = (record.current or {}).get("username")
    if active == a:
        return b, a
    if active == b:
        return a, b
    return a, None


def new_password(length: int) -> str:
    """Random letters and digits: safe in every server's syntax and in every template."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


class RotationError(SidecarError):
    """A rotation step failed. The message names the step and never carries a secret."""


@dataclass
class RotatorContext:
    vault: VaultClient | None
    lookup: Callable[[str], SecretValue | None]  # the agent's current secrets, by name


class Rotator(ABC):
    def __init__(self, config: RotateConfig, context: RotatorContext) -> None:
        self.config = config
        self.context = context

    @property
    def admin(self) -> AdminConfig:
        assert self.config.admin is not None
        return self.config.admin

    def admin_login(self) -> tuple[str, str]:
        """(username, password) from the agent's admin secret named in ``admin.secret``."""
        value = self.context.lookup(self.admin.secret)
        if value is None:
            raise RotationError(f"admin secret {self.admin.secret} is not available yet")
        user = value.data.get("username") or value.data.get("user")
        password = value.data.get("password")
        if not user or password is None:
            raise RotationError(f"admin secret {self.admin.secret} needs username and password")
        return str(user), str(password)

    def admin_tls(self) -> ssl.SSLContext | None:
        """A verifying TLS context for ``admin.tls`` (hostname checked), else None."""
        if not self.admin.tls:
            return None
        ca = str(self.admin.ca_cert) if self.admin.ca_cert is not None else None
        try:
            return ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise RotationError(f"admin.ca_cert {ca}: {exc}") from None

    @abstractmethod
    async def create(self, record: Record) -> Fields:
        """Make the new credential; it is not yet published. ``record`` is the current one."""

    @abstractmethod
    async def verify(self, new: Mapping[str, Any]) -> None:
        """Prove the new credential works; raise RotationError if not."""

    async def rollback(self, record: Record, new: Mapping[str, Any]) -> bool:
        """Undo :meth:`create` after a failed verification; True when undone."""
        return True  # nothing outside this process changed

    async def retire(self, previous: Mapping[str, Any], current: Mapping[str, Any]) -> None:  # noqa: B027
        """Retire the previous credential once ``grace`` has passed."""

    def keep_previous(self, current: Mapping[str, Any]) -> Fields:
        """What of the replaced credential the record keeps until it is retired."""
        return dict(current)

    def view(self, record: Record) -> Fields:
        """The fields templates see as ``secrets.<name>.<field>``."""
        return dict(record.current or {})

    def expires_at(self, record: Record) -> float | None:
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """End every task this rotator started (shutdown)."""

    def due_at(self, record: Record) -> float:
        """When the next rotation is due (epoch seconds); now when nothing was rotated."""
        if record.rotated_at is None or record.current is None:
            return 0.0
        return float(record.rotated_at) + self.config.every


_KINDS = {
    "postgres-password": "agent.rotate.postgres:PasswordRotator",
    "postgres-dual-user": "agent.rotate.postgres:DualUserRotator",
    "jwt-keys": "agent.rotate.jwtkeys:JwtKeysRotator",
    "tls-cert": "agent.rotate.tls:TlsCertRotator",
    "command": "agent.rotate.command:CommandRotator",
    "redis-acl": "agent.rotate.redis:AclRotator",
    "mysql-password": "agent.rotate.mysql:PasswordRotator",
    "mysql-dual-user": "agent.rotate.mysql:DualUserRotator",
}


def create_rotator(config: RotateConfig, context: RotatorContext) -> Rotator:
    rotator_class: type[Rotator] = load_class(_KINDS[config.kind])
    return rotator_class(config, context)
