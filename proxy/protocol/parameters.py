"""Session settings a client carries from one pooled server connection to the next.

Sans I/O. A client's settings are of two kinds:

* *reported* ones, which the server announces with ParameterStatus (``TimeZone``,
  ``client_encoding``, ... and whatever else it reports, except :data:`SERVER_OWNED`):
  the client is told the server's canonical value, and the proxy follows the
  client's own ``SET`` of them through those reports;
* *extra* ones: any other startup parameter (``app.tag``, ``statement_timeout`` or a
  ``-c`` of ``options``). The server does not report them, so the proxy knows only
  the startup value, which it applies and re-applies.

Both are applied with ``set_config()``, which takes a value exactly as a startup
packet or a ParameterStatus gives it (``SET x TO '...'`` would read ``"$user", public``
as one schema), or with ``SET`` for the few settings known to read a quoted value the
same way (:data:`PLAIN_SET`); all of one batch run as one Query: one implicit
transaction, so a bad value leaves none of them applied.
"""

from __future__ import annotations

import re
from typing import Final

from proxy.protocol.errors import ServerProtocolViolation, UnsupportedParameter
from proxy.protocol.messages import remember

# Reported (GUC_REPORT) by PostgreSQL 12-18; the names the server reports them under
REPORTED: Final = (
    "application_name",
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "scram_iterations",
    "search_path",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
)
# reported, but facts about the server or the login, not the client's to carry
SERVER_OWNED: Final = frozenset(
    (
        "in_hot_standby",
        "integer_datetimes",
        "is_superuser",
        "server_encoding",
        "server_version",
        "session_authorization",
    )
)
# startup keys that are not settings (the login reads them), or that change identity
NOT_SETTINGS: Final = frozenset(("user", "database", "options", "replication"))
REFUSED: Final = frozenset(("role", "session_authorization", *SERVER_OWNED))
MAX_SETTINGS: Final = 64  # per client; a startup packet is small, but be explicit
# distinct names a server may report (PostgreSQL reports the 15 above, an extension
# a few more): what a connection keeps of them, and shows its clients, stays bounded
MAX_REPORTED: Final = 64
_CANONICAL: Final = {name.lower(): name for name in REPORTED}
# Built-in settings that are not lists of names, so that ``SET x TO '...'`` takes the
# value as set_config() does (PostgreSQL quotes only GUC_LIST_QUOTE ones). The server
# runs a SET without planning anything, and answers it with two messages fewer than a
# SELECT of set_config(): what drivers set at every login costs less (PgBouncer uses
# SET too). Spelled as client_settings() gives them; any other name uses set_config().
PLAIN_SET: Final = frozenset(
    (
        "application_name",
        "client_encoding",
        "DateStyle",
        "IntervalStyle",
        "TimeZone",
        "standard_conforming_strings",
        "default_transaction_read_only",
        "extra_float_digits",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
    )
)
# what a configuration parameter's name looks like (custom ones have a dot)
_NAME: Final = re.compile(r"[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)*")
_RESETS: Final = re.compile(r"\b(DISCARD|RESET)\s+ALL\b", re.I)


def keep_reported(parameters: dict[str, str], name: str, value: str) -> None:
    """``parameters[name] = value`` for a ParameterStatus; a name past the first
    :data:`MAX_REPORTED` is a server protocol violation (the connection is closed)."""
    if len(parameters) >= MAX_REPORTED and name not in parameters:
        raise ServerProtocolViolation(f"the server reported more than {MAX_REPORTED} parameters")
    parameters[name] = value


def canonical_name(name: str) -> str:
    """Parameter names are case-insensitive: a reported one by the server's spelling,
    any other in lower case."""
    low = name.lower()
    return _CANONICAL.get(low, low)


_SETTING_NAMES: Final[dict[str, str]] = {}  # startup key -> canonical name, checked


def _setting_name(raw: str) -> str | None:
    """The canonical name of startup key ``raw``, or None if it names no setting a
    client may carry. Kept: every login sends the same few keys, and the check is a
    regular expression (names a client makes up cannot grow what is kept)."""
    name = _SETTING_NAMES.get(raw)
    if name is None:
        name = canonical_name(raw)
        if name in REFUSED or not _NAME.fullmatch(name.lower()):
            return None
        remember(_SETTING_NAMES, raw, name, len(raw))
    return name


def split_options(options: str) -> list[tuple[str, str]]:
    """``name=value`` pairs of the startup ``options`` value (``-c name=value`` and
    ``--name=value``, space separated, backslash escapes, as ``pg_split_opts``).
    Other backend switches are refused: they are not settings a pool can carry."""
    tokens: list[str] = []
    token: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            token.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if token:
                tokens.append("".join(token))
                token = []
        else:
            token.append(ch)
    if token:
        tokens.append("".join(token))
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            setting = tokens[i + 1]
            i += 2
        elif len(tok) > 2 and tok[:2] in ("-c", "--"):
            setting, i = tok[2:], i + 1
        else:
            raise UnsupportedParameter(f"unsupported startup option: {tok}")
        name, eq, value = setting.partition("=")
        if not eq:
            raise UnsupportedParameter(f"-c {name} requires a value")
        pairs.append((name.replace("-", "_"), value))  # as PostgreSQL's ParseLongOption
    return pairs


def client_settings(params: dict[str, str], ignored: frozenset[str]) -> dict[str, str]:
    """The settings a client asks for at startup, by canonical name; ``options`` is
    unpacked, names in ``ignored`` (canonical) dropped. Raises UnsupportedParameter."""
    pairs = [(k, v) for k, v in params.items() if k not in NOT_SETTINGS]
    if "options" in params:
        pairs += split_options(params["options"])
    settings: dict[str, str] = {}
    for raw, value in pairs:
        name = _setting_name(raw)
        if name is None:
            if canonical_name(raw) in ignored:
                continue
            raise UnsupportedParameter(f"unsupported startup parameter: {raw}")
        if name not in ignored:
            settings[name] = value
    if len(settings) > MAX_SETTINGS:
        raise UnsupportedParameter(f"more than {MAX_SETTINGS} startup parameters")
    return settings


def tracked(parameters: dict[str, str]) -> dict[str, str]:
    """The reported parameters a client carries: all but the server's own."""
    return {k: v for k, v in parameters.items() if k not in SERVER_OWNED}


def literal(value: str) -> str:
    """An SQL string literal that means ``value`` whatever standard_conforming_strings is."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def settings_sql(have: dict[str, str], want: dict[str, str], reset_missing: bool = False) -> str:
    """SQL that moves settings ``have`` to ``want``: a ``SET`` or a ``set_config`` for
    each that differs, and (``reset_missing``) back to the default for each ``want``
    lacks."""
    changes: list[tuple[str, str | None]] = [(k, v) for k, v in want.items() if have.get(k) != v]
    if reset_missing:
        changes += [(k, None) for k in have if k not in want]  # None: the default
    statements: list[str] = []
    calls: list[str] = []
    for k, v in changes:
        if k in PLAIN_SET:
            statements.append(f"SET {k} TO {literal(v)};" if v is not None else f"RESET {k};")
        else:
            value = literal(v) if v is not None else "NULL"
            calls.append(f"pg_catalog.set_config({literal(k)},{value},false)")
    if calls:
        statements.append("SELECT " + ",".join(calls) + ";")
    return "".join(statements)


def resets_settings(sql: str) -> bool:
    """Whether ``sql`` (a server_reset_query) puts every setting back to its default."""
    return _RESETS.search(sql) is not None
