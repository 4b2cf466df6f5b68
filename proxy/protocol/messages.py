"""PostgreSQL v3 wire format: framing, parsing and building of the messages the proxy reads.

Two framings exist: startup-phase packets (``int32 length, int32 code, payload``) and
regular messages (``byte type, int32 length, payload``); the length counts itself but
not the type byte. Everything here is pure and byte-exact; no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar

from mypy_extensions import i64

from proxy.protocol.errors import ProtocolViolation

# Final: compiled by mypyc, a Final constant is a C static; any other module-level
# name is a dict lookup at each use (the interpreter caches those, mypyc does not)
PROTOCOL_3_0: Final = 196608  # 3 << 16
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
# PostgreSQL refuses startup packets above this size (MAX_STARTUP_PACKET_LENGTH)
MAX_STARTUP_LENGTH: Final = 10000
# and regular messages above 1 GB (PQ_LARGE_MESSAGE_LIMIT)
MAX_MESSAGE_LENGTH: Final = (1 << 30) - 1
# and authentication messages before login above this (PG_MAX_AUTH_TOKEN_LENGTH)
MAX_AUTH_LENGTH: Final = 65535
# messages up to this size are held whole; larger ones of a streamable type pass through
DEFAULT_MESSAGE_BUFFER: Final = 256 * 1024
# how much of a streamed message is seen before it is forwarded: enough for the names
# a Bind is rewritten by, a Query's DISCARD check and an error's severity
STREAM_HEAD: Final = 512
CONTINUATION: Final = 0  # frame type of the further bytes of a streamed message

_I32: Final = struct.Struct("!i")
_I16: Final = struct.Struct("!h")
_HDR: Final = struct.Struct("!ci")
_unpack_i32: Final = _I32.unpack_from


_K = TypeVar("_K")
_V = TypeVar("_V")
KEPT: Final = 256  # entries of each of the proxy's small memos below and elsewhere
KEPT_SIZE: Final = 1024  # bytes or characters: anything larger is not kept


def remember(memo: dict[_K, _V], key: _K, value: _V, size: int) -> _V:
    """Put ``value`` in ``memo`` if ``size`` (of the key or value) is at most
    :data:`KEPT_SIZE`, emptying it first when it holds :data:`KEPT` entries: the proxy
    keeps what every login or session repeats (a few keys, a few short values), and
    what clients make up cannot grow it. A dict of our own, not lru_cache: compiled
    code can only call that through a generic Python call."""
    if size <= KEPT_SIZE:
        if len(memo) >= KEPT:
            memo.clear()
        memo[key] = value
    return value


_TYPE_TABLES: Final[dict[frozenset[int], bytes]] = {}


def type_table(types: frozenset[int]) -> bytes:
    """256 bytes, non-zero where a message type is in ``types``: checking a type is then
    one index, not a set lookup of a boxed int (this runs for every message). Kept:
    every connection's reader asks for one of the same few (a dict of our own, see
    :func:`remember`)."""
    table = _TYPE_TABLES.get(types)
    if table is None:
        table = bytes([1 if t in types else 0 for t in range(256)])
        remember(_TYPE_TABLES, types, table, 0)
    return table


_TRANSACTION_STATUSES: Final = type_table(frozenset(b"ITE"))  # idle, in one, in a failed one


def int32_at(buf: bytes, pos: i64) -> i64:
    """The big-endian signed 32-bit integer at ``pos``: struct's job, done in the loop
    itself because compiled it is a few machine instructions, not a call into Python
    (i64: a machine integer when compiled, an int otherwise)."""
    n = i64(buf[pos]) << 24 | i64(buf[pos + 1]) << 16 | i64(buf[pos + 2]) << 8 | buf[pos + 3]
    return n - 0x100000000 if n & 0x80000000 else n


# --- startup-phase packets (client -> server) -------------------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


SSL_REQUEST: Final = SSLRequest()  # made once, as proxy.protocol.events' SSL_REFUSED
GSSENC_REQUEST: Final = GSSENCRequest()


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int = field(repr=False)


class StartupMessage:
    """The client's startup parameters and protocol version: a value, never changed once
    made (:func:`parse_startup` hands the same one to every login with the same packet,
    and logins key their own memos by it, proxy/login.py).

    A plain class where the other packets are dataclasses: one is made at every login,
    and compiled, a dataclass's generated ``__init__`` stays Python code."""

    __slots__ = ("_hash", "parameters", "protocol")

    def __init__(self, parameters: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> None:
        self.parameters: Final = parameters
        self.protocol: Final = protocol
        self._hash = 0  # not computed yet: only a memo's key needs it, once

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StartupMessage):
            return NotImplemented
        return self.parameters == other.parameters and self.protocol == other.protocol

    def __hash__(self) -> int:
        if not self._hash:
            self._hash = hash((frozenset(self.parameters.items()), self.protocol))
        return self._hash

    def __repr__(self) -> str:
        return f"StartupMessage(parameters={self.parameters!r}, protocol={self.protocol!r})"


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


class Message:
    """A regular message: ``type`` is the one-byte code, ``data`` the whole frame.

    A plain class, as StartupMessage: one is made for each message the pipeline reads
    one by one (the extended protocol's), and a dataclass's ``__init__`` is Python code."""

    __slots__ = ("data", "type")

    def __init__(self, type: bytes, data: bytes) -> None:
        self.type: Final = type
        self.data: Final = data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.type == other.type and self.data == other.data

    def __hash__(self) -> int:
        return hash((self.type, self.data))

    def __repr__(self) -> str:
        return f"Message(type={self.type!r}, data={self.data!r})"

    @property
    def body(self) -> bytes:
        return self.data[5:]


def cstrings(body: bytes, violation: type[ProtocolViolation]) -> list[str]:
    """Split a run of NUL-terminated strings (the last must be terminated)."""
    if body and body[-1] != 0:
        raise violation("string not NUL-terminated")
    if not body:
        return []
    try:
        # decoded whole, then split: a NUL byte is a NUL character in UTF-8 and in
        # nothing else, and one decode is far cheaper than one per string
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise violation("string is not valid UTF-8") from exc
    return text[:-1].split("\0")


def parse_startup(packet: bytes, violation: type[ProtocolViolation]) -> StartupPacket:
    """Decode one complete startup-phase packet (length prefix included)."""
    if len(packet) < 8:
        raise violation(f"startup packet of {len(packet)} bytes is too short")
    code = int32_at(packet, 4)
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if len(packet) != 8:
            raise violation("SSLRequest/GSSENCRequest with a payload")
        return SSL_REQUEST if code == SSL_REQUEST_CODE else GSSENC_REQUEST
    if code == CANCEL_REQUEST_CODE:
        if len(packet) != 16:
            raise violation(f"CancelRequest of {len(packet)} bytes")
        pid, key = struct.unpack_from("!ii", packet, 8)
        return CancelRequest(pid, key)
    if code >> 16 != 3:
        raise violation(f"unsupported protocol version {code >> 16}.{code & 0xFFFF}")
    kept = _STARTUP_PACKETS.get(packet)
    if kept is not None:
        return kept  # the packet every connection of an application's pool sends
    body = packet[8:]
    # a terminating empty name ends the list: "name\0value\0...\0"
    if not body.endswith(b"\0"):
        raise violation("startup parameters not terminated")
    parts = cstrings(body[:-1], violation) if len(body) > 1 else []
    if len(parts) % 2:
        raise violation("startup parameter without a value")
    params: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        if not parts[i]:
            raise violation("empty startup parameter name")
        params[parts[i]] = parts[i + 1]
    return remember(_STARTUP_PACKETS, packet, StartupMessage(params, code), len(packet))


# startup packets parsed, by their bytes (a connection per transaction sends the same one)
_STARTUP_PACKETS: Final[dict[bytes, StartupMessage]] = {}


class FrameReader:
    """Accumulates bytes and cuts them into complete frames without copying the rest.

    A message of ``limit`` bytes or more is never held whole: if its type is in
    ``streamable`` it is handed on in pieces (its head as a frame of its own type once
    :data:`STREAM_HEAD` bytes are in, then :data:`CONTINUATION` frames of whatever
    arrives until it is complete); any other type of that size is a violation.
    """

    __slots__ = (
        "_buf",
        "_left",
        "_pos",
        "_types",
        "_violation",
        "limit",
        "ready_at",
        "streamable",
    )

    def __init__(
        self,
        violation: type[ProtocolViolation],
        types: frozenset[int],
        limit: int = DEFAULT_MESSAGE_BUFFER,
        streamable: frozenset[int] = frozenset(),
    ) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._violation = violation
        self._types = type_table(types)  # those :meth:`frames` accepts
        self.ready_at = -1
        self.limit = max(limit, STREAM_HEAD + 5)
        self.streamable = streamable
        self._left = 0  # bytes of a streamed message still to come

    def feed(self, data: bytes) -> None:
        if self._pos:
            # compact lazily: only when the consumed prefix dominates the buffer
            if self._pos >= len(self._buf):
                self._buf.clear()
                self._pos = 0
            elif self._pos > 65536:
                del self._buf[: self._pos]
                self._pos = 0
        self._buf += data

    @property
    def pending(self) -> int:
        return len(self._buf) - self._pos

    @property
    def streaming(self) -> bool:
        """The last frame returned was the start or a piece of an unfinished message."""
        return self._left > 0

    def frames(self, data: bytes) -> tuple[bytes, list[tuple[int, int, int]]]:
        """Bulk path: ``data`` plus what was pending, cut into ``(type, start, end)`` frames.

        Returns the bytes holding the frames (``data`` itself, uncopied, when nothing
        was pending and it ends on a frame boundary) and their offsets; an incomplete
        tail stays buffered (at most ``limit`` bytes: bigger messages stream, see the
        class). A type the reader was not given or a malformed ReadyForQuery raises; a
        Terminate ends the list (what follows it is left unread). ``ready_at`` is the
        start of the last ReadyForQuery, or -1.

        This is the proxy's hot path, hence one loop that frames and checks together.
        """
        frames: list[tuple[int, int, int]] = []
        pos: i64 = 0
        if self._left:
            # the middle of a streamed message: nothing is pending while one streams
            pos = min(self._left, len(data))
            self._left -= pos
            frames.append((CONTINUATION, 0, pos))
            if self._left:
                self.ready_at = -1
                return data, frames
            buf = data
        elif len(self._buf) > self._pos:
            self._buf += data
            # a message arriving in pieces: wait for all of it before copying
            if len(self._buf) - self._pos >= 5:
                (length,) = _unpack_i32(self._buf, self._pos + 1)
                if 4 <= length < self.limit and len(self._buf) - self._pos <= length:
                    self.ready_at = -1
                    return b"", []
            buf = bytes(self._buf[self._pos :])
            self._buf.clear()
            self._pos = 0
        else:
            buf = data
        size: i64 = len(buf)
        types = self._types
        limit: i64 = self.limit
        ready_at: i64 = -1
        while size - pos >= 5:
            length = int32_at(buf, pos + 1)
            end = pos + 1 + length
            if length < 4 or length >= limit:
                t = buf[pos]
                if length < 4 or length > MAX_MESSAGE_LENGTH:
                    raise self._violation(f"invalid message length {length}")
                if not types[t]:
                    raise self._violation(f"unexpected message type {bytes([t])!r}")
                if t not in self.streamable:
                    raise self._violation(
                        f"message {bytes([t])!r} of {length} bytes is too large for the proxy"
                    )
                if end > size:
                    if size - pos >= STREAM_HEAD:
                        frames.append((t, pos, size))
                        self._left = end - size
                        pos = size
                    break
            if end > size:
                break
            t = buf[pos]
            if not types[t]:
                raise self._violation(f"unexpected message type {bytes([t])!r}")
            frames.append((t, pos, end))
            if t == 90:  # 'Z': exactly one status byte
                if length != 5 or not _TRANSACTION_STATUSES[buf[pos + 5]]:
                    raise self._violation("malformed ReadyForQuery")
                ready_at = pos
            elif t == 88:  # 'X': nothing after a Terminate counts
                self.ready_at = ready_at
                return buf[:end], frames
            pos = end
        self.ready_at = ready_at
        if pos < size:
            self._buf += buf[pos:]
            return buf[:pos], frames
        return buf, frames

    def single(self, data: bytes, type_: int) -> bool:
        """True when nothing is pending or streaming and ``data`` is exactly one whole
        message of type ``type_`` under ``limit``: the commonest read of a client. Nothing
        is consumed either way (False: :meth:`frames` takes the read)."""
        if self._left or len(self._buf) > self._pos or len(data) < 5 or data[0] != type_:
            return False
        length = int32_at(data, 1)
        return 4 <= length < self.limit and len(data) == 1 + length

    def answer_end(self, data: bytes, notable: bytes) -> i64:
        """:meth:`frames` for the commonest reads, with no list built: where the first
        ReadyForQuery of ``data`` ends, when nothing is pending or streaming and up to
        there ``data`` is whole messages, each under ``limit``, checked as :meth:`frames`
        checks them, none before that ReadyForQuery of a type that ``notable`` (a
        :func:`type_table`) marks. What follows it is not looked at. ``ready_at`` is set.

        -1: nothing was consumed or changed, and :meth:`frames` takes the read (and
        raises what it finds wrong)."""
        if self._left or len(self._buf) > self._pos:
            return -1
        size: i64 = len(data)
        types = self._types
        limit: i64 = self.limit
        pos: i64 = 0
        while size - pos >= 5:
            length = int32_at(data, pos + 1)
            end = pos + 1 + length
            if length < 4 or length >= limit or end > size:
                return -1
            t = data[pos]
            if not types[t]:
                return -1
            if notable[t]:
                if t != 90 or length != 5:
                    return -1
                if not _TRANSACTION_STATUSES[data[pos + 5]]:
                    return -1  # malformed: frames() says so
                self.ready_at = pos
                return end
            pos = end
        return -1

    def next_startup(self) -> bytes | None:
        buf = self._buf
        pos = self._pos
        if pos == 0 and 8 <= len(buf) <= MAX_STARTUP_LENGTH:
            # the usual case, a read that is one whole packet: compiled, a bytearray's
            # bytes(), clear() and struct lengths are generic calls, a concat and a
            # new buffer are not
            packet = b"" + buf
            if int32_at(packet, 0) == len(packet):
                self._buf = bytearray()
                return packet
        if len(buf) - pos < 4:
            return None
        length: int = _unpack_i32(buf, pos)[0]  # typed: compiled, compared as a number
        if length < 8 or length > MAX_STARTUP_LENGTH:
            raise self._violation(f"invalid startup packet length {length}")
        end = pos + length
        if len(buf) < end:
            return None
        self._pos = end
        return bytes(buf[pos:end])

    def next_message(self, max_length: int = MAX_MESSAGE_LENGTH) -> Message | None:
        """One whole message (startup phase: callers pass a small ``max_length``)."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return None
        (length,) = _unpack_i32(buf, pos + 1)
        if length < 4 or length > max_length:
            raise self._violation(f"invalid message length {length}")
        end = pos + 1 + length
        if len(buf) < end:
            return None
        self._pos = end
        return Message(bytes(buf[pos : pos + 1]), bytes(buf[pos:end]))


# --- builders -----------------------------------------------------------------------


def message(type_: bytes, body: bytes = b"") -> bytes:
    return _HDR.pack(type_, len(body) + 4) + body


def cstr(value: str) -> bytes:
    return value.encode() + b"\0"


def startup_message(parameters: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(protocol) + b"".join(cstr(k) + cstr(v) for k, v in parameters.items())
    body += b"\0"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return struct.pack("!ii", 8, GSSENC_REQUEST_CODE)


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, process_id, secret_key)


def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + payload)


AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12


_PARAMETER_STATUS: Final[dict[tuple[str, str], bytes]] = {}


def parameter_status(name: str, value: str) -> bytes:
    # kept: every login sends a dozen, nearly always the same ones
    key = (name, value)
    out = _PARAMETER_STATUS.get(key)
    if out is None:
        out = message(b"S", cstr(name) + cstr(value))
        remember(_PARAMETER_STATUS, key, out, len(out))
    return out


_KEY_DATA_HEAD: Final = b"K\0\0\0\x0c"  # its length: fixed
_two_int32: Final = struct.Struct("!ii").pack  # bound once: a direct call, not by name


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return _KEY_DATA_HEAD + _two_int32(process_id, secret_key)


def ready_for_query(status: bytes) -> bytes:
    return message(b"Z", status)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def password_message(payload: bytes) -> bytes:
    return message(b"p", payload)


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unsupported))
    return message(b"v", body + b"".join(cstr(o) for o in unsupported))


# Final with the type spelled out: mypyc checks this package on its own, where the
# import cycle through proxy.protocol.__init__ leaves inferred types undetermined in
# pipeline.py; Final makes each a C static (another name is an attribute lookup)
TERMINATE: Final[bytes] = message(b"X")
SYNC: Final[bytes] = message(b"S")
PARSE_COMPLETE: Final[bytes] = message(b"1")
CLOSE_COMPLETE: Final[bytes] = message(b"3")
# what every login ends with: built once
AUTHENTICATION_OK: Final[bytes] = message(b"R", b"\0\0\0\0")  # AUTH_OK
READY_IDLE: Final[bytes] = message(b"Z", b"I")


def error_response(
    sqlstate: str, text: str, severity: str = "FATAL", detail: str | None = None
) -> bytes:
    fields = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(sqlstate)]
    fields.append(b"M" + cstr(text))
    if detail:
        fields.append(b"D" + cstr(detail))
    return message(b"E", b"".join(fields) + b"\0")


def parse_error_fields(body: bytes, violation: type[ProtocolViolation]) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by their one-letter code."""
    if not body.endswith(b"\0"):
        raise violation("error fields not terminated")
    out: dict[str, str] = {}
    for item in cstrings(body[:-1], violation):
        if not item:
            raise violation("empty error field")
        out[item[0]] = item[1:]
    return out


_PARAMETER_STATUS_BODIES: Final[dict[bytes, tuple[str, str]]] = {}


def parse_parameter_status(body: bytes, violation: type[ProtocolViolation]) -> tuple[str, str]:
    # kept: in session pooling every client's reset and settings report the same few
    parsed = _PARAMETER_STATUS_BODIES.get(body)
    if parsed is None:
        parts = cstrings(body, violation)
        if len(parts) != 2:
            raise violation("ParameterStatus without name and value")
        parsed = remember(_PARAMETER_STATUS_BODIES, body, (parts[0], parts[1]), len(body))
    return parsed


def parse_int32(body: bytes, offset: int, violation: type[ProtocolViolation]) -> int:
    if len(body) < offset + 4:
        raise violation("message too short")
    return int(_unpack_i32(body, offset)[0])


def parse_int16(body: bytes, offset: int, violation: type[ProtocolViolation]) -> int:
    if len(body) < offset + 2:
        raise violation("message too short")
    return int(_I16.unpack_from(body, offset)[0])


def read_cstr(body: bytes, offset: int, violation: type[ProtocolViolation]) -> tuple[str, int]:
    """The NUL-terminated string at ``offset`` and the offset just after it."""
    end = body.find(b"\0", offset)
    if end < 0:
        raise violation("string not NUL-terminated")
    try:
        return body[offset:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise violation("string is not valid UTF-8") from exc
