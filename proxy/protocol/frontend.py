"""The proxy's side of a client conversation, sans I/O.

Feed bytes read from the client to :meth:`ClientConnection.receive_data`, take events
from :meth:`next_event` until it returns ``None`` (needs more data), and turn what the
proxy wants to say into bytes with :meth:`send`. Once logged in, regular messages are
cut into frames by :meth:`receive_frames` (the hot path). The states and the legal transitions
are the tables in :mod:`proxy.protocol.states`.
"""

from __future__ import annotations

from typing import Final

from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol.errors import ClientProtocolViolation
from proxy.protocol.states import (
    CLIENT_RECEIVE_BY_STATE,
    CLIENT_SEND_BY_STATE,
    FRONTEND_STREAMABLE,
    FRONTEND_TYPES,
    ClientState,
)

# Final: compiled, a C static; ClientState.X is an attribute lookup on the class
_STARTUP: Final = ClientState.STARTUP
_PASSWORD: Final = ClientState.PASSWORD
_READY: Final = ClientState.READY
_V: Final = ClientProtocolViolation  # passed as a value: an imported name is a dict read
_Outgoing = (
    ev.SSLResponse
    | ev.AuthenticationRequest
    | ev.AuthenticationOk
    | ev.ErrorResponse
    | ev.NegotiateProtocolVersion
    | m.Message
)


class ClientConnection:
    __slots__ = ("_reader", "negotiated", "state")

    def __init__(self, limit: int = m.DEFAULT_MESSAGE_BUFFER) -> None:
        self.state = _STARTUP
        self._reader = m.FrameReader(_V, FRONTEND_TYPES, limit, FRONTEND_STREAMABLE)
        self.negotiated: set[str] = set()  # SSLRequest / GSSENCRequest already answered

    def receive_data(self, data: bytes) -> None:
        self._reader.feed(data)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (must be 0 before a TLS switch)."""
        return self._reader.pending

    @property
    def mid_message(self) -> bool:
        """The head of a message streaming through is forwarded, its tail is still to
        come: it must reach the same server connection."""
        return self._reader.streaming

    def next_event(self) -> ev.ClientEvent | None:
        """The next complete startup-phase event, or ``None`` when more bytes are needed.

        Once logged in (READY) it always returns ``None``: regular messages are read
        with :meth:`receive_frames`, which starts with whatever is still buffered.
        """
        state = self.state
        if state is _STARTUP:
            packet = self._reader.next_startup()
            if packet is None:
                return None
            event = m.parse_startup(packet, _V)
            kind = type(event).__name__
            if kind in self.negotiated:
                raise ClientProtocolViolation(f"{kind} sent twice")
            self._advance(CLIENT_RECEIVE_BY_STATE, kind)
            # a tuple, not X | Y: compiled, that union would be built at every call
            if isinstance(event, (m.SSLRequest, m.GSSENCRequest)):
                self.negotiated.add(kind)
            return event
        if state is _PASSWORD:
            # before login nothing is streamed: an oversized message is refused (08P01)
            msg = self._reader.next_message(m.MAX_AUTH_LENGTH)
            if msg is None:
                return None
            if msg.type != b"p":
                raise ClientProtocolViolation(f"expected a password message, got {msg.type!r}")
            self._advance(CLIENT_RECEIVE_BY_STATE, "PasswordMessage")
            return ev.PasswordMessage(msg.body)
        if state is _READY:
            return None
        if self._reader.pending:
            raise ClientProtocolViolation(f"unexpected data while {state.value}")
        return None

    def receive_frames(self, data: bytes) -> tuple[bytes, list[tuple[int, int, int]]]:
        """Bulk path once READY: ``data`` cut into checked ``(type, start, end)`` frames.

        A Terminate ends the list (and the conversation: the state becomes CLOSED).
        """
        if self.state is not _READY:
            raise RuntimeError("receive_frames before the client is logged in")
        buf, frames = self._reader.frames(data)
        if frames and frames[-1][0] == 88:  # 'X'
            self.state = ClientState.CLOSED
            del frames[-1]
        return buf, frames

    def receive_query(self, data: bytes) -> bool:
        """True when ``data`` is one whole simple Query and nothing else: it can go to
        the server as it is. False: nothing was read; use :meth:`receive_frames`."""
        if self.state is not _READY:
            raise RuntimeError("receive_query before the client is logged in")
        return self._reader.single(data, 81)  # 'Q'

    def send(self, event: _Outgoing) -> bytes:
        """Bytes for ``event``; advances the state (raises on an illegal send)."""
        if isinstance(event, m.Message) and self.state is _READY:
            return event.data
        self._advance(CLIENT_SEND_BY_STATE, type(event).__name__)
        if isinstance(event, ev.SSLResponse):
            return b"S" if event.accept else b"N"
        if isinstance(event, ev.AuthenticationRequest):
            return m.authentication(event.code, event.payload)
        if isinstance(event, ev.AuthenticationOk):
            return m.AUTHENTICATION_OK
        if isinstance(event, ev.ErrorResponse):
            return event.to_bytes()
        if isinstance(event, ev.NegotiateProtocolVersion):
            return m.negotiate_protocol_version(event.newest_minor, list(event.unsupported))
        return event.data

    def _advance(self, table: dict[ClientState, dict[str, ClientState]], kind: str) -> None:
        moves = table.get(self.state)
        nxt = moves.get(kind) if moves is not None else None
        if nxt is None:
            if table is CLIENT_RECEIVE_BY_STATE:
                raise ClientProtocolViolation(f"{kind} not expected while {self.state.value}")
            raise RuntimeError(f"proxy bug: cannot send {kind} while {self.state.value}")
        self.state = nxt
