"""Session mode across credential generations: can a client's server session move?

A session-mode client keeps its server connection, so after a rotation it would keep
the old credentials forever. At a transaction boundary the proxy reads what the server
session holds; what can be re-created (SET values, prepared statements) is replayed on a
connection of the new generation, anything else (temporary tables, LISTEN, advisory
locks, cursors) pins the session to its old connection.

Statement names pass through unchanged in session mode, so a statement the client
prepared at protocol level is re-created with SQL ``PREPARE`` under its own name and
parameter types (Bind, Describe and Close work on those alike). Only what ``PREPARE``
can take moves; a session holding any other protocol-level statement (a prepared
``SET`` or ``BEGIN``) stays pinned.
"""

from __future__ import annotations

from dataclasses import dataclass

# anything in "blocked" cannot be carried over
SESSION_STATE_SQL = """\
SELECT 'blocked', ((SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())
  + (SELECT count(*) FROM pg_listening_channels())
  + (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory')
  + (SELECT count(*) FROM pg_cursors)
  + (SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql
     AND statement !~* '^\\s*(select|insert|update|delete|merge|values|table|with)\\M'))::text
UNION ALL SELECT 'set', format('SET %I TO %L', name, current_setting(name))
  FROM pg_settings WHERE source = 'session'
UNION ALL SELECT 'prepare', CASE WHEN from_sql THEN statement
  ELSE format('PREPARE %I%s AS %s', name, CASE WHEN cardinality(parameter_types) > 0
    THEN '(' || array_to_string(parameter_types, ',') || ')' ELSE '' END, statement) END
  FROM pg_prepared_statements"""


@dataclass(frozen=True)
class Move:
    blocked: bool  # the session must stay on its connection (pinned)
    replay: list[str]  # statements that re-create the session state elsewhere


def plan(rows: list[list[str | None]]) -> Move:
    """Read the rows of :data:`SESSION_STATE_SQL`."""
    replay: list[str] = []
    blocked = False
    for kind, value in rows:
        if kind == "blocked":
            blocked = value != "0"
        elif kind == "set" and value is not None:
            replay.append(value)
        elif kind == "prepare" and value is not None:
            text = value.strip().rstrip(";")
            blocked = blocked or ";" in text  # part of a multi-statement string
            replay.append(text)
    return Move(blocked, replay)
