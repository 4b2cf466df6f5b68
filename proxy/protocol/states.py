"""The two state machines of a proxied conversation, as tables (h11 style).

``CLIENT_*`` is the proxy's view of the client (the proxy plays the server);
``SERVER_*`` is its view of the upstream (the proxy plays the client). A table maps
``(state, event kind)`` to the next state; anything missing is a protocol violation
of the side that caused it.
"""

from __future__ import annotations

from enum import Enum
from typing import Final, TypeVar, final


class ClientState(Enum):
    STARTUP = "startup"  # waiting for SSLRequest / GSSENCRequest / CancelRequest / Startup
    NEGOTIATING = "negotiating"  # SSLRequest/GSSENCRequest seen; proxy owes 'S' or 'N'
    AUTHENTICATING = "authenticating"  # StartupMessage seen; proxy decides how to log in
    PASSWORD = "password"  # proxy asked for a password / SASL message
    READY = "ready"  # logged in: regular messages
    CLOSED = "closed"

    # The tables below are keyed by state: Enum's own hash is Python code, which
    # compiled lookups would call on every message of a login. Members are singletons.
    __hash__ = object.__hash__


class ServerState(Enum):
    IDLE = "idle"  # nothing sent yet
    AUTHENTICATING = "authenticating"  # StartupMessage sent; server asks for credentials
    STARTING = "starting"  # AuthenticationOk seen; ParameterStatus/BackendKeyData follow
    READY = "ready"  # first ReadyForQuery seen: regular messages
    FAILED = "failed"  # ErrorResponse during startup
    CLOSED = "closed"

    __hash__ = object.__hash__  # as ClientState's


# --- client: what the client may send (event kind -> next state) ---------------------
CLIENT_RECEIVE: Final[dict[tuple[ClientState, str], ClientState]] = {
    (ClientState.STARTUP, "SSLRequest"): ClientState.NEGOTIATING,
    (ClientState.STARTUP, "GSSENCRequest"): ClientState.NEGOTIATING,
    (ClientState.STARTUP, "CancelRequest"): ClientState.CLOSED,
    (ClientState.STARTUP, "StartupMessage"): ClientState.AUTHENTICATING,
    (ClientState.PASSWORD, "PasswordMessage"): ClientState.AUTHENTICATING,
    (ClientState.READY, "Message"): ClientState.READY,
    (ClientState.READY, "Terminate"): ClientState.CLOSED,
}

# --- client: what the proxy may send to the client ----------------------------------
CLIENT_SEND: Final[dict[tuple[ClientState, str], ClientState]] = {
    (ClientState.NEGOTIATING, "SSLResponse"): ClientState.STARTUP,
    (ClientState.AUTHENTICATING, "AuthenticationRequest"): ClientState.PASSWORD,
    (ClientState.AUTHENTICATING, "AuthenticationOk"): ClientState.READY,
    (ClientState.AUTHENTICATING, "ErrorResponse"): ClientState.CLOSED,
    (ClientState.AUTHENTICATING, "NegotiateProtocolVersion"): ClientState.AUTHENTICATING,
    (ClientState.STARTUP, "ErrorResponse"): ClientState.CLOSED,
    (ClientState.PASSWORD, "ErrorResponse"): ClientState.CLOSED,
    (ClientState.READY, "ErrorResponse"): ClientState.READY,
    (ClientState.READY, "Message"): ClientState.READY,
}

_S = TypeVar("_S", ClientState, ServerState)


def by_state(table: dict[tuple[_S, str], _S]) -> dict[_S, dict[str, _S]]:
    """``table`` looked up in two steps, state then kind: compiled, two dict lookups
    cost a third of building and hashing a tuple key (four a client login)."""
    out: dict[_S, dict[str, _S]] = {}
    for (state, kind), nxt in table.items():
        out.setdefault(state, {})[kind] = nxt
    return out


CLIENT_RECEIVE_BY_STATE: Final = by_state(CLIENT_RECEIVE)
CLIENT_SEND_BY_STATE: Final = by_state(CLIENT_SEND)

# Regular-phase message types a client may send (Bind, Close, CopyData, CopyDone,
# CopyFail, Describe, Execute, Flush, FunctionCall, Parse, Query, Sync, Terminate).
FRONTEND_TYPES: Final = frozenset(b"BCdcfDEHFPQSX")
# those that may be larger than the proxy's message buffer: they stream through (a Parse
# only without a statement name; a Bind's names are in its head)
FRONTEND_STREAMABLE: Final = frozenset(b"QdFBP")

# --- server: what the server may send (event kind -> next state) --------------------
SERVER_RECEIVE: Final[dict[tuple[ServerState, str], ServerState]] = {
    (ServerState.AUTHENTICATING, "AuthenticationRequest"): ServerState.AUTHENTICATING,
    (ServerState.AUTHENTICATING, "AuthenticationOk"): ServerState.STARTING,
    (ServerState.AUTHENTICATING, "NegotiateProtocolVersion"): ServerState.AUTHENTICATING,
    (ServerState.AUTHENTICATING, "ErrorResponse"): ServerState.FAILED,
    (ServerState.AUTHENTICATING, "NoticeResponse"): ServerState.AUTHENTICATING,
    (ServerState.STARTING, "ParameterStatus"): ServerState.STARTING,
    (ServerState.STARTING, "BackendKeyData"): ServerState.STARTING,
    (ServerState.STARTING, "NoticeResponse"): ServerState.STARTING,
    (ServerState.STARTING, "ErrorResponse"): ServerState.FAILED,
    (ServerState.STARTING, "ReadyForQuery"): ServerState.READY,
    (ServerState.READY, "Message"): ServerState.READY,
}

# --- server: what the proxy may send to the server ----------------------------------
SERVER_SEND: Final[dict[tuple[ServerState, str], ServerState]] = {
    (ServerState.IDLE, "StartupMessage"): ServerState.AUTHENTICATING,
    (ServerState.AUTHENTICATING, "PasswordMessage"): ServerState.AUTHENTICATING,
    (ServerState.READY, "Message"): ServerState.READY,
    (ServerState.READY, "Terminate"): ServerState.CLOSED,
}

# Regular-phase message types a server may send.
BACKEND_TYPES: Final = frozenset(b"123AcdCDEGHIKnNsStTVWZ")
# those that may stream: rows, copy data, descriptions, notices and errors (the proxy
# reads only their heads), notifications, function results
BACKEND_STREAMABLE: Final = frozenset(b"DdTNEAVt")


# --- the client session of the I/O shell (proxy/session.py) -------------------------
@final
class SessionState:
    """Where a client session is; one value instead of flags (PgBouncer's client lists).

    The states are the constants below. A class of its own rather than an Enum: a
    session moves twice a transaction, and compiled, checking a move is then two
    field reads (an Enum member's hash and attributes are Python code)."""

    __slots__ = ("bit", "moves", "value")

    def __init__(self, value: str, index: int) -> None:
        self.value = value
        self.bit = 1 << index
        self.moves = 0  # the bits of the states it may go to (from SESSION_MOVES)

    def __repr__(self) -> str:
        return f"SessionState({self.value!r})"


LOGIN: Final = SessionState("login", 0)  # startup, TLS, client auth, the first server connection
IDLE: Final = SessionState("idle", 1)  # logged in, no server connection attached
WAITING: Final = SessionState("waiting", 2)  # requests queued until the pool hands over one
ACTIVE: Final = SessionState("active", 3)  # a server connection is attached
MIGRATING: Final = SessionState("migrating", 4)  # session mode: reading its state to move on
DRAINING: Final = SessionState("draining", 5)  # the proxy is stopping: ends at its boundary
CLOSED: Final = SessionState("closed", 6)
SESSION_STATES: Final = (LOGIN, IDLE, WAITING, ACTIVE, MIGRATING, DRAINING, CLOSED)

SESSION_MOVES: Final[dict[SessionState, frozenset[SessionState]]] = {
    LOGIN: frozenset({ACTIVE, CLOSED}),  # login attaches a server connection
    IDLE: frozenset({WAITING, ACTIVE, CLOSED}),
    WAITING: frozenset({ACTIVE, IDLE, CLOSED}),  # IDLE: no server, refused
    ACTIVE: frozenset({IDLE, MIGRATING, DRAINING, CLOSED}),
    MIGRATING: frozenset({ACTIVE, IDLE, DRAINING, CLOSED}),
    DRAINING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}
for _state, _targets in SESSION_MOVES.items():
    _state.moves = sum(target.bit for target in _targets)


def session_move(state: SessionState, new: SessionState) -> SessionState:
    """``new`` if a session may go there from ``state``; anything else is a proxy bug."""
    if not state.moves & new.bit:
        raise RuntimeError(f"proxy bug: session cannot go from {state.value} to {new.value}")
    return new
