"""One error class per side of the wire, h11 style.

``ClientProtocolViolation`` means the client sent something we cannot accept (the
proxy answers 08P01); ``ServerProtocolViolation`` means the upstream server did.
"""

from __future__ import annotations


class ProtocolViolation(ValueError):
    """Bytes that are not valid PostgreSQL protocol at this point of the conversation."""

    sqlstate = "08P01"


class ClientProtocolViolation(ProtocolViolation):
    """The client broke the protocol."""


class StatementTooLarge(ClientProtocolViolation):
    """A named Parse larger than the proxy holds: it cannot be kept for re-preparing."""

    sqlstate = "54000"  # program_limit_exceeded


class StatementLimit(ClientProtocolViolation):
    """A client keeps more named statements than the proxy holds for one client."""

    sqlstate = "53400"  # configuration_limit_exceeded


class ServerProtocolViolation(ProtocolViolation):
    """The upstream server broke the protocol."""


class UnsupportedParameter(ValueError):
    """A startup parameter the proxy cannot carry (the client gets 08P01)."""

    sqlstate = "08P01"


class AuthenticationFailed(ValueError):
    """A login did not succeed; ``sqlstate`` is what the client is told (no secrets)."""

    def __init__(self, message: str, sqlstate: str = "28P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
