"""Typed events of the startup and authentication phases.

Regular-phase traffic stays a :class:`~proxy.protocol.messages.Message` (type byte +
raw frame) so the hot path forwards bytes without decoding them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from proxy.protocol import messages as m


@dataclass(frozen=True, slots=True)
class SSLResponse:
    """The proxy's one-byte answer to SSLRequest/GSSENCRequest: 'S' (accept) or 'N'."""

    accept: bool


# Events without a payload are made once: building a frozen dataclass runs its
# generated __init__ (Python code, even compiled), and these come with every login.
SSL_ACCEPTED: Final = SSLResponse(True)
SSL_REFUSED: Final = SSLResponse(False)


@dataclass(frozen=True, slots=True)
class AuthenticationRequest:
    """An ``Authentication*`` request other than Ok: code and payload (salt, SASL data)."""

    code: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    pass


AUTHENTICATION_OK: Final = AuthenticationOk()


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """A 'p' message: cleartext/MD5 password or SASL data; never logged (repr hides it)."""

    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unsupported: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    fields: dict[str, str]

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "XX000")

    @property
    def text(self) -> str:
        return self.fields.get("M", "")

    @classmethod
    def make(cls, sqlstate: str, text: str, severity: str = "FATAL") -> ErrorResponse:
        return cls({"S": severity, "V": severity, "C": sqlstate, "M": text})

    def to_bytes(self) -> bytes:
        body = b"".join(k.encode() + m.cstr(v) for k, v in self.fields.items()) + b"\0"
        return m.message(b"E", body)


@dataclass(frozen=True, slots=True)
class NoticeResponse:
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    process_id: int
    secret_key: int = field(repr=False)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: bytes  # b"I" idle, b"T" in a transaction, b"E" in a failed transaction


@dataclass(frozen=True, slots=True)
class Terminate:
    pass


ClientEvent = (
    m.SSLRequest
    | m.GSSENCRequest
    | m.CancelRequest
    | m.StartupMessage
    | PasswordMessage
    | Terminate
    | m.Message
)
ServerEvent = (
    AuthenticationRequest
    | AuthenticationOk
    | NegotiateProtocolVersion
    | ErrorResponse
    | NoticeResponse
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | m.Message
)
