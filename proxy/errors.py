"""Errors of the proxy's I/O layer (the protocol layer has its own in ``protocol.errors``)."""

from __future__ import annotations

from proxy.protocol.errors import (
    AuthenticationFailed,
    ClientProtocolViolation,
    ProtocolViolation,
    ServerProtocolViolation,
)

__all__ = [
    "CONNECT_FAILED",
    "AuthenticationFailed",
    "ClientFatal",
    "ClientProtocolViolation",
    "ProtocolViolation",
    "ServerProtocolViolation",
    "UpstreamAuthError",
    "UpstreamError",
    "client_text",
    "server_text",
]


CONNECT_FAILED = "could not connect to the database server"
UPSTREAM_USER = "(upstream user)"


class UpstreamError(ConnectionError):
    """Connecting to or logging in to the upstream server failed.

    ``str(exc)`` is the operator's account (server address, upstream user, the server's
    own words): for the proxy's log only. A client is told ``sqlstate`` and
    ``client_text``, which never name the upstream (see :func:`client_text`).
    """

    def __init__(
        self, detail: str, sqlstate: str = "08006", client_text: str = CONNECT_FAILED
    ) -> None:
        super().__init__(detail)
        self.sqlstate = sqlstate
        self.client_text = client_text

    def located(self, where: str, user: str) -> UpstreamError:
        """The same error, its detail prefixed with the server address and upstream user."""
        return type(self)(f"upstream {where} as {user}: {self}", self.sqlstate, self.client_text)


class UpstreamAuthError(UpstreamError):
    """The upstream server rejected the credentials (SQLSTATE class 28)."""


def server_text(text: str, user: str, host: str) -> str:
    """A server's ErrorResponse text, fit for a client: PostgreSQL's words, with the
    upstream user name and host (quoted, as PostgreSQL quotes them) left out."""
    for name, instead in ((user, UPSTREAM_USER), (host, "(upstream host)")):
        if name:
            text = text.replace(f'"{name}"', f'"{instead}"')
    return text


def client_text(exc: Exception) -> str:
    """What a client may be told about ``exc`` (an upstream failure, or the proxy's own)."""
    return exc.client_text if isinstance(exc, UpstreamError) else str(exc)


class ClientFatal(Exception):
    """End a client's session with this SQLSTATE and message (what the client is told)."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
