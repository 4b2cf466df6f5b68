"""The proxy's structure: one session state machine, protocol rules as pure functions,
the client-side bulk path equal to the message path, and no import of ``agent``."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxyhelpers import frames_of, imported_modules

from proxy.protocol import messages as m
from proxy.protocol import states as S
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.pipeline import (
    _RING,
    DROP,
    FINISH,
    KEEP,
    Entry,
    EntryQueue,
    Pipeline,
    between_transactions,
    past_failed_segment,
    when_client_leaves,
)
from proxy.protocol.statements import ClientStatements, StatementNames
from proxy.protocol.states import SESSION_MOVES, SessionState, session_move

PROXY_DIR = Path(__file__).resolve().parents[2] / "proxy"


def test_proxy_never_imports_agent() -> None:
    for path in PROXY_DIR.rglob("*.py"):
        for name in imported_modules(path):
            assert name.split(".")[0] != "agent", f"{path} imports {name}"


# --- the session state machine ------------------------------------------------------

LEGAL = [
    (S.LOGIN, S.ACTIVE),  # the first server connection tells the parameters
    (S.ACTIVE, S.IDLE),  # transaction mode: released at ReadyForQuery 'I'
    (S.IDLE, S.ACTIVE),  # an idle server connection was at hand
    (S.IDLE, S.WAITING),
    (S.WAITING, S.ACTIVE),
    (S.WAITING, S.IDLE),  # no server connection: the requests were refused
    (S.ACTIVE, S.MIGRATING),
    (S.MIGRATING, S.IDLE),  # moved to the new generation
    (S.MIGRATING, S.ACTIVE),  # pinned, or the client moved on
    (S.ACTIVE, S.DRAINING),
    (S.MIGRATING, S.DRAINING),
    (S.DRAINING, S.CLOSED),
    *[(state, S.CLOSED) for state in S.SESSION_STATES if state is not S.CLOSED],
]


def test_session_moves_are_exactly_the_legal_ones() -> None:
    table = {(a, b) for a, targets in SESSION_MOVES.items() for b in targets}
    assert table == set(LEGAL)
    assert set(SESSION_MOVES) == set(S.SESSION_STATES)


@pytest.mark.parametrize(
    ("state", "new"), [(a, b) for a in S.SESSION_STATES for b in S.SESSION_STATES]
)
def test_session_move_checks_every_pair(state: SessionState, new: SessionState) -> None:
    if (state, new) in LEGAL:
        assert session_move(state, new) is new
    else:
        with pytest.raises(RuntimeError, match="proxy bug"):
            session_move(state, new)


# --- protocol rules the session asks about (byte level) ----------------------------


_frames = frames_of


BIND = m.message(b"B", b"\0\0\0\0\0\0\0\0")
EXECUTE = m.message(b"E", b"\0\0\0\0\0")
SEGMENTS = [
    (BIND + EXECUTE, -1),  # still inside the failed segment: drop all
    (BIND + EXECUTE + m.SYNC, 3),
    (m.SYNC + m.query("SELECT 1"), 1),  # what follows the Sync is a new request
    (EXECUTE + m.SYNC + BIND + m.SYNC, 2),  # only up to the first Sync
    (b"", -1),
]


@pytest.mark.parametrize(("data", "after"), SEGMENTS)
def test_past_failed_segment(data: bytes, after: int) -> None:
    assert past_failed_segment(_frames(data)) == after


def _pipeline_with(*requests: bytes) -> Pipeline:
    pipe = Pipeline(StatementNames(), {})
    for data in requests:
        pipe.client_frames(data, _frames(data), ClientStatements(), [])
    return pipe


BOUNDARIES = [
    # (requests sent, answers received, transaction status, between transactions)
    (b"", b"", b"I", True),
    (m.query("BEGIN"), b"", b"I", False),  # the answer is still due
    (m.query("BEGIN"), m.message(b"C", b"BEGIN\0") + m.ready_for_query(b"T"), b"T", False),
    (m.query("SELECT 1"), m.message(b"C", b"SELECT 1\0") + m.ready_for_query(b"I"), b"I", True),
    (
        m.query("x"),
        m.error_response("42601", "syntax", "ERROR") + m.ready_for_query(b"E"),
        b"E",
        False,
    ),
]


@pytest.mark.parametrize(("sent", "answers", "status", "between"), BOUNDARIES)
def test_between_transactions(sent: bytes, answers: bytes, status: bytes, between: bool) -> None:
    pipe = _pipeline_with(sent)
    if answers:
        pipe.server_frames(answers, _frames(answers), [])
    assert between_transactions(pipe, status) is between


def test_when_client_leaves() -> None:
    assert when_client_leaves(_pipeline_with(), b"I", reset=False) == KEEP
    assert when_client_leaves(_pipeline_with(), b"I", reset=True) == FINISH
    assert when_client_leaves(_pipeline_with(), b"T", reset=False) == DROP  # in a transaction
    assert when_client_leaves(_pipeline_with(m.query("SELECT 1")), b"I", False) == DROP
    ours = _pipeline_with()
    ours.internal_query("SET x TO 1")
    assert when_client_leaves(ours, b"I", reset=False) == FINISH  # our SET still runs


# --- the client side: bulk equals message by message -------------------------------

_REQUESTS = {
    "Q": m.query("SELECT 1"),
    "D": m.query("DISCARD ALL"),
    "P": m.message(b"P", m.cstr("s1") + m.cstr("SELECT $1") + b"\0\0"),
    "p": m.message(b"P", m.cstr("") + m.cstr("SELECT 2") + b"\0\0"),
    "B": m.message(b"B", m.cstr("") + m.cstr("s1") + b"\0\0\0\0\0\0"),
    "b": m.message(b"B", m.cstr("") + m.cstr("nosuch") + b"\0\0\0\0\0\0"),
    "d": m.message(b"D", b"S" + m.cstr("s1")),
    "c": m.message(b"C", b"S" + m.cstr("s1")),
    "E": EXECUTE,
    "S": m.SYNC,
    "H": m.message(b"H"),
    "y": m.message(b"d", b"copy data"),
    "F": m.message(b"F", b"\0\0\0\1\0\0\0\0\0\0"),
    "x": m.message(b"D", b"X"),  # neither 'S' nor 'P': a violation
}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(sorted(_REQUESTS)), max_size=10),
    st.integers(0, 3),
    st.sampled_from([200, 1, 0]),  # the default, evicting at each Parse, passing through
)
def test_bulk_client_requests_match_message_path(
    kinds: list[str], prepared: int, limit: int
) -> None:
    """Pipeline.client_frames (runs leave as one slice) sends the same bytes upstream
    and queues the same entries as Pipeline.client_message for each message."""
    data = b"".join(_REQUESTS[k] for k in kinds)
    frames = _frames(data)
    names = StatementNames(limit)
    bulk, single = Pipeline(names, {}), Pipeline(names, {})
    bulk_stmts, single_stmts = ClientStatements(), ClientStatements()
    warm = _REQUESTS["P"]  # the client may have prepared s1 earlier
    for _ in range(prepared):
        bulk.client_frames(warm, _frames(warm), bulk_stmts, [])
        single.client_message(m.Message(warm[:1], warm), single_stmts, [])
    bulk_out: list[bytes] = []
    single_out: list[bytes] = []
    bulk_error = single_error = None
    try:
        bulk.client_frames(data, frames, bulk_stmts, bulk_out)
    except ProtocolViolation as exc:
        bulk_error = type(exc)
    try:
        for _, start, end in frames:
            single.client_message(
                m.Message(data[start : start + 1], data[start:end]), single_stmts, single_out
            )
    except ProtocolViolation as exc:
        single_error = type(exc)
    assert bulk_error == single_error
    if bulk_error is None:
        assert b"".join(bulk_out) == b"".join(single_out)
    assert [(e.kind, e.action, e.stmt) for e in bulk.queue] == [
        (e.kind, e.action, e.stmt) for e in single.queue
    ]
    assert bulk.prepared.names() == single.prepared.names()
    assert bulk_stmts.by_name == single_stmts.by_name


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=" \t\n\r\f\vdDx", max_size=3),
    st.sampled_from(["DISCARD ALL", "discard all", "DEALLOCATE PREPARE ALL", "SELECT 1"]),
)
def test_a_query_that_drops_statements_is_seen_on_both_paths(prefix: str, sql: str) -> None:
    """The simple-Query path checks the first byte before it runs the pattern; it must
    never miss a DISCARD ALL / DEALLOCATE ALL that the message path sees."""
    query = m.query(prefix + sql)
    fast, careful = Pipeline(StatementNames(200), {}), Pipeline(StatementNames(200), {})
    for pipeline in (fast, careful):
        pipeline.prepared.add("s1")
    assert fast.simple_query(query)
    careful.client_message(m.Message(query[:1], query), ClientStatements(), [])
    assert ("s1" in fast.prepared) == ("s1" in careful.prepared)
    if prefix.isspace() and not sql.startswith("SELECT"):
        assert "s1" not in fast.prepared


# --- the pipeline's queue -----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=1500))
def test_entry_queue_behaves_as_a_deque(appends: list[bool]) -> None:
    """Appends (True) and poplefts (False) in any order: the same entries, in the same
    order, as a deque."""
    ours, theirs = EntryQueue(), deque[Entry]()
    for n, append in enumerate(appends):
        if append or not theirs:
            entry = Entry(n % 7, 0)
            ours.append(entry)
            theirs.append(entry)
        else:
            assert ours.popleft() is theirs.popleft()
        assert len(ours) == len(theirs) and bool(ours) == bool(theirs)
        assert ours.first() is (theirs[0] if theirs else None)
    assert list(ours) == list(theirs)
    while theirs:
        assert ours.popleft() is theirs.popleft()
    with pytest.raises(IndexError):
        ours.popleft()


def test_entry_queue_lets_go_of_what_it_read() -> None:
    """A client that pipelined deeply once: once the queue is empty again it holds
    only its first few slots, and no slot keeps an entry already read (else a long
    session would keep whatever it ever queued, a CAPTURE's rows included)."""
    queue = EntryQueue()
    entries = [Entry(n % 7, 0) for n in range(100 * _RING)]
    queue.extend(entries[:3])
    for entry in entries[3:]:  # never empty meanwhile, and the ring wraps and grows
        queue.append(entry)
        queue.append(entry)
        queue.popleft()
    assert len(queue) == len(entries)
    assert sum(slot is not None for slot in queue._slots) == len(queue)
    while queue:
        queue.popleft()
    assert queue._slots == [None] * _RING
