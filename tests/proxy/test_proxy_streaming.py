"""Big messages stream through the protocol layer: never held whole, bytes unchanged."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol.backend import ServerConnection
from proxy.protocol.errors import (
    ClientProtocolViolation,
    ServerProtocolViolation,
    StatementTooLarge,
)
from proxy.protocol.frontend import ClientConnection
from proxy.protocol.pipeline import Pipeline
from proxy.protocol.statements import ClientStatements, StatementNames

SMALL = 600  # a message buffer small enough that a few KiB stream


def _client(limit: int) -> ClientConnection:
    conn = ClientConnection(limit)
    conn.receive_data(m.startup_message({"user": "u"}))
    assert conn.next_event() is not None
    conn.send(ev.AuthenticationOk())
    return conn


def _server(limit: int) -> ServerConnection:
    conn = ServerConnection(limit)
    conn.send(m.StartupMessage({"user": "u"}))
    conn.receive_data(m.authentication(0) + m.ready_for_query(b"I"))
    while conn.next_event() is not None:
        pass
    return conn


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _row(size: int) -> bytes:
    return m.message(b"D", b"\0\1" + size.to_bytes(4, "big") + b"x" * size)


def test_reader_streams_a_big_message_in_pieces() -> None:
    reader = m.FrameReader(ServerProtocolViolation, frozenset(b"DZ"), SMALL, frozenset(b"D"))
    row = _row(5000)
    got: list[tuple[int, bytes]] = []
    for piece in _chunks(row + m.ready_for_query(b"I"), list(range(0, 6000, 300))):
        buf, frames = reader.frames(piece)
        got += [(t, buf[s:e]) for t, s, e in frames]
        assert reader.pending < SMALL  # never more than the buffer held back
    assert got[0][0] == ord("D") and len(got[0][1]) >= m.STREAM_HEAD
    assert {t for t, _ in got[1:-1]} == {m.CONTINUATION}
    assert b"".join(data for _, data in got[:-1]) == row
    assert got[-1] == (ord("Z"), m.ready_for_query(b"I"))


@pytest.mark.parametrize(
    ("side", "data"),
    [
        ("server", m.parameter_status("x", "y" * 2000)),  # ParameterStatus is read whole
        ("server", m.message(b"Z", b"I" * 2000)),
        ("client", m.message(b"D", b"S" + b"n" * 2000 + b"\0")),
        ("client", m.message(b"S", b"\0" * 2000)),
    ],
)
def test_too_large_for_the_buffer_and_not_streamable(side: str, data: bytes) -> None:
    if side == "server":
        with pytest.raises(ServerProtocolViolation, match="too large"):
            _server(SMALL).receive_frames(data[:700])
    else:
        with pytest.raises(ClientProtocolViolation, match="too large"):
            _client(SMALL).receive_frames(data[:700])


def test_pre_auth_messages_are_capped() -> None:
    conn = ClientConnection()
    conn.receive_data(m.startup_message({"user": "u"}))
    conn.next_event()
    conn.send(ev.AuthenticationRequest(m.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    conn.receive_data(b"p" + (1 << 30).to_bytes(4, "big") + b"\0" * 100)
    with pytest.raises(ClientProtocolViolation, match="invalid message length"):
        conn.next_event()


def test_named_parse_larger_than_the_buffer_is_refused() -> None:
    client = _client(SMALL)
    parse = m.message(b"P", m.cstr("big") + m.cstr("SELECT '" + "x" * 3000 + "'") + b"\0\0")
    buf, frames = client.receive_frames(parse[:1000])
    with pytest.raises(StatementTooLarge) as info:
        Pipeline(StatementNames(), {}).client_frames(buf, frames, ClientStatements(), [])
    assert info.value.sqlstate == "54000"


_SERVER_ANSWERS = {
    "T": m.message(b"T", b"\0\1" + m.cstr("c") + b"\0" * 18),
    "D": _row(10),
    "B": _row(4000),  # a big row
    "N": m.message(b"N", b"SNOTICE\0M" + b"n" * 3000 + b"\0\0"),
    "E": m.error_response("22000", "e" * 3000, "ERROR"),
    "C": m.message(b"C", m.cstr("SELECT 1")),
}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from("TDBNC"), max_size=6),
    st.booleans(),
    st.lists(st.integers(0, 20000), max_size=12),
    st.booleans(),
)
def test_server_side_streaming_equals_whole_messages(
    body: list[str], error: bool, cuts: list[int], internal: bool
) -> None:
    """Forwarded (or, for the proxy's own query, swallowed) exactly as if held whole."""
    kinds = body + (["E"] if error else []) + ["Z"]
    data = b"".join(_SERVER_ANSWERS.get(k, m.ready_for_query(b"I")) for k in kinds)
    outs = []
    for limit, pieces in ((1 << 20, [data]), (SMALL, _chunks(data, cuts))):
        server, pipe = _server(limit), Pipeline(StatementNames(), {})
        if internal:
            pipe.internal_query("SET x TO 1")
        else:
            pipe.client_message(m.Message(b"Q", m.query("SELECT 1")), ClientStatements(), [])
        out: list[bytes] = []
        for piece in pieces:
            buf, frames = server.receive_frames(piece)
            if frames:
                pipe.server_frames(buf, frames, out)
        assert pipe.idle and server.transaction_status == b"I"
        outs.append(b"".join(out))
    assert outs[0] == outs[1]
    notices = b"".join(_SERVER_ANSWERS[k] for k in kinds if k == "N")  # always the client's
    assert outs[0] == (notices if internal else data)


_CLIENT_REQUESTS = {
    "Q": m.query("SELECT '" + "q" * 3000 + "'"),
    "q": m.query("SELECT 1"),
    "P": m.message(b"P", m.cstr("") + m.cstr("SELECT '" + "p" * 3000 + "'") + b"\0\0"),
    "B": m.message(
        b"B",
        m.cstr("") + m.cstr("s1") + b"\0\0\0\1" + (3000).to_bytes(4, "big") + b"b" * 3000 + b"\0\0",
    ),
    "d": m.message(b"d", b"c" * 3000),
    "E": m.message(b"E", b"\0\0\0\0\0"),
    "S": m.SYNC,
}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from("QqPBdES"), max_size=6), st.lists(st.integers(0, 20000), max_size=12)
)
def test_client_side_streaming_equals_whole_messages(kinds: list[str], cuts: list[int]) -> None:
    """What goes upstream (a Bind renamed in its head) is what whole messages give."""
    data = b"".join(_CLIENT_REQUESTS[k] for k in kinds)
    if not data:
        return
    prepare = m.message(b"P", m.cstr("s1") + m.cstr("SELECT $1") + b"\0\0")
    outs = []
    for limit, pieces in ((1 << 20, [data]), (SMALL, _chunks(data, cuts))):
        client, pipe, stmts = _client(limit), Pipeline(StatementNames(), {}), ClientStatements()
        pipe.client_message(m.Message(b"P", prepare), stmts, [])
        out: list[bytes] = []
        for piece in pieces:
            buf, frames = client.receive_frames(piece)
            if frames:
                pipe.client_frames(buf, frames, stmts, out)
        outs.append((b"".join(out), [(e.kind, e.action) for e in pipe.queue]))
    assert outs[0] == outs[1]
