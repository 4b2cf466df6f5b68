"""Prepared-statement bookkeeping of the proxy, sans I/O.

In a pool, a client's named statements are renamed to server-wide names (one per
distinct definition: query text and parameter types), so that any server connection
can run them; these are the maps behind that renaming.
"""

from __future__ import annotations

from proxy.protocol import messages as m


class StatementNames:
    """Server-side name for each distinct statement (query text + parameter types)."""

    def __init__(self, prefix: str = "csp_") -> None:
        self._names: dict[bytes, str] = {}
        self._prefix = prefix

    def name_for(self, definition: bytes) -> str:
        name = self._names.get(definition)
        if name is None:
            name = f"{self._prefix}{len(self._names) + 1}"
            self._names[definition] = name
        return name

    def __len__(self) -> int:
        return len(self._names)


class ClientStatements:
    """A client's prepared statements: its name -> (server name, Parse body after the name)."""

    __slots__ = ("by_name",)

    def __init__(self) -> None:
        self.by_name: dict[str, tuple[str, bytes]] = {}


def parse_message(server_name: str, definition: bytes) -> bytes:
    """A Parse that prepares ``definition`` (the body after the name) as ``server_name``."""
    return m.message(b"P", m.cstr(server_name) + definition)
