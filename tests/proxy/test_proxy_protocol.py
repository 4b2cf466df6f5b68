"""Sans-I/O protocol layer: byte-exact tables, state machines, auth, fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from proxyhelpers import imported_modules, ready_server

from proxy.protocol import events as ev
from proxy.protocol import messages as m
from proxy.protocol import pipeline, states
from proxy.protocol.auth import ScramSecret, ScramVerifier, UpstreamAuthenticator, md5_password
from proxy.protocol.backend import ServerConnection
from proxy.protocol.errors import (
    AuthenticationFailed,
    ClientProtocolViolation,
    ProtocolViolation,
    ServerProtocolViolation,
)
from proxy.protocol.frontend import ClientConnection
from proxy.protocol.parameters import MAX_REPORTED
from proxy.protocol.pipeline import ParameterSink, Pipeline
from proxy.protocol.statements import ClientStatements, StatementNames
from proxy.protocol.states import ClientState, ServerState
from proxy.upstream import ServerOwner

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "proxy" / "protocol"


def test_protocol_package_does_no_io() -> None:
    forbidden = {"asyncio", "socket", "ssl", "selectors", "trio", "anyio"}
    for path in PROTOCOL_DIR.glob("*.py"):
        for name in imported_modules(path):
            assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


# --- byte-exact builders ---------------------------------------------------------------

BUILT = [
    (m.ssl_request(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    (m.gssenc_request(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
    (m.cancel_request(7, 9), b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x07\x00\x00\x00\x09"),
    (
        m.startup_message({"user": "u", "database": "d"}),
        b"\x00\x00\x00\x1b\x00\x03\x00\x00user\x00u\x00database\x00d\x00\x00",
    ),
    (m.query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    (m.ready_for_query(b"I"), b"Z\x00\x00\x00\x05I"),
    (m.READY_IDLE, b"Z\x00\x00\x00\x05I"),
    (m.TERMINATE, b"X\x00\x00\x00\x04"),
    (m.PARSE_COMPLETE, b"1\x00\x00\x00\x04"),
    (m.CLOSE_COMPLETE, b"3\x00\x00\x00\x04"),
    (m.authentication(m.AUTH_OK), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (m.AUTHENTICATION_OK, b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (m.backend_key_data(1, 2), b"K\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x02"),
    (m.parameter_status("a", "b"), b"S\x00\x00\x00\x08a\x00b\x00"),
    (
        m.error_response("28P01", "no"),
        b"E\x00\x00\x00\x1eSFATAL\x00VFATAL\x00C28P01\x00Mno\x00\x00",
    ),
    (
        m.negotiate_protocol_version(0, ["_pq_.x"]),
        b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00",
    ),
]


@pytest.mark.parametrize(("built", "expected"), BUILT)
def test_builders_are_byte_exact(built: bytes, expected: bytes) -> None:
    assert built == expected


# --- client side state machine ------------------------------------------------------


def events_of(conn: ClientConnection | ServerConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


CLIENT_STARTUP = [
    (m.ssl_request(), m.SSLRequest(), ClientState.NEGOTIATING),
    (m.gssenc_request(), m.GSSENCRequest(), ClientState.NEGOTIATING),
    (m.cancel_request(5, 6), m.CancelRequest(5, 6), ClientState.CLOSED),
    (
        m.startup_message({"user": "u", "options": "-c x=y"}),
        m.StartupMessage({"user": "u", "options": "-c x=y"}),
        ClientState.AUTHENTICATING,
    ),
]


@pytest.mark.parametrize(("data", "event", "state"), CLIENT_STARTUP)
def test_client_startup_packets(data: bytes, event: object, state: ClientState) -> None:
    conn = ClientConnection()
    # byte by byte: framing must not depend on how the bytes arrive
    got: list[object] = []
    for i in range(len(data)):
        got += events_of(conn, data[i : i + 1])
    assert got == [event]
    assert conn.state is state


def test_client_startup_packet_with_more_in_the_same_read() -> None:
    """The StartupMessage and more in one read: the packet comes out whole, the rest
    stays buffered, and sending before the login is answered is refused."""
    conn = ClientConnection()
    conn.receive_data(m.startup_message({"user": "u"}) + m.query("SELECT 1")[:3])
    assert conn.next_event() == m.StartupMessage({"user": "u"})
    assert conn.buffered == 3
    with pytest.raises(ClientProtocolViolation, match="while authenticating"):
        conn.next_event()


def test_client_startup_packets_whole_or_together() -> None:
    """Each packet in a read of its own (the fast path) or both in one read: the same
    events, and nothing left buffered once they are out."""
    startup = m.startup_message({"user": "u"})
    for reads in ([m.ssl_request(), startup], [m.ssl_request() + startup]):
        conn = ClientConnection()
        conn.receive_data(reads[0])
        assert conn.next_event() == m.SSLRequest()
        conn.send(ev.SSLResponse(False))  # refused, as login.startup_now does
        for data in reads[1:]:
            conn.receive_data(data)
        assert conn.next_event() == m.StartupMessage({"user": "u"})
        assert conn.buffered == 0 and conn.state is ClientState.AUTHENTICATING


def test_state_tables_by_state_hold_the_same_moves() -> None:
    """The two-step tables the client side looks moves up in are the flat ones."""
    for flat in (states.CLIENT_RECEIVE, states.CLIENT_SEND, states.SERVER_RECEIVE):
        nested = states.by_state(flat)
        assert {(st, k): n for st, moves in nested.items() for k, n in moves.items()} == flat
    assert states.by_state(states.CLIENT_RECEIVE) == states.CLIENT_RECEIVE_BY_STATE
    assert states.by_state(states.CLIENT_SEND) == states.CLIENT_SEND_BY_STATE


def test_client_full_login_and_messages() -> None:
    conn = ClientConnection()
    assert events_of(conn, m.ssl_request()) == [m.SSLRequest()]
    assert conn.send(ev.SSLResponse(False)) == b"N"
    assert events_of(conn, m.startup_message({"user": "u"})) == [m.StartupMessage({"user": "u"})]
    assert conn.send(ev.AuthenticationRequest(m.AUTH_SASL, b"SCRAM-SHA-256\0\0")) == (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    )
    assert events_of(conn, m.password_message(b"abc")) == [ev.PasswordMessage(b"abc")]
    assert conn.send(ev.AuthenticationOk()) == m.authentication(0)
    assert conn.state is ClientState.READY
    q = m.query("SELECT 1")
    assert events_of(conn, q) == []  # regular messages are frames, not events
    buf, frames = conn.receive_frames(m.SYNC + m.TERMINATE + q)
    assert frames == [(81, 0, len(q)), (83, len(q), len(q) + 5)]
    assert buf == q + m.SYNC + m.TERMINATE
    assert conn.state is ClientState.CLOSED


@pytest.mark.parametrize("length", [b"\xff\xff\xff\xf0", b"\x00\x01\x00\x00", b"\x00\x00\x00\x03"])
def test_client_password_message_lengths_out_of_bounds(length: bytes) -> None:
    """Negative, above PG_MAX_AUTH_TOKEN_LENGTH, below its own header: refused before
    anything is buffered for it."""
    conn = ClientConnection()
    events_of(conn, m.startup_message({"user": "u"}))
    conn.send(ev.AuthenticationRequest(m.AUTH_CLEARTEXT))
    with pytest.raises(ClientProtocolViolation, match="invalid message length"):
        events_of(conn, b"p" + length)


CLIENT_VIOLATIONS = [
    b"\x00\x00\x00\x04\x00\x00\x00\x00",  # length below 8
    b"\x7f\x00\x00\x00",  # absurd length
    b"\xff\xff\xff\xf0\x00\x03\x00\x00",  # negative length
    b"\x00\x00\x00\x08\x00\x02\x00\x00",  # protocol 2
    b"\x00\x00\x00\x0c\x04\xd2\x16\x2f\x00\x00\x00\x00",  # SSLRequest with payload
    b"\x00\x00\x00\x0d\x00\x03\x00\x00user\x00",  # parameters not terminated
    b"\x00\x00\x00\x0e\x00\x03\x00\x00user\x00\x00",  # name without value
    b"\x00\x00\x00\x0c\x00\x03\x00\x00\x00v\x00\x00",  # empty name
]


_PARAM_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12
)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(_PARAM_TEXT.filter(bool), _PARAM_TEXT, max_size=8))
def test_startup_parameters_come_back_as_sent(params: dict[str, str]) -> None:
    packet = m.startup_message(params)
    assert m.parse_startup(packet, ClientProtocolViolation) == m.StartupMessage(params)


def test_parameter_status_messages_are_kept_within_their_bound() -> None:
    """Every login sends a dozen, so they are kept; values a client makes up must not
    grow what is kept, and every message must still be right."""
    for n in range(3 * m.KEPT):
        value = f"made-up-{n}"
        assert m.parameter_status("application_name", value) == m.message(
            b"S", b"application_name\0" + value.encode() + b"\0"
        )
        assert len(m._PARAMETER_STATUS) <= m.KEPT
    assert m.parameter_status("TimeZone", "UTC") is m.parameter_status("TimeZone", "UTC")
    m.parameter_status("search_path", "x" * m.KEPT_SIZE)
    assert ("search_path", "x" * m.KEPT_SIZE) not in m._PARAMETER_STATUS


def test_parsed_parameter_statuses_are_kept_within_their_bound() -> None:
    """The server's ParameterStatus bodies are kept parsed (session pooling: the same
    few at every client); made-up values must not grow what is kept, a kept body must
    still parse right, and a malformed one must still be refused."""
    for n in range(3 * m.KEPT):
        for _ in range(2):  # the second time from what was kept
            body = f"application_name\0made-up-{n}\0".encode()
            parsed = m.parse_parameter_status(body, ServerProtocolViolation)
            assert parsed == ("application_name", f"made-up-{n}")
        assert len(m._PARAMETER_STATUS_BODIES) <= m.KEPT
    long = b"search_path\0" + b"x" * m.KEPT_SIZE + b"\0"
    assert m.parse_parameter_status(long, ServerProtocolViolation)[1] == "x" * m.KEPT_SIZE
    assert long not in m._PARAMETER_STATUS_BODIES
    for bad in (b"application_name\0", b"a\0b\0c\0", b"a\0b", b"\xff\0b\0"):
        with pytest.raises(ServerProtocolViolation):
            m.parse_parameter_status(bad, ServerProtocolViolation)


def test_startup_packets_are_kept_parsed_within_their_bound() -> None:
    """The same packet gives the same (unchanging) StartupMessage; packets a client makes
    up must not grow what is kept, a large one is parsed but not kept, and a malformed
    one is refused whatever was kept."""
    for n in range(3 * m.KEPT):
        packet = m.startup_message({"user": "u", "application_name": f"made-up-{n}"})
        first = m.parse_startup(packet, ClientProtocolViolation)
        assert m.parse_startup(bytes(packet), ClientProtocolViolation) is first
        assert first == m.StartupMessage({"user": "u", "application_name": f"made-up-{n}"})
        assert len(m._STARTUP_PACKETS) <= m.KEPT
    # equal messages are equal keys, whichever packet they came from
    a = m.parse_startup(m.startup_message({"user": "u", "a": "1"}), ClientProtocolViolation)
    b = m.StartupMessage({"a": "1", "user": "u"})
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    large = m.startup_message({"user": "u", "options": "x" * m.KEPT_SIZE})
    assert (
        m.parse_startup(large, ClientProtocolViolation).parameters["options"] == "x" * m.KEPT_SIZE
    )
    assert large not in m._STARTUP_PACKETS
    for bad in CLIENT_VIOLATIONS:
        with pytest.raises(ClientProtocolViolation):
            m.parse_startup(bad, ClientProtocolViolation)


@pytest.mark.parametrize("data", CLIENT_VIOLATIONS)
def test_client_startup_violations(data: bytes) -> None:
    with pytest.raises(ClientProtocolViolation):
        events_of(ClientConnection(), data)


def test_client_ssl_request_twice_is_a_violation() -> None:
    conn = ClientConnection()
    events_of(conn, m.ssl_request())
    conn.send(ev.SSLResponse(False))
    with pytest.raises(ClientProtocolViolation):
        events_of(conn, m.ssl_request())


def test_client_regular_phase_rejects_unknown_types() -> None:
    conn = ClientConnection()
    events_of(conn, m.startup_message({"user": "u"}))
    conn.send(ev.AuthenticationOk())
    with pytest.raises(ClientProtocolViolation):
        conn.receive_frames(m.message(b"p", b"late password"))
    conn2 = ClientConnection()
    events_of(conn2, m.startup_message({"user": "u"}))
    conn2.send(ev.AuthenticationOk())
    with pytest.raises(ClientProtocolViolation):
        conn2.receive_frames(b"Q\x00\x00\x00\x02")  # length below 4


def test_client_send_out_of_order_is_a_proxy_bug() -> None:
    with pytest.raises(RuntimeError):
        ClientConnection().send(ev.AuthenticationOk())


# --- server side state machine ------------------------------------------------------


def test_server_login_sequence() -> None:
    conn = ServerConnection()
    assert conn.send(m.StartupMessage({"user": "u"})) == m.startup_message({"user": "u"})
    data = (
        m.authentication(m.AUTH_MD5, b"salt")
        + m.authentication(m.AUTH_OK)
        + m.parameter_status("server_version", "15.0")
        + m.backend_key_data(42, 43)
        + m.ready_for_query(b"I")
    )
    got = events_of(conn, data)
    assert got == [
        ev.AuthenticationRequest(m.AUTH_MD5, b"salt"),
        ev.AuthenticationOk(),
        ev.ParameterStatus("server_version", "15.0"),
        ev.BackendKeyData(42, 43),
        ev.ReadyForQuery(b"I"),
    ]
    assert conn.state is ServerState.READY
    assert conn.parameters == {"server_version": "15.0"}
    assert conn.backend_key == ev.BackendKeyData(42, 43)
    z = m.ready_for_query(b"T")
    assert events_of(conn, z) == []  # regular messages are frames, not events
    assert conn.receive_frames(b"") == (z, [(90, 0, 6)])
    assert conn.transaction_status == b"T"


def test_server_login_error() -> None:
    conn = ServerConnection()
    conn.send(m.StartupMessage({"user": "u"}))
    (err,) = events_of(conn, m.error_response("28P01", "password authentication failed"))
    assert isinstance(err, ev.ErrorResponse)
    assert err.sqlstate == "28P01"
    assert conn.state is ServerState.FAILED


SERVER_VIOLATIONS = [
    m.parameter_status("a", "b"),  # before AuthenticationOk
    m.message(b"R", b"\x00\x00"),  # truncated auth code
    m.message(b"R", b"\x00\x00\x00\x00extra"),  # AuthenticationOk with payload
    m.message(b"Z", b"I"),  # ReadyForQuery before AuthenticationOk
    m.message(b"!", b""),  # unknown type
]


@pytest.mark.parametrize("data", SERVER_VIOLATIONS)
def test_server_startup_violations(data: bytes) -> None:
    conn = ServerConnection()
    conn.send(m.StartupMessage({"user": "u"}))
    with pytest.raises(ServerProtocolViolation):
        events_of(conn, data)


def test_a_server_reporting_ever_more_parameters_is_refused() -> None:
    """What a server connection keeps of the server's ParameterStatus reports (and shows
    its clients) is bounded: the same names again and again are fine, at login and
    once logged in, but a new name past MAX_REPORTED is a violation (the connection is
    closed, see ServerConn.link_data)."""
    reports = b"".join(m.parameter_status(f"p{n}", "v") for n in range(MAX_REPORTED))
    login = ServerConnection()
    login.send(m.StartupMessage({"user": "u"}))
    events_of(login, m.authentication(0) + reports + reports)
    with pytest.raises(ServerProtocolViolation, match="more than 64 parameters"):
        events_of(login, m.parameter_status("one_more", "v"))
    assert len(login.parameters) == MAX_REPORTED

    server = ready_server()
    pipe = Pipeline(StatementNames(0), server.parameters)
    buf, frames = server.receive_frames(reports + reports)
    out: list[bytes] = []
    pipe.server_frames(buf, frames, out)
    assert b"".join(out) == reports + reports  # all shown to the client, as they came
    buf, frames = server.receive_frames(m.parameter_status("one_more", "v"))
    with pytest.raises(ServerProtocolViolation, match="more than 64 parameters"):
        pipe.server_frames(buf, frames, [])
    assert len(pipe.parameters) == MAX_REPORTED and "one_more" not in pipe.synced


def test_the_same_report_over_the_same_settings_gives_the_same_settings() -> None:
    """After a ParameterStatus that changes them, a connection's synced settings are a
    new dict: the old one is shared with clients and never changed in place. When the
    same report comes over the same dict again (session pooling: each client's reset
    reports the same value over the settings the last login gave), it is the very
    dict of last time, so that the next login compares settings by identity."""
    server = ready_server()
    pipe = Pipeline(StatementNames(0), {"application_name": "app", "DateStyle": "ISO, MDY"})
    given = pipe.synced  # what a login's settings SQL gives the connection

    def report(name: str, value: str) -> dict[str, str]:
        buf, frames = server.receive_frames(m.parameter_status(name, value))
        pipe.server_frames(buf, frames, [])
        return pipe.synced

    reset = report("application_name", "")
    assert reset is not given and reset == {**given, "application_name": ""}
    assert given["application_name"] == "app"  # not changed in place
    assert report("application_name", "") is reset  # no change: the same dict
    pipe.synced = given  # the next client's login
    assert report("application_name", "") is reset
    pipe.synced = given
    assert report("application_name", "other") == {**given, "application_name": "other"}
    pipe.synced = dict(given)  # equal settings, another dict: a new one
    renewed = report("application_name", "")
    assert renewed is not reset and renewed == reset
    pipe.synced = given
    assert report("DateStyle", "ISO, DMY") == {**given, "DateStyle": "ISO, DMY"}


# --- authentication -----------------------------------------------------------------


def test_md5_password_matches_postgres_definition() -> None:
    inner = hashlib.md5(b"secretuser").hexdigest()
    outer = hashlib.md5(inner.encode() + b"abcd").hexdigest()
    assert md5_password("user", "secret", b"abcd") == b"md5" + outer.encode() + b"\0"


def test_cleartext_refused_unless_allowed() -> None:
    req = ev.AuthenticationRequest(m.AUTH_CLEARTEXT)
    with pytest.raises(AuthenticationFailed) as info:
        UpstreamAuthenticator("u", "hunter2", cleartext_allowed=False).respond(req)
    assert "hunter2" not in str(info.value)
    reply = UpstreamAuthenticator("u", "hunter2", cleartext_allowed=True).respond(req)
    assert reply == ev.PasswordMessage(b"hunter2\0")


def _scram_exchange(client_password: str, secret: ScramSecret) -> bytes:
    """Our upstream authenticator against our verifier: both sides of SCRAM-SHA-256."""
    client = UpstreamAuthenticator("u", client_password, cleartext_allowed=False)
    verifier = ScramVerifier(secret)
    first = client.respond(ev.AuthenticationRequest(m.AUTH_SASL, verifier.mechanisms()))
    assert first is not None
    server_first = verifier.client_first(first.payload)
    final = client.respond(ev.AuthenticationRequest(m.AUTH_SASL_CONTINUE, server_first))
    assert final is not None
    server_final = verifier.client_final(final.payload)
    assert client.respond(ev.AuthenticationRequest(m.AUTH_SASL_FINAL, server_final)) is None
    return server_final


def test_scram_round_trip_and_wrong_password() -> None:
    secret = ScramSecret.from_password("right")
    assert _scram_exchange("right", secret).startswith(b"v=")
    with pytest.raises(AuthenticationFailed) as info:
        _scram_exchange("wrong", secret)
    assert info.value.sqlstate == "28P01"
    with pytest.raises(AuthenticationFailed):
        _scram_exchange("right", ScramSecret.mock(b"k" * 32, "u", 16, 4096))  # unknown user


def test_scram_secret_parses_pg_authid_format() -> None:
    text = (
        "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$"
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA="
    )
    secret = ScramSecret.parse(text)
    assert secret.iterations == 4096
    assert secret.salt == b"saltsaltsalt"
    with pytest.raises(ValueError):
        ScramSecret.parse("md5abc")


# --- pipeline: statement renaming and response routing ---------------------------


def _parse(name: str, sql: str) -> m.Message:
    data = m.message(b"P", m.cstr(name) + m.cstr(sql) + b"\x00\x00")
    return m.Message(b"P", data)


def _bind(stmt: str) -> m.Message:
    data = m.message(b"B", b"\0" + m.cstr(stmt) + b"\x00\x00\x00\x00\x00\x00")
    return m.Message(b"B", data)


def _msg(data: bytes) -> m.Message:
    return m.Message(data[:1], data)


def test_pipeline_renames_and_reprepares() -> None:
    names = StatementNames()
    first, second = Pipeline(names, {}), Pipeline(names, {})
    client = ClientStatements()
    out: list[bytes] = []
    first.client_message(_parse("s1", "SELECT 1"), client, out)
    first.client_message(_msg(m.SYNC), client, out)
    assert out[0] == _parse("csp_1", "SELECT 1").data
    # the server answers ParseComplete, ReadyForQuery: both reach the client
    to_client: list[bytes] = []
    for data in (m.PARSE_COMPLETE, m.ready_for_query(b"I")):
        first.server_message(_msg(data), to_client)
    assert to_client == [m.PARSE_COMPLETE, m.ready_for_query(b"I")]
    assert first.idle
    # the same client now binds on another server connection: Parse is injected
    out = []
    second.client_message(_bind("s1"), client, out)
    second.client_message(_msg(m.SYNC), client, out)
    assert out[0] == _parse("csp_1", "SELECT 1").data
    assert out[1] == _bind("csp_1").data
    to_client = []
    for data in (m.PARSE_COMPLETE, m.message(b"2"), m.ready_for_query(b"I")):
        second.server_message(_msg(data), to_client)
    assert to_client == [m.message(b"2"), m.ready_for_query(b"I")]  # injected one swallowed


def test_pipeline_fakes_parse_complete_in_order() -> None:
    names = StatementNames()
    pipe = Pipeline(names, {})
    a, b = ClientStatements(), ClientStatements()
    out: list[bytes] = []
    pipe.client_message(_parse("x", "SELECT 2"), a, out)
    pipe.client_message(_msg(m.SYNC), a, out)
    for data in (m.PARSE_COMPLETE, m.ready_for_query(b"I")):
        pipe.server_message(_msg(data), [])
    # another client prepares the same text under its own name: no Parse is sent
    out = []
    describe = m.message(b"D", b"S" + m.cstr("mine"))
    pipe.client_message(_parse("mine", "SELECT 2"), b, out)
    pipe.client_message(_msg(describe), b, out)
    pipe.client_message(_msg(m.SYNC), b, out)
    assert out == [m.message(b"D", b"S" + m.cstr("csp_1")), m.SYNC]
    to_client: list[bytes] = []
    t = m.message(b"t", b"\x00\x00")
    n = m.message(b"n")
    for data in (t, n, m.ready_for_query(b"I")):
        pipe.server_message(_msg(data), to_client)
    assert to_client == [m.PARSE_COMPLETE, t, n, m.ready_for_query(b"I")]


def test_pipeline_error_skips_to_sync() -> None:
    pipe = Pipeline(StatementNames(), {})
    client = ClientStatements()
    out: list[bytes] = []
    for msg in (
        _parse("bad", "SELEC"),
        _bind("bad"),
        _msg(m.message(b"E", b"\0\0\0\0\0")),
        _msg(m.SYNC),
    ):
        pipe.client_message(msg, client, out)
    err = m.error_response("42601", "syntax error", "ERROR")
    to_client: list[bytes] = []
    for data in (err, m.ready_for_query(b"I")):
        pipe.server_message(_msg(data), to_client)
    assert to_client == [err, m.ready_for_query(b"I")]
    assert pipe.idle
    assert "csp_1" not in pipe.prepared  # a failed Parse leaves nothing behind


def test_pipeline_internal_query_is_invisible() -> None:
    pipe = Pipeline(StatementNames(), {})
    assert pipe.internal_query("SET x TO 'y'") == m.query("SET x TO 'y'")
    to_client: list[bytes] = []
    for data in (m.message(b"C", m.cstr("SET")), m.ready_for_query(b"I")):
        pipe.server_message(_msg(data), to_client)
    assert to_client == []


def test_kept_internal_queries_are_bounded_and_still_drop_statements() -> None:
    """The proxy's own queries are kept as messages (the reset and a login's settings
    repeat at every session): the right bytes every time, a DISCARD ALL kept still
    empties the prepared statements, and made-up settings cannot grow what is kept."""
    pipe = Pipeline(StatementNames(), {})
    for _ in range(2):
        pipe.prepared.add("csp_1")
        assert pipe.internal_query("DISCARD ALL") == m.query("DISCARD ALL")
        assert "csp_1" not in pipe.prepared
        pipe.prepared.add("csp_1")
        assert pipe.internal_query("SET x TO 'DISCARD ALL'") == m.query("SET x TO 'DISCARD ALL'")
        assert "csp_1" in pipe.prepared
    for n in range(3 * m.KEPT):
        sql = f"SET application_name TO 'client {n}'"
        assert pipe.internal_query(sql) == m.query(sql)
        assert len(pipeline._INTERNAL_MESSAGES) <= m.KEPT
    long = "SET application_name TO '" + "x" * m.KEPT_SIZE + "'"
    assert pipe.internal_query(long) == m.query(long)
    assert long not in pipeline._INTERNAL_MESSAGES


_ANSWERS = {
    "T": m.message(b"T", b"\x00\x01a\x00" + bytes(18)),
    "D": m.message(b"D", b"\x00\x01\x00\x00\x00\x011"),
    "C": m.message(b"C", m.cstr("SELECT 1")),
    "N": m.message(b"N", b"SNOTICE\0Mnote\0\0"),
    "S": m.parameter_status("application_name", "moved"),
    "E": m.error_response("57014", "canceled", "ERROR"),
    "F": m.error_response("57P01", "terminating", "FATAL"),
    "Z": m.ready_for_query(b"I"),
}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from("TDCNSEFZ"), max_size=8),
    st.sampled_from(["Z", "ZZ", ""]),
    st.integers(1, 2),
)
def test_bulk_answer_to_simple_queries_matches_message_path(
    body: list[str], ending: str, queries: int
) -> None:
    """The bulk path, with the shortcut for a whole simple-query answer that
    proxy/upstream.py takes first, forwards the same bytes and leaves the same state as
    routing the messages one by one."""
    kinds = body + list(ending)
    if not kinds:
        return
    data = b"".join(_ANSWERS[k] for k in kinds)
    frames, pos = [], 0
    for k in kinds:
        frames.append((ord(k[0] if k != "F" else "E"), pos, pos + len(_ANSWERS[k])))
        pos += len(_ANSWERS[k])
    bulk, single = Pipeline(StatementNames(), {}), Pipeline(StatementNames(), {})
    for pipe in (bulk, single):
        for _ in range(queries):
            pipe.client_message(_msg(m.query("SELECT 1")), ClientStatements(), [])
    seen: list[tuple[str, str]] = []
    bulk_out: list[bytes] = []
    single_out: list[bytes] = []
    server = ready_server()
    try:
        if bulk.awaits_one_answer() and server.receive_answer(data):
            bulk.answered()
            bulk_out.append(data)
            assert kinds.count("Z") == 1 and not {"E", "F", "S"} & set(kinds)
        else:
            buf, cut = server.receive_frames(data)
            assert (buf, cut) == (data, frames)
            bulk.server_frames(data, frames, bulk_out, _Noted(seen))
    except ProtocolViolation as exc:
        with pytest.raises(type(exc)):
            for start_end in frames:
                single.server_message(_msg(data[start_end[1] : start_end[2]]), single_out)
        return
    for _, start, end in frames:
        single.server_message(_msg(data[start:end]), single_out)
    assert b"".join(bulk_out) == b"".join(single_out)
    assert len(bulk.queue) == len(single.queue)
    assert bulk.parameters == single.parameters
    assert bulk.fatal_forwarded == single.fatal_forwarded
    assert seen == [("application_name", "moved")] * kinds.count("S")


_OWN_ANSWERS = {
    **_ANSWERS,
    "c": m.message(b"C", m.cstr("SET")),
    "s": m.parameter_status("DateStyle", "ISO, MDY"),
}
_REQUEST_ANSWER = st.tuples(
    st.lists(st.sampled_from("TDCNSEF"), max_size=3), st.sampled_from(["Z", ""])
)
_OWN_ANSWER = st.tuples(st.lists(st.sampled_from("cSsNE"), max_size=3), st.sampled_from(["Z", ""]))


@settings(max_examples=400, deadline=None)
@example(  # a login's SET and the client's first query, answered in one read
    [("own", ([], "Z"), (["c", "S"], "Z")), ("query", (["T", "D", "C"], "Z"), ([], "Z"))]
)
@given(
    st.lists(
        st.tuples(st.sampled_from(["own", "query", "faked"]), _REQUEST_ANSWER, _OWN_ANSWER),
        min_size=1,
        max_size=3,
    )
)
def test_answers_to_internal_queries_take_the_shortcut_and_match_message_path(
    requests: list[tuple[str, tuple[list[str], str], tuple[list[str], str]]],
) -> None:
    """A read at a server connection whose next request is a query of the proxy's own
    (a login's SET, often with the client's first query behind it; the reset) takes
    the shortcut for each plain answer at its start. Whatever the read holds, the
    client is shown the same bytes, and the pipeline ends in the same state, as when
    the read is cut into frames (the path the shortcut skips, itself checked against
    routing message by message above); also when a reply of ours (a ParseComplete for
    a statement the server has) waits behind our query ("faked")."""
    from proxy.transport import Link
    from proxy.upstream import ServerConn

    conn = ServerConn(Link(), ready_server(), 1, "db", False, StatementNames())
    watching = _Watching()
    conn.owner = watching
    single = Pipeline(StatementNames(), dict(conn.proto.parameters))
    for pipe in (conn.pipeline, single):  # "SELECT 2" prepared on the server
        pipe.client_message(_parse("x", "SELECT 2"), ClientStatements(), [])
        pipe.client_message(_msg(m.SYNC), ClientStatements(), [])
        for answer in (m.PARSE_COMPLETE, m.ready_for_query(b"I")):
            pipe.server_message(_msg(answer), [])
    kinds: list[str] = []
    plain_own_first = True  # the read begins with a plain answer to our own query
    for n, (request, for_client, for_us) in enumerate(requests):
        body, ending = for_us if request == "own" else for_client
        if request == "faked":
            body = []  # the server answers only the Sync
        if n < len(requests) - 1:
            ending = "Z"  # only the read's last answer may be cut short
        for pipe in (conn.pipeline, single):
            if request == "own":
                pipe.internal_query(f"SET application_name TO 'n{n}'")
            elif request == "query":
                pipe.client_message(_msg(m.query("SELECT 1")), ClientStatements(), [])
            else:
                statements = ClientStatements()
                pipe.client_message(_parse(f"mine{n}", "SELECT 2"), statements, [])
                pipe.client_message(_msg(m.SYNC), statements, [])
        if n == 0:
            plain_own_first = request == "own" and ending == "Z" and set(body) <= set("cSs")
        kinds += body + list(ending)
    data = b"".join(_OWN_ANSWERS[k] for k in kinds)
    if not data:
        return
    if requests[0][0] == "own":  # the shortcut is asked: it says yes for a plain answer only
        assert (ready_server().receive_internal_answer(data) >= 0) == plain_own_first, kinds
    single_out: list[bytes] = []
    single_seen = _Noted([])
    framed = ready_server()
    try:
        buf, frames = framed.receive_frames(data)
        swallowed = single.server_frames(buf, frames, single_out, single_seen)
    except ProtocolViolation:
        conn.link_data(data)
        assert conn.closed
        return
    conn.link_data(data)
    assert not conn.closed
    assert b"".join(watching.shown) == b"".join(single_out)
    assert watching.seen == single_seen.seen
    assert len(conn.pipeline.queue) == len(single.queue)
    assert conn.pipeline.parameters == single.parameters
    assert conn.pipeline.synced == single.synced
    assert conn.pipeline.changed_parameters == single.changed_parameters
    assert conn.internal_errors == (1 if swallowed else 0)
    assert conn.proto.transaction_status == framed.transaction_status


class _Watching(ServerOwner):
    """A client session as a server connection sees it, keeping what it is told."""

    def __init__(self) -> None:
        self.shown: list[bytes] = []
        self.seen: list[tuple[str, str]] = []

    def to_client(self, data: bytes) -> None:
        self.shown.append(data)

    def on_parameter(self, name: str, value: str) -> None:
        self.seen.append((name, value))

    def server_idle(self, conn: object) -> None:
        pass

    def server_lost(self, conn: object) -> None:
        pass

    def server_ended(self, conn: object, error: bytes) -> None:
        pass

    def server_paused(self, paused: bool) -> None:
        pass


class _Noted(ParameterSink):
    def __init__(self, seen: list[tuple[str, str]]) -> None:
        self.seen = seen

    def on_parameter(self, name: str, value: str) -> None:
        self.seen.append((name, value))


def _ready_client() -> ClientConnection:
    client = ClientConnection()
    events_of(client, m.startup_message({"user": "u"}))
    client.send(ev.AuthenticationOk())
    return client


_PIECES = [
    *_ANSWERS.values(),
    m.query("SELECT 1"),
    b"Z\x00\x00\x00\x05Q",
    b"Z\x00\x00\x00\x06I\x00",
]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(_PIECES), max_size=6),
    st.binary(max_size=7),
    st.sampled_from([None, m.query("SELECT 2")[:7]]),
)
def test_whole_answer_shortcut_agrees_with_frames(
    pieces: list[bytes], tail: bytes, pending: bytes | None
) -> None:
    """ServerConnection.receive_answer says yes exactly when frames() would find whole, valid
    messages ending in the read's only ReadyForQuery and no error or ParameterStatus,
    with nothing buffered; it consumes nothing, so frames() can always follow it."""
    data = b"".join(pieces) + (tail if not pieces or tail[:1] != b"Z" else b"")
    shortcut, reference = ready_server(), ready_server()
    if pending is not None:  # a message already half read: never the shortcut
        for conn in (shortcut, reference):
            conn.receive_frames(pending)
    took = shortcut.receive_answer(data)
    try:
        buf, frames = reference.receive_frames(data)
    except ProtocolViolation:
        assert not took
        with pytest.raises(ProtocolViolation):
            shortcut.receive_frames(data)  # the reader was left as it was
        return
    whole = (
        pending is None
        and buf == data
        and bool(frames)
        and frames[-1][0] == ord("Z")
        and not any(t in b"ESZ" for t, _, _ in frames[:-1])
        and not reference.receive_frames(b"")[1]  # nothing left behind
    )
    assert took == whole
    if took:
        assert shortcut.transaction_status == reference.transaction_status
    else:
        assert shortcut.receive_frames(data) == (buf, frames)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([*_PIECES, m.SYNC, m.TERMINATE]), max_size=3), st.binary(max_size=6)
)
def test_single_query_shortcut_agrees_with_frames(pieces: list[bytes], tail: bytes) -> None:
    """ClientConnection.receive_query: yes exactly for a read that frames() cuts into one
    whole Query; nothing consumed, so frames() can follow."""
    data = b"".join(pieces) + tail
    shortcut, reference = _ready_client(), _ready_client()
    took = shortcut.receive_query(data)
    try:
        buf, frames = reference.receive_frames(data)
    except ProtocolViolation:
        assert not took
        return
    one_query = buf == data and len(frames) == 1 and frames[0] == (ord("Q"), 0, len(data))
    assert took == (one_query and reference.state is ClientState.READY)
    assert shortcut.receive_frames(data) == (buf, frames)


# --- fuzzing: parse it or raise ProtocolViolation, nothing else --------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_fuzz_client_side(data: bytes, chunk: int) -> None:
    for prefix in (b"", m.startup_message({"user": "u"})):
        conn = ClientConnection()
        try:
            if prefix:
                events_of(conn, prefix)
                conn.send(ev.AuthenticationOk())
            for i in range(0, len(data), chunk):
                if conn.state is ClientState.READY:
                    conn.receive_frames(data[i : i + chunk])
                elif conn.state is not ClientState.CLOSED:
                    events_of(conn, data[i : i + chunk])
        except ProtocolViolation:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_fuzz_server_side(data: bytes, chunk: int) -> None:
    conn = ServerConnection()
    conn.send(m.StartupMessage({"user": "u"}))
    try:
        for i in range(0, len(data), chunk):
            events_of(conn, data[i : i + chunk])
    except ProtocolViolation:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(b"PBDCESQHF"), st.binary(max_size=40)), max_size=8))
def test_fuzz_pipeline_client_messages(msgs: list[tuple[int, bytes]]) -> None:
    pipe = Pipeline(StatementNames(), {})
    client = ClientStatements()
    for t, body in msgs:
        data = m.message(bytes([t]), body)
        with contextlib.suppress(ProtocolViolation):
            pipe.client_message(m.Message(data[:1], data), client, [])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_fuzz_bulk_paths(data: bytes, chunk: int) -> None:
    """The hot path (frames, not events) obeys the same rule on both sides."""
    client = ClientConnection()
    events_of(client, m.startup_message({"user": "u"}))
    client.send(ev.AuthenticationOk())
    server = ServerConnection()
    server.send(m.StartupMessage({"user": "u"}))
    events_of(server, m.authentication(0) + m.ready_for_query(b"I"))
    pipe = Pipeline(StatementNames(), {})
    stmts = ClientStatements()
    for i in range(0, len(data), chunk):
        piece = data[i : i + chunk]
        if client.state is ClientState.READY:  # after a Terminate the session is gone
            with contextlib.suppress(ProtocolViolation):
                buf, frames = client.receive_frames(piece)
                pipe.client_frames(buf, frames, stmts, [])
        with contextlib.suppress(ProtocolViolation):
            buf, frames = server.receive_frames(piece)
            pipe.server_frames(buf, frames, [])


REFUSALS = [
    # (client message types, discarding before) -> (replies, discarding after)
    (b"Q", False, ["E", "Z"], False),
    (b"QQ", False, ["E", "Z", "E", "Z"], False),
    (b"PBDES", False, ["E", "Z"], False),
    (b"PBH", False, ["E"], True),  # segment still open: drop until its Sync
    (b"BES", True, ["Z"], False),
    (b"S", False, ["Z"], False),
    (b"SQ", True, ["Z", "E", "Z"], False),
]


@pytest.mark.parametrize(("types", "before", "replies", "after"), REFUSALS)
def test_refuse_answers_like_a_failing_server(
    types: bytes, before: bool, replies: list[str], after: bool
) -> None:
    from proxy.protocol.pipeline import refuse

    error = m.error_response("08006", "no server", "ERROR")
    out, discarding = refuse(list(types), error, before)
    assert [chr(x[0]) for x in out] == replies
    assert all(x == error for x in out if x[:1] == b"E")
    assert all(x == m.ready_for_query(b"I") for x in out if x[:1] == b"Z")
    assert discarding is after


def test_login_parameter_statuses_follow_the_server_and_the_client() -> None:
    """A server connection keeps its last login's ParameterStatus block: a login with
    the same values gets it again (also when the server's changed and changed back), a
    change of the server's (reported in place) or of the client's values gets a new one."""
    from proxy.transport import Link
    from proxy.upstream import ServerConn

    proto = ServerConnection()
    proto.send(m.StartupMessage({"user": "u"}))
    startup = m.parameter_status("TimeZone", "UTC") + m.parameter_status("server_version", "15")
    events_of(proto, m.authentication(0) + startup + m.ready_for_query(b"I"))
    conn = ServerConn(Link(), proto, 1, "db", False, StatementNames())

    def told(block: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        while block:
            size = int.from_bytes(block[1:5], "big")
            name, value = block[5 : size + 1].split(b"\0")[:2]
            out[name.decode()] = value.decode()
            block = block[size + 1 :]
        return out

    carried = {"TimeZone": "Asia/Tokyo"}
    first = conn.parameter_statuses(carried)
    assert told(first) == {"TimeZone": "Asia/Tokyo", "server_version": "15"}
    assert conn.parameter_statuses(dict(carried)) is first  # equal values: kept

    # the server reports a change after the login (the pipeline routes it)
    def report(value: str) -> None:
        status = m.parameter_status("server_version", value)
        conn.pipeline.server_message(m.Message(b"S", status), [])

    report("15.1")
    second = conn.parameter_statuses(carried)
    assert told(second) == {"TimeZone": "Asia/Tokyo", "server_version": "15.1"}
    report("16")
    report("15.1")  # changed and back (a reset, then a SET): the same block again
    assert conn.parameter_statuses(carried) is second
    assert told(conn.parameter_statuses({})) == {"TimeZone": "UTC", "server_version": "15.1"}
