"""Errors of the proxy's I/O layer (the protocol layer has its own in ``protocol.errors``)."""

from __future__ import annotations

from proxy.protocol.errors import (
    AuthenticationFailed,
    ClientProtocolViolation,
    ProtocolViolation,
    ServerProtocolViolation,
)

__all__ = [
    "AuthenticationFailed",
    "ClientProtocolViolation",
    "ProtocolViolation",
    "ServerProtocolViolation",
    "UpstreamAuthError",
    "UpstreamError",
]


class UpstreamError(ConnectionError):
    """Connecting to or logging in to the upstream server failed.

    ``sqlstate`` is what a client is told; the message names the server address and
    what went wrong, never a password.
    """

    def __init__(self, message: str, sqlstate: str = "08006") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class UpstreamAuthError(UpstreamError):
    """The upstream server rejected the credentials (SQLSTATE class 28)."""
