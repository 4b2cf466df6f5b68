"""The proxy's side of an upstream conversation (the proxy is the client), sans I/O.

Same shape as :mod:`proxy.protocol.frontend`: :meth:`ServerConnection.receive_data`,
:meth:`next_event`, :meth:`send`. During startup the events are typed; once the first
ReadyForQuery arrives messages are cut into frames by :meth:`receive_frames` and only
the transaction status of ReadyForQuery is tracked.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol.errors import ServerProtocolViolation
from proxy.protocol.parameters import keep_reported
from proxy.protocol.states import (
    BACKEND_STREAMABLE,
    BACKEND_TYPES,
    SERVER_RECEIVE,
    SERVER_SEND,
    ServerState,
)

_V: Final = ServerProtocolViolation
_READY: Final = ServerState.READY
# in the answer to a simple Query, the messages that need more than forwarding: an
# error, a ParameterStatus, and a ReadyForQuery that does not end the read
_ANSWER_ENDS: Final = m.type_table(frozenset(b"ESZ"))
# in the answer to a query of the proxy's own (a login's settings, the reset), all but
# CommandComplete and ParameterStatus: anything else takes the careful path
_INTERNAL_ANSWER_ENDS: Final = m.type_table(frozenset(range(256)) - frozenset(b"CS"))


class ServerConnection:
    __slots__ = ("_reader", "backend_key", "parameters", "state", "transaction_status")

    def __init__(self, limit: int = m.DEFAULT_MESSAGE_BUFFER) -> None:
        self.state = ServerState.IDLE
        self._reader = m.FrameReader(_V, BACKEND_TYPES, limit, BACKEND_STREAMABLE)
        self.parameters: dict[str, str] = {}
        self.backend_key: ev.BackendKeyData | None = None
        self.transaction_status = b"I"

    def receive_data(self, data: bytes) -> None:
        self._reader.feed(data)

    def next_event(self) -> ev.ServerEvent | None:
        """The next startup-phase event; ``None`` when more bytes are needed and always
        once READY (regular messages are read with :meth:`receive_frames`)."""
        if self.state is _READY:
            return None
        msg = self._reader.next_message(self._reader.limit)  # nothing streams before login
        if msg is None:
            return None
        event = self._decode_startup(msg)
        nxt = SERVER_RECEIVE.get((self.state, type(event).__name__))
        if nxt is None:
            raise _V(f"{type(event).__name__} not expected while {self.state.value}")
        self.state = nxt
        if isinstance(event, ev.ParameterStatus):
            keep_reported(self.parameters, event.name, event.value)
        elif isinstance(event, ev.BackendKeyData):
            self.backend_key = event
        elif isinstance(event, ev.ReadyForQuery):
            self.transaction_status = event.status
        return event

    def receive_frames(self, data: bytes) -> tuple[bytes, list[tuple[int, int, int]]]:
        """Bulk path once READY: ``data`` cut into checked ``(type, start, end)`` frames.

        The hot path: runs of messages can be forwarded as one slice.
        """
        if self.state is not _READY:
            raise RuntimeError("receive_frames before the connection is ready")
        reader = self._reader
        buf, frames = reader.frames(data)
        if reader.ready_at >= 0:
            self.transaction_status = buf[reader.ready_at + 5 : reader.ready_at + 6]
        return buf, frames

    def receive_answer(self, data: bytes) -> bool:
        """:meth:`receive_frames` for a read that is the whole plain answer to one simple
        Query (no error, ParameterStatus or ReadyForQuery before its end): True, and all
        of ``data`` goes to the client as it is. False: nothing was read; use
        :meth:`receive_frames`."""
        self._check_ready()
        if self._reader.answer_end(data, _ANSWER_ENDS) != len(data):
            return False
        self.transaction_status = data[-1:]
        return True

    def receive_internal_answer(self, data: bytes) -> i64:
        """:meth:`receive_answer` for a read that begins with the answer to a simple
        Query of the proxy's own (CommandComplete and ParameterStatus messages, then
        ReadyForQuery): where that answer ends. -1 when the read does not begin so:
        nothing was read."""
        self._check_ready()
        end = self._reader.answer_end(data, _INTERNAL_ANSWER_ENDS)
        if end >= 0:
            self.transaction_status = data[end - 1 : end]
        return end

    def _check_ready(self) -> None:
        if self.state is not _READY:
            raise RuntimeError("a regular message before the connection is ready")

    def _decode_startup(self, msg: m.Message) -> ev.ServerEvent:
        body = msg.body
        t = msg.type
        if t == b"R":
            code = m.parse_int32(body, 0, _V)
            if code == m.AUTH_OK:
                if len(body) != 4:
                    raise _V("AuthenticationOk with a payload")
                return ev.AUTHENTICATION_OK
            return ev.AuthenticationRequest(code, body[4:])
        if t == b"E":
            return ev.ErrorResponse(m.parse_error_fields(body, _V))
        if t == b"N":
            return ev.NoticeResponse(m.parse_error_fields(body, _V))
        if t == b"S":
            return ev.ParameterStatus(*m.parse_parameter_status(body, _V))
        if t == b"K":
            if len(body) != 8:
                raise _V("BackendKeyData of unexpected length")
            return ev.BackendKeyData(m.parse_int32(body, 0, _V), m.parse_int32(body, 4, _V))
        if t == b"Z":
            if body not in (b"I", b"T", b"E"):
                raise _V("malformed ReadyForQuery")
            return ev.ReadyForQuery(body)
        if t == b"v":
            minor = m.parse_int32(body, 0, _V)
            count = m.parse_int32(body, 4, _V)
            names = m.cstrings(body[8:], _V)
            if count != len(names):
                raise _V("NegotiateProtocolVersion count does not match")
            return ev.NegotiateProtocolVersion(minor, tuple(names))
        raise _V(f"unexpected message type {t!r} during startup")

    def send(
        self, event: m.StartupMessage | ev.PasswordMessage | ev.Terminate | m.Message
    ) -> bytes:
        if isinstance(event, m.Message) and self.state is _READY:
            return event.data
        nxt = SERVER_SEND.get((self.state, type(event).__name__))
        if nxt is None:
            raise RuntimeError(f"proxy bug: cannot send {type(event).__name__} in {self.state}")
        self.state = nxt
        if isinstance(event, m.StartupMessage):
            return m.startup_message(event.parameters, event.protocol)
        if isinstance(event, ev.PasswordMessage):
            return m.password_message(event.payload)
        if isinstance(event, ev.Terminate):
            return m.TERMINATE
        return event.data
