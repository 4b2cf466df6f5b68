"""Request/response bookkeeping of one server connection, sans I/O.

In transaction mode a pooled server connection serves many clients, so the client's
named prepared statements are renamed to server-wide names (one per distinct definition,
see :mod:`proxy.protocol.statements`) and prepared lazily on whichever server connection
lacks them; in session mode (or with ``max_prepared_statements: 0``) names and Close pass
through unchanged. Every request that gets a response is queued in order; each entry
says what to do with its response:

* ``FORWARD``  - the client's own request: pass responses through;
* ``INJECTED`` - a Parse the proxy added: swallow ParseComplete, pass an error through;
* ``INTERNAL`` - a query of the proxy itself (SET, DISCARD ALL) or a Close of a statement
  it evicts: swallow everything;
* ``FAKE``     - the proxy answered already (Parse of a statement the server has,
  Close of a statement): synthesise ParseComplete/CloseComplete in its turn.
* ``CAPTURE``  - a query of the proxy whose rows it reads (see :meth:`capture_query`).

Beside the queue, :attr:`Pipeline.segment` follows the extended-protocol segment on the
way to the server (``CLOSED``: the last request was a Sync or a Query; ``OPEN``: Parse,
Bind, ... sent since; ``FAILED``: the server reported an error in the open segment and
ignores everything up to its Sync, as PostgreSQL's ``ignore_till_sync`` does). A server
connection is between transactions only when the queue is empty *and* the segment is
closed: a segment ended by Flush, or failed before its Sync, is still the client's.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Final

from mypy_extensions import i64, mypyc_attr

from proxy.protocol import messages as m
from proxy.protocol.errors import (
    ClientProtocolViolation,
    ServerProtocolViolation,
    StatementTooLarge,
)
from proxy.protocol.parameters import SERVER_OWNED, keep_reported, tracked
from proxy.protocol.statements import (
    ClientStatements,
    ServerStatements,
    StatementNames,
    close_message,
    parse_message,
    sqlstate,
)

# Final: compiled by mypyc, a Final constant is a C static; any other module-level
# name is a dict lookup at each use (the interpreter caches those, mypyc does not)
_SERVER_VIOLATION: Final = ServerProtocolViolation  # passed as a value
FORWARD: Final = 0
INJECTED: Final = 1
INTERNAL: Final = 2
FAKE: Final = 3
CAPTURE: Final = 4

# Pipeline.segment: the extended-protocol segment sent to the server (see the docstring)
CLOSED: Final = 0
OPEN: Final = 1
FAILED: Final = 2

# kinds: what completes an entry
_PARSE: Final = 0
_BIND: Final = 1
_DESCRIBE: Final = 2
_EXECUTE: Final = 3
_CLOSE: Final = 4
_SYNC: Final = 5
_QUERY: Final = 6
_FAKE_REPLY: Final = {_PARSE: m.PARSE_COMPLETE, _CLOSE: m.CLOSE_COMPLETE}
_NO_KIND: Final = 255
# the kind of request each server message type completes (_NO_KIND: none); a table,
# not a dict: compiled, one index instead of a lookup of a boxed int
_COMPLETES: Final = bytes(
    {
        ord("1"): _PARSE,
        ord("2"): _BIND,
        ord("3"): _CLOSE,
        ord("T"): _DESCRIBE,
        ord("n"): _DESCRIBE,
        ord("C"): _EXECUTE,
        ord("I"): _EXECUTE,
        ord("s"): _EXECUTE,
    }.get(t, _NO_KIND)
    for t in range(256)
)
_I16: Final = struct.Struct("!h")
# CopyData, CopyDone, CopyFail, Flush and the rest of a streamed message (it was a
# Query, CopyData, FunctionCall, unnamed Parse or Bind: forwarded): no response, no rewrite
_PLAIN: Final = frozenset((*b"dcfH", m.CONTINUATION))
# requests that open an extended-protocol segment (Flush alone leaves it as it is)
_OPENS: Final = frozenset(b"PBDEC")
# Parse, Bind, Describe, Close: what they complete when statements pass through
_NAMING: Final = {80: _PARSE, 66: _BIND, 68: _DESCRIBE, 67: _CLOSE}
# SQLSTATEs after which a server statement cannot serve again: gone (26000), or its
# result type changed under it ("cached plan must not change result type", 0A000)
_GONE: Final = b"26000"
_STALE: Final = b"0A000"
_I32: Final = struct.Struct("!i")
# queries after which the server has no prepared statements left
_DROPS_STATEMENTS: Final = re.compile(rb"\s*(DISCARD\s+ALL|DEALLOCATE\s+(PREPARE\s+)?ALL)\b", re.I)
# the first bytes such a query may begin with, as a table (an index, not a set lookup
# of a boxed int): the cheap check made of every client Query
_MAYBE_DISCARD: Final = m.type_table(frozenset(b"Dd \t\n\r\f\v"))


class Entry:
    __slots__ = ("action", "kind", "rows", "stmt")

    def __init__(self, kind: int, action: int, stmt: str | None = None) -> None:
        self.kind = kind
        self.action = action
        # the server statement a Parse creates (forgotten if it fails), an eviction
        # closes, or a Bind/Describe uses (forgotten if the server says it is stale)
        self.stmt = stmt
        self.rows: list[list[str | None]] | None = None  # CAPTURE: the rows; None on error


# EntryQueue's ring: its size to begin with, and to go back to once empty (a power of
# two, as every size it grows to)
_RING: Final = 8


class EntryQueue:
    """The entries awaiting a response, oldest first: the few deque operations the
    pipeline needs, as native calls (compiled, each operation on a deque is a generic
    call, and a transaction makes several). A ring of slots that doubles when full and
    goes back to its first size whenever it empties, so a client that once pipelined
    deeply does not keep its slots; a slot read is cleared at once."""

    __slots__ = ("_count", "_head", "_slots")

    def __init__(self) -> None:
        self._slots: list[Entry | None] = [None] * _RING
        self._head: i64 = 0
        self._count: i64 = 0

    def append(self, entry: Entry) -> None:
        slots = self._slots
        count = self._count
        if count == len(slots):
            slots = self._grow()
        slots[(self._head + count) & (len(slots) - 1)] = entry
        self._count = count + 1

    def extend(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.append(entry)

    def _grow(self) -> list[Entry | None]:
        slots: list[Entry | None] = [*self, *[None] * self._count]
        self._slots = slots
        self._head = 0
        return slots

    def first(self) -> Entry | None:
        """The oldest entry, or None when nothing awaits a response."""
        return self._slots[self._head] if self._count else None

    def popleft(self) -> Entry:
        entry = self._slots[self._head] if self._count else None
        if entry is None:
            raise IndexError("popleft from an empty EntryQueue")
        slots = self._slots
        slots[self._head] = None
        self._count -= 1
        if self._count:
            self._head = (self._head + 1) & (len(slots) - 1)
        else:
            self._head = 0
            if len(slots) > _RING:
                self._slots = [None] * _RING
        return entry

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[Entry]:
        slots = self._slots
        mask = len(slots) - 1
        head = self._head
        entries: list[Entry] = []
        for n in range(self._count):
            entry = slots[(head + n) & mask]
            assert entry is not None
            entries.append(entry)
        return iter(entries)


# A FORWARD entry without a statement is never changed once queued, so one shared
# instance per kind serves every request (no allocation on the hot path).
_FORWARDS: Final = {kind: Entry(kind, FORWARD) for kind in range(7)}
_FWD_QUERY: Final = _FORWARDS[_QUERY]
_FWD_SYNC: Final = _FORWARDS[_SYNC]
_FWD_EXECUTE: Final = _FORWARDS[_EXECUTE]
_FWD_BIND: Final = _FORWARDS[_BIND]
_FWD_PARSE: Final = _FORWARDS[_PARSE]


# An INTERNAL query's entry is never changed once queued either (rows are CAPTURE's).
_INTERNAL_QUERY: Final = Entry(_QUERY, INTERNAL)

# The proxy's own queries as messages, and whether each drops the server's prepared
# statements: the same few (the reset, a login's settings) at nearly every session
_INTERNAL_MESSAGES: Final[dict[str, tuple[bytes, bool]]] = {}


def _internal_message(sql: str) -> tuple[bytes, bool]:
    kept = _INTERNAL_MESSAGES.get(sql)
    if kept is None:
        data = m.query(sql)
        kept = (data, _DROPS_STATEMENTS.match(data, 5, 64) is not None)
        m.remember(_INTERNAL_MESSAGES, sql, kept, len(sql))
    return kept


def _split_name(body: bytes, offset: int = 0) -> tuple[str, int]:
    return m.read_cstr(body, offset, ClientProtocolViolation)


def _partial(data: bytes) -> bool:
    """``data`` is only the head of a message that streams (see FrameReader)."""
    return len(data) != 1 + m.int32_at(data, 1)


@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' own sinks
class ParameterSink:
    """Told of each ParameterStatus the server sends: the client session holding the
    connection (a base class: compiled, a native call, with no bound method to make)."""

    def on_parameter(self, name: str, value: str) -> None:
        raise NotImplementedError


class Pipeline:
    """Rewrites client requests for this server connection and routes its responses."""

    __slots__ = (
        "changed_parameters",
        "fatal_forwarded",
        "names",
        "parameters",
        "prepared",
        "queue",
        "renaming",
        "report_after",
        "report_before",
        "report_name",
        "report_value",
        "segment",
        "streaming_forward",
        "synced",
        "unrequested_error",
    )

    def __init__(self, names: StatementNames, parameters: dict[str, str]) -> None:
        self.names = names
        self.renaming = names.limit > 0  # else statement names pass through
        self.prepared = ServerStatements(names.limit)
        self.queue = EntryQueue()
        self.parameters = parameters  # the server's reported parameters, kept current
        # names the server reported (ParameterStatus) since its reader last emptied
        # this: at most the few reportable ones (proxy/upstream.py, parameter_statuses)
        self.changed_parameters: set[str] = set()
        # the subset a client carries between connections; replaced, never changed in
        # place, so that a client can share it (proxy/session.py, _same_settings)
        self.synced = tracked(parameters)
        # the last report that changed synced, from what to what (see _synced_after)
        self.report_before: dict[str, str] | None = None
        self.report_name = ""
        self.report_value = ""
        self.report_after: dict[str, str] = self.synced
        self.fatal_forwarded = False  # the client already got the server's last word
        self.unrequested_error: bytes | None = None  # an error between requests
        self.streaming_forward = True  # a server message streaming through goes to the client
        self.segment = CLOSED

    @property
    def idle(self) -> bool:
        """No request is waiting for a response."""
        return not self.queue

    # --- client -> server ---------------------------------------------------------

    def client_message(self, msg: m.Message, stmts: ClientStatements, out: list[bytes]) -> None:
        """Append the bytes to send upstream for ``msg`` to ``out`` and queue its entries."""
        t = msg.data[0]
        if self.segment == FAILED:
            self._ignored(t, msg.data, out)
            return
        queue = self.queue
        if t in _OPENS:
            self.segment = OPEN
        if t == 81:  # Q
            self.segment = CLOSED
            queue.append(_FWD_QUERY)
            if _DROPS_STATEMENTS.match(msg.data, 5, 64):
                self.prepared.clear()
        elif t == 83:  # S
            self.segment = CLOSED
            queue.append(_FWD_SYNC)
        elif t == 69:  # E
            queue.append(_FWD_EXECUTE)
        elif not self.renaming and t in _NAMING:  # P, B, D, C pass through
            queue.append(_FORWARDS[_NAMING[t]])
        elif t == 66:  # B
            body = msg.body
            _portal, offset = _split_name(body)
            name, rest = _split_name(body, offset)
            if name:
                target = self._ensure(stmts, name, out)
                if target is not None:
                    # the declared length, not len(body): a big Bind streams after its head
                    length = int(m.int32_at(msg.data, 1)) + len(target) - len(name)
                    renamed = body[:offset] + m.cstr(target) + body[rest:]
                    out.append(b"B" + _I32.pack(length) + renamed)
                    queue.append(Entry(_BIND, FORWARD, target))
                    return
            queue.append(_FWD_BIND)
        elif t == 80:  # P
            body = msg.body
            name, offset = _split_name(body)
            if name:
                if _partial(msg.data):
                    raise StatementTooLarge(
                        f"prepared statement {name!r} is larger than the proxy's message buffer"
                    )
                definition = body[offset:]
                target = self.names.name_for(definition)
                stmts.keep(name, target, definition, self.names.limit)
                if self.prepared.use(target):
                    queue.append(Entry(_PARSE, FAKE))
                    return
                self._prepare(target, definition, FORWARD, out)
                return
            queue.append(_FWD_PARSE)
        elif t == 68 or t == 67:  # D, C
            body = msg.body
            if len(body) < 2:
                raise ClientProtocolViolation("Describe/Close without a target")
            kind = _DESCRIBE if t == 68 else _CLOSE
            name, _ = _split_name(body, 1)
            if body[0] == 83 and name:  # 'S': a named statement
                if kind == _CLOSE:
                    # the server keeps it for others, until it is the least recently used
                    stmts.drop(name)
                    queue.append(Entry(_CLOSE, FAKE))
                    return
                target = self._ensure(stmts, name, out)
                if target is not None:
                    out.append(m.message(b"D", b"S" + m.cstr(target)))
                    queue.append(Entry(_DESCRIBE, FORWARD, target))
                    return
            elif body[0] not in (80, 83):
                raise ClientProtocolViolation("Describe/Close of neither 'S' nor 'P'")
            queue.append(_FORWARDS[kind])
        elif t == 70:  # F: FunctionCall answers V then Z like a query
            self.segment = CLOSED
            queue.append(_FWD_QUERY)
        out.append(msg.data)

    def _ignored(self, t: int, data: bytes, out: list[bytes]) -> None:
        """A request while the server skips to the Sync of a failed segment.

        It is forwarded as it came (the server reads and drops it; a message streaming
        through keeps its framing) but never queued, renamed or remembered: no response
        will come. The Sync ends the skipping, and is answered with ReadyForQuery.
        """
        out.append(data)
        if t == 83:  # S
            self.segment = CLOSED
            self.queue.append(_FWD_SYNC)

    def client_frames(
        self,
        buf: bytes,
        frames: list[tuple[int, int, int]],
        stmts: ClientStatements,
        out: list[bytes],
    ) -> None:
        """Bulk form of :meth:`client_message`: what needs no rewrite leaves as one slice."""
        if self.segment == FAILED and frames:
            frames = self._skip_ignored(buf, frames, out)
        queue = self.queue
        run_start = run_end = -1
        for t, start, end in frames:
            if t == 81:  # Q
                self._query(buf, start, end)
            elif t == 70:  # F
                self.segment = CLOSED
                queue.append(_FWD_QUERY)
            elif t == 83:  # S
                self.segment = CLOSED
                queue.append(_FWD_SYNC)
            elif t == 69:  # E
                self.segment = OPEN
                queue.append(_FWD_EXECUTE)
            elif not self.renaming and t in _NAMING:  # P, B, D, C pass through
                self.segment = OPEN
                queue.append(_FORWARDS[_NAMING[t]])
            elif t not in _PLAIN:  # P, B, D, C may name a statement: the careful path
                if run_start >= 0:
                    out.append(buf[run_start:run_end])
                    run_start = -1
                self.client_message(m.Message(buf[start : start + 1], buf[start:end]), stmts, out)
                continue
            if run_start < 0:
                run_start = start
            run_end = end
        if run_start >= 0:
            out.append(buf if run_start == 0 and run_end == len(buf) else buf[run_start:run_end])

    def simple_query(self, query: bytes) -> bool:
        """Queue the client's Query ``query`` (one whole message) that goes to the
        server as it is; False, with nothing done, while a failed segment is skipped
        (:meth:`client_frames` knows what to do then)."""
        if self.segment == FAILED:
            return False
        self._query(query, 0, len(query))
        return True

    def _query(self, buf: bytes, start: int, end: int) -> None:
        self.segment = CLOSED
        self.queue.append(_FWD_QUERY)
        if _MAYBE_DISCARD[buf[start + 5]] and _DROPS_STATEMENTS.match(
            buf, start + 5, min(end, start + 64)
        ):
            self.prepared.clear()  # DISCARD ALL / DEALLOCATE ALL from the client

    def _skip_ignored(
        self, buf: bytes, frames: list[tuple[int, int, int]], out: list[bytes]
    ) -> list[tuple[int, int, int]]:
        """:meth:`_ignored` for the frames up to the first Sync (one slice); the rest."""
        after = past_failed_segment(frames)
        last = frames[-1 if after < 0 else after - 1]
        out.append(buf[frames[0][1] : last[2]])
        if after < 0:
            return []
        self.segment = CLOSED
        self.queue.append(_FWD_SYNC)
        return frames[after:]

    def _ensure(self, stmts: ClientStatements, name: str, out: list[bytes]) -> str | None:
        """Server name of the client's statement, prepared here first if needed."""
        known = stmts.by_name.get(name)
        if known is None:
            return None  # the server will say it does not exist
        target, definition = known
        if not self.prepared.use(target):
            self._prepare(target, definition, INJECTED, out)
        return target

    def _prepare(self, target: str, definition: bytes, action: int, out: list[bytes]) -> None:
        """Parse ``target`` here, first closing the least recently used past the cap."""
        queue = self.queue
        for victim in self.prepared.add(target):
            out.append(close_message(victim))
            queue.append(Entry(_CLOSE, INTERNAL, victim))
        out.append(parse_message(target, definition))
        queue.append(Entry(_PARSE, action, target))

    def _failed(self, head: Entry, error: bytes) -> None:
        """``head`` failed with ``error``; the server skips the rest of its segment."""
        stmt = head.stmt
        if stmt is not None and (head.kind == _BIND or head.kind == _DESCRIBE):
            code = sqlstate(error)
            if code == _GONE:
                self.prepared.discard(stmt)  # prepared again at the next use
            elif code == _STALE:
                self.names.forget(stmt)  # the next Parse of its text gets a fresh one
        queue = self.queue
        if head.kind == _QUERY:
            return
        # What the server holds is what it held before the segment: the first Parse or
        # Close of a name in it says which (we Parse only what is not there, and Close
        # only what is), the rest of the segment changed nothing.
        seen: set[str] = set()
        while (first := queue.first()) is not None and first.kind != _SYNC:
            entry = queue.popleft()
            stmt = entry.stmt
            if stmt is None or stmt in seen or (entry.kind != _PARSE and entry.kind != _CLOSE):
                continue
            seen.add(stmt)
            if entry.kind == _PARSE:
                self.prepared.discard(stmt)  # failed or skipped: not there
            else:
                self.prepared.restore(stmt)  # an eviction skipped: still there
        if not queue:
            # that Sync is not sent yet: what the client sends until then is ignored
            self.segment = FAILED

    def internal_query(self, sql: str) -> bytes:
        """A query of the proxy's own whose responses nobody sees."""
        self.queue.append(_INTERNAL_QUERY)
        data, drops_statements = _internal_message(sql)
        if drops_statements:
            self.prepared.clear()
        return data

    def capture_query(self, sql: str) -> tuple[bytes, Entry]:
        """A query of the proxy's own whose text-format rows end up in ``entry.rows``."""
        entry = Entry(_QUERY, CAPTURE)
        entry.rows = []
        self.queue.append(entry)
        return m.query(sql), entry

    def fakes(self, out: list[bytes]) -> None:
        """Emit the synthesized replies that are now at the head of the queue."""
        queue = self.queue
        while (first := queue.first()) is not None and first.action == FAKE:
            out.append(_FAKE_REPLY[queue.popleft().kind])

    # --- server -> client ---------------------------------------------------------

    def awaits_one_answer(self) -> bool:
        """The commonest case by far: only the client's one simple Query is waiting.
        Its whole answer in one read (``ServerConnection.receive_answer``) then goes to
        the client as it came, and :meth:`answered` is all the bookkeeping."""
        queue = self.queue
        return len(queue) == 1 and queue.first() is _FWD_QUERY

    def answered(self) -> None:
        self.queue.popleft()

    def awaits_internal_answer(self) -> bool:
        """A query of the proxy's own is the next to be answered: a login's settings
        (often in one read with the answer to the client's first query behind them),
        or the reset after a client left (session pooling). When the read begins with
        its plain answer (``ServerConnection.receive_internal_answer``), that part
        goes to :meth:`internal_answered`."""
        return self.queue.first() is _INTERNAL_QUERY

    def internal_answered(self, data: bytes, end: i64, sink: ParameterSink | None = None) -> bytes:
        """What :meth:`server_frames` makes of ``data[:end]``, that answer, without
        cutting it into frames: its ParameterStatus messages noted and shown to the
        client, the rest swallowed, the query done (and replies of ours that were
        waiting for it sent)."""
        shown: list[bytes] = []
        pos: i64 = 0
        while pos < end:
            stop = pos + 1 + m.int32_at(data, pos + 1)
            if data[pos] == 83:  # S
                self._parameter_status(data[pos + 5 : stop], sink)
                shown.append(data[pos:stop])
            pos = stop
        queue = self.queue
        queue.popleft()
        first = queue.first()
        if first is not None and first.action == FAKE:
            self.fakes(shown)
        if not shown:
            return b""
        return shown[0] if len(shown) == 1 else b"".join(shown)

    def server_frames(
        self,
        buf: bytes,
        frames: list[tuple[int, int, int]],
        out: list[bytes],
        sink: ParameterSink | None = None,
    ) -> bool:
        """Bulk form of :meth:`server_message`: runs of forwarded frames leave as one slice.

        Returns True when an ErrorResponse of the proxy's own query was swallowed.
        """
        queue = self.queue
        if frames and frames[0][0] == m.CONTINUATION:
            # the rest of a message that streams: it goes where its head went
            end = frames[0][2]
            if self.streaming_forward:
                out.append(buf[:end] if end != len(buf) else buf)
            if len(frames) == 1:
                return False
            # rare (a streamed message ends in this read): the rest as if it came alone
            buf = buf[end:]
            frames = [(t, start - end, stop - end) for t, start, stop in frames[1:]]
        run_start = run_end = -1
        swallowed_error = False
        forward = True
        # the head of the queue, read again only when it may have changed
        head = queue.first()
        for t, start, end in frames:
            if head is not None and head.action == FAKE:
                if run_start >= 0:
                    out.append(buf[run_start:run_end])
                    run_start = -1
                self.fakes(out)
                head = queue.first()
            if t == 83:
                # ParameterStatus: noted, and forwarded with what surrounds it (it is
                # never streamed: FrameReader refuses a large one)
                self._parameter_status(buf[start + 5 : end], sink)
                if run_start < 0:
                    run_start = start
                run_end = end
                forward = True
                continue
            if head is None or t == 78 or t == 65:
                # no request pending, or a notice/notification: take the careful
                # path (it also validates what nobody asked for)
                if run_start >= 0:
                    out.append(buf[run_start:run_end])
                    run_start = -1
                msg = m.Message(buf[start : start + 1], buf[start:end])
                forward = t == 78 or t == 65  # only those may be streamed here
                if not forward and _partial(msg.data):
                    raise ServerProtocolViolation(f"message {msg.type!r} too large")
                swallowed_error |= self.server_message(msg, out)
                head = queue.first()
                continue
            entry = head  # the request this message answers
            action = entry.action
            if t == 90:  # Z
                queue.popleft()
                head = queue.first()
                if entry.kind != _SYNC and entry.kind != _QUERY:
                    raise ServerProtocolViolation("ReadyForQuery before the request completed")
                forward = action == FORWARD
            elif t == 69:  # E
                self._failed(entry, buf[start:end])
                head = queue.first()
                forward = action != INTERNAL and action != CAPTURE
                if not forward:
                    entry.rows = None
                    swallowed_error = True
                elif buf[start + 5 : start + 12] == b"SFATAL\0":
                    self.fatal_forwarded = True
            else:
                if _COMPLETES[t] == entry.kind:
                    queue.popleft()
                    head = queue.first()
                forward = action == FORWARD
                if action == CAPTURE and t == 68 and entry.rows is not None:
                    if _partial(buf[start:end]):
                        entry.rows = None  # not ours to hold: the capture fails
                    else:
                        entry.rows.append(_data_row(buf[start + 5 : end]))
            if forward:
                if run_start < 0:
                    run_start = start
                run_end = end
            elif run_start >= 0:
                out.append(buf[run_start:run_end])
                run_start = -1
        if run_start >= 0:
            out.append(buf[run_start:run_end] if run_start or run_end != len(buf) else buf)
        self.streaming_forward = forward  # matters when the last frame was a head
        first = queue.first()
        if first is not None and first.action == FAKE:
            self.fakes(out)  # e.g. a Close answered by us, with only a Flush after it
        return swallowed_error

    def server_message(
        self,
        msg: m.Message,
        out: list[bytes],
        sink: ParameterSink | None = None,
    ) -> bool:
        """Route one server message; append what the client should see to ``out``.

        Returns True when an ErrorResponse of the proxy's own query was swallowed.
        """
        queue = self.queue
        first = queue.first()
        if first is not None and first.action == FAKE:
            self.fakes(out)
        t = msg.data[0]
        if t == 78 or t == 65:  # N, A: asynchronous, always the client's
            out.append(msg.data)
            return False
        if t == 83:  # S: ParameterStatus
            self._parameter_status(msg.body, sink)
            out.append(msg.data)
            return False
        head = queue.first()
        if head is None:
            # nothing asked: only an error (admin shutdown, idle timeout) may arrive; it
            # is about the server session, so whoever owns that decides (not forwarded)
            if t == 69:
                self.unrequested_error = msg.data
                return False
            raise ServerProtocolViolation(f"unrequested message {msg.type!r}")
        action = head.action
        if t == 90:  # Z ends a Sync or a Query
            queue.popleft()
            if head.kind != _SYNC and head.kind != _QUERY:
                raise ServerProtocolViolation("ReadyForQuery before the request completed")
            if action == FORWARD:
                out.append(msg.data)
            return False
        if t == 69:  # E
            self._failed(head, msg.data)
            if action in (INTERNAL, CAPTURE):
                head.rows = None
                return True
            if msg.data[5:12] == b"SFATAL\0":
                self.fatal_forwarded = True
            out.append(msg.data)
            return False
        if _COMPLETES[t] == head.kind:
            queue.popleft()
        if action == FORWARD:
            out.append(msg.data)
        elif action == CAPTURE and t == 68 and head.rows is not None:  # DataRow
            head.rows.append(_data_row(msg.body))
        return False

    def _parameter_status(self, body: bytes, sink: ParameterSink | None) -> None:
        name, value = m.parse_parameter_status(body, _SERVER_VIOLATION)
        keep_reported(self.parameters, name, value)
        self.changed_parameters.add(name)
        if name not in SERVER_OWNED and self.synced.get(name) != value:
            self.synced = self._synced_after(name, value)
        if sink is not None:
            sink.on_parameter(name, value)

    def _synced_after(self, name: str, value: str) -> dict[str, str]:
        """``synced`` with ``name`` reported as ``value``: a new dict (it may be shared),
        or the one that the same report over the same dict gave last time. In session
        pooling each client's reset reports the same value over the same settings; the
        next login's check of them then ends at an identity test
        (proxy/session.py, _same), not a compare item by item."""
        before = self.synced
        if self.report_before is before and self.report_name == name and self.report_value == value:
            return self.report_after
        after = {**before, name: value}
        self.report_before, self.report_name, self.report_value = before, name, value
        self.report_after = after
        return after


def _data_row(body: bytes) -> list[str | None]:
    count = m.parse_int16(body, 0, _SERVER_VIOLATION)
    offset = 2
    row: list[str | None] = []
    for _ in range(count):
        length = m.parse_int32(body, offset, _SERVER_VIOLATION)
        offset += 4
        if length < 0:
            row.append(None)
            continue
        row.append(body[offset : offset + length].decode(errors="replace"))
        offset += length
    return row


def refuse(types: list[int], error: bytes, discarding: bool) -> tuple[list[bytes], bool]:
    """Answer requests that no server will see, as a server that failed them would.

    One ``error`` per Query and per extended-protocol segment, and ReadyForQuery 'I' at
    each Query or Sync; while ``discarding`` (a failed segment still open) everything up
    to the next Sync is dropped. Returns the replies and whether a segment stays open.
    """
    out: list[bytes] = []
    for t in types:
        if discarding:
            if t == 83:  # S
                out.append(m.READY_IDLE)
                discarding = False
        elif t == 81 or t == 70:  # Q, F
            out += [error, m.READY_IDLE]
        elif t == 83:
            out.append(m.READY_IDLE)
        elif t not in _PLAIN:  # P, B, D, E, C
            out.append(error)
            discarding = True
    return out, discarding


# --- rules of the conversation the I/O shell asks about ---------------------------


def between_transactions(pipeline: Pipeline, status: bytes) -> bool:
    """Nothing awaits a response, no segment is open (the ReadyForQuery seen answered
    the client's last Sync or Query) and the server is idle ('I'): the server session
    holds nothing of the client's, so it may serve another client (or be closed cleanly)."""
    return not pipeline.queue and pipeline.segment == CLOSED and status == b"I"


def past_failed_segment(frames: list[tuple[int, int, int]]) -> int:
    """Index just past the first Sync in ``frames``, or -1 if there is none.

    After an extended-protocol request failed without reaching a server, everything
    up to and including the next Sync is dropped (as the server would), and that Sync
    is answered with ReadyForQuery 'I'.
    """
    for i, frame in enumerate(frames):
        if frame[0] == 83:  # 'S'
            return i + 1
    return -1


# what to do with a client's server connection when the client goes away
KEEP: Final = "keep"
FINISH: Final = "finish"
DROP: Final = "drop"


def when_client_leaves(pipeline: Pipeline, status: bytes, reset: bool) -> str:
    """``KEEP`` it for the pool, ``FINISH`` (wait for the proxy's own queries, then the
    reset query) or ``DROP`` it (a request of the client still open, or a transaction)."""
    if pipeline.segment != CLOSED or any(entry.action != INTERNAL for entry in pipeline.queue):
        return DROP
    if not pipeline.queue and status != b"I":
        return DROP
    return FINISH if reset or pipeline.queue else KEEP
