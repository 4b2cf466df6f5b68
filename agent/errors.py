"""One exception tree for the agent.

Every error says what failed, the value seen (never a secret) and where: a config
key path, a template name or a peer address. Classes also inherit the matching
standard exception so callers that catch ``ValueError`` or ``OSError`` keep working.
"""

from __future__ import annotations

from collections.abc import Iterable


class SidecarError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(SidecarError, ValueError):
    """The configuration is invalid. Carries every problem found, each with its key path."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


class VaultError(SidecarError):
    """A Vault-API request failed."""


class VaultUnavailable(VaultError, ConnectionError):
    """Vault could not be reached or answered 5xx; worth retrying later."""


class VaultAuthError(VaultError, PermissionError):
    """Login failed or the token was refused (permission denied, expired)."""


class VaultNotFound(VaultError, LookupError):
    """The path or lease does not exist (or is not renewable any more)."""


class RenderError(SidecarError):
    """A template failed to render or its destination could not be written."""


class NotifyError(SidecarError):
    """The application could not be told about a change."""
