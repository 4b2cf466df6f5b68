"""Prepared-statement bookkeeping of the proxy, sans I/O.

In transaction mode a client's named statements are renamed to server-wide names (one
per distinct definition: query text and parameter types), so that any server connection
can run them; these are the maps behind that renaming, each one bounded:

* :class:`StatementNames` - definition -> server name, shared by the pool's connections;
  least recently used mappings are forgotten past a count and a byte budget (a forgotten
  definition gets a new name the next time it is prepared; names are never reused);
* :class:`ServerStatements` - what one server connection has prepared, at most
  ``max_prepared_statements`` (PgBouncer's name): the least recently used one is closed
  on the server to make room, and prepared again from its text when a client needs it;
* :class:`ClientStatements` - one client's names and the definitions kept to prepare
  them again; a client past its budget is refused (``53400``).

``max_prepared_statements: 0`` turns all of this off, as in PgBouncer: statements pass
through unchanged (what session mode always does: the connection is the client's own).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from proxy.protocol import messages as m
from proxy.protocol.errors import StatementLimit

DEFAULT_MAX_PREPARED: Final = 200  # PgBouncer's default max_prepared_statements
# The proxy's own maps, in multiples of max_prepared_statements and in bytes of kept
# statement text (one text is at most message_buffer: a larger Parse is refused).
SHARED_FACTOR: Final = 5
SHARED_BYTES: Final = 16 << 20
CLIENT_FACTOR: Final = 5
CLIENT_BYTES: Final = 4 << 20


class StatementNames:
    """Server-side name for each distinct statement (query text + parameter types)."""

    def __init__(self, limit: int = DEFAULT_MAX_PREPARED, prefix: str = "csp_") -> None:
        self.limit = limit  # max_prepared_statements; 0: no renaming at all
        self._names: OrderedDict[bytes, str] = OrderedDict()
        self._definitions: dict[str, bytes] = {}
        self._prefix = prefix
        self._issued = 0
        self._bytes = 0
        self.max_entries = SHARED_FACTOR * limit
        self.max_bytes = SHARED_BYTES

    def name_for(self, definition: bytes) -> str:
        names = self._names
        name = names.get(definition)
        if name is not None:
            names.move_to_end(definition)
            return name
        self._issued += 1
        name = f"{self._prefix}{self._issued}"
        names[definition] = name
        self._definitions[name] = definition
        self._bytes += len(definition)
        while len(names) > 1 and (len(names) > self.max_entries or self._bytes > self.max_bytes):
            old, old_name = names.popitem(last=False)
            del self._definitions[old_name]
            self._bytes -= len(old)
        return name

    def forget(self, name: str) -> None:
        """The server statement ``name`` went stale: its definition gets a fresh name."""
        definition = self._definitions.pop(name, None)
        if definition is not None:
            del self._names[definition]
            self._bytes -= len(definition)

    def __len__(self) -> int:
        return len(self._names)


class ServerStatements:
    """The server statements one connection holds, least recently used first."""

    __slots__ = ("_names", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = max(limit, 1)
        self._names: OrderedDict[str, None] = OrderedDict()

    def use(self, name: str) -> bool:
        """True if ``name`` is prepared here (it becomes the most recently used)."""
        names = self._names
        if name in names:
            names.move_to_end(name)
            return True
        return False

    def add(self, name: str) -> list[str]:
        """Count ``name`` as prepared; returns the statements to close to make room."""
        names = self._names
        evicted: list[str] = []
        while len(names) >= self.limit:
            evicted.append(names.popitem(last=False)[0])
        names[name] = None
        return evicted

    def restore(self, name: str) -> None:
        """A Close the server skipped (an earlier error in its segment): still there."""
        self._names[name] = None

    def discard(self, name: str) -> None:
        self._names.pop(name, None)

    def clear(self) -> None:
        self._names.clear()

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        return list(self._names)


class ClientStatements:
    """A client's prepared statements: its name -> (server name, Parse body after the name)."""

    __slots__ = ("by_name", "size")

    def __init__(self) -> None:
        self.by_name: dict[str, tuple[str, bytes]] = {}
        self.size = 0  # bytes of kept definitions

    def keep(self, name: str, target: str, definition: bytes, limit: int) -> None:
        """Remember ``name``; raises :class:`StatementLimit` past the client's budget."""
        old = self.by_name.get(name)
        size = self.size + len(definition) - (len(old[1]) if old is not None else 0)
        count = len(self.by_name) + (old is None)
        if count > CLIENT_FACTOR * limit or size > CLIENT_BYTES:
            raise StatementLimit(
                f"too many prepared statements: a client may keep {CLIENT_FACTOR * limit} "
                f"({CLIENT_BYTES >> 20} MiB of text) through this proxy; close some"
            )
        self.by_name[name] = (target, definition)
        self.size = size

    def drop(self, name: str) -> None:
        old = self.by_name.pop(name, None)
        if old is not None:
            self.size -= len(old[1])


def parse_message(server_name: str, definition: bytes) -> bytes:
    """A Parse that prepares ``definition`` (the body after the name) as ``server_name``."""
    return m.message(b"P", m.cstr(server_name) + definition)


def close_message(server_name: str) -> bytes:
    return m.message(b"C", b"S" + m.cstr(server_name))


def sqlstate(error: bytes) -> bytes:
    """The SQLSTATE ('C' field) of a whole ErrorResponse message, or b'' if absent."""
    offset = 5
    end = len(error)
    while offset < end and error[offset] != 0:
        stop = error.find(b"\0", offset + 1)
        if stop < 0:
            break
        if error[offset] == 67:  # 'C'
            return error[offset + 1 : stop]
        offset = stop + 1
    return b""
