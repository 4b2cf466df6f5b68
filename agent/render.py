"""Templates -> bytes. Pure: no file or network I/O after construction.

Templates are sandboxed Jinja2 with bounds (:mod:`agent.sandbox`): the output is
capped at the template's ``max_size`` (4 MiB by default), operations that would build
something bigger are refused before they run, and a render can be stopped from
another thread. Each secret is visible as ``secrets.<name>`` (its fields plus
``lease`` metadata). Errors name the template and the line, and never carry a secret
value: Jinja and Python messages can quote the values they choke on, so every render
error is scrubbed before it leaves this module.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from jinja2 import nodes

from agent.config import EnvTemplateConfig, TemplateConfig
from agent.errors import RenderError
from agent.sandbox import BoundedEnvironment, Budget, TemplateLimit, render_bounded
from agent.secret import SecretValue

RENDER_DEADLINE = 30.0  # seconds: far beyond any real template, short of a hung agent
_REDACTED = "<redacted>"
# values this short are too common to replace inside a message; hide the message instead
_MIN_SCRUB_LEN = 4


class Template:
    """One compiled template. Compiles at construction so ``check`` catches syntax errors."""

    def __init__(self, cfg: TemplateConfig | EnvTemplateConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        # the file name Jinja puts in tracebacks: lets us find the failing template line
        self._filename = f"<template {self.name}>"
        source = _read_source(cfg)
        env = _environment(strict=cfg.error_on_missing_key)
        try:
            ast = env.parse(source, name=self.name, filename=self._filename)
            code = env.compile(ast, name=self.name, filename=self._filename)
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(
                f"{self._where()} line {exc.lineno}: syntax error: {exc.message}"
            ) from None
        self._template = env.template_class.from_code(env, code, env.make_globals(None))
        self._names, self.dynamic = _referenced_secrets(ast)

    def _where(self) -> str:
        src = f" (source {self.cfg.source})" if self.cfg.source is not None else ""
        return f"template {self.name}{src}"

    def secret_names(self) -> set[str]:
        """Names used as ``secrets.<name>`` / ``secrets["name"]``.

        Incomplete when :attr:`dynamic` is true (the template indexes ``secrets`` with
        a variable or iterates it): such a template needs every secret.
        """
        return set(self._names)

    def render(
        self, secrets: Mapping[str, SecretValue], stop: threading.Event | None = None
    ) -> bytes:
        """Render with ``secrets.<name>`` = ``value.template_view()``. Raises RenderError.

        Bounded by ``max_size`` and :data:`RENDER_DEADLINE`; ``stop`` set from another
        thread ends the render at its next loop step or lookup.
        """
        context = {"secrets": {name: value.template_view() for name, value in secrets.items()}}
        limits = Budget(self.cfg.max_size, time.monotonic() + RENDER_DEADLINE, stop)
        try:
            return render_bounded(lambda: self._template.generate(context), limits)
        except TemplateLimit as exc:  # our own bound: the message holds no value
            line = self._failing_line(exc)
            at = f" line {line}" if line is not None else ""
            raise RenderError(f"{self._where()}{at}: {exc}") from None
        except Exception as exc:  # any failure inside a template is a render error
            line = self._failing_line(exc)
            at = f" line {line}" if line is not None else ""
            reason = _scrub(f"{type(exc).__name__}: {exc}", secrets.values())
            raise RenderError(f"{self._where()}{at}: {reason}") from None

    def _failing_line(self, exc: BaseException) -> int | None:
        # Jinja rewrites tracebacks so template frames carry the template's filename/line
        frames = traceback.extract_tb(exc.__traceback__)
        lines = [f.lineno for f in frames if f.filename == self._filename]
        return lines[-1] if lines else None


def _read_source(cfg: TemplateConfig | EnvTemplateConfig) -> str:
    if cfg.contents is not None:
        return cfg.contents
    if cfg.source is None:
        raise RenderError(f"template {cfg.name}: needs contents or source")
    try:
        return cfg.source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise RenderError(
            f"template {cfg.name}: cannot read source {cfg.source}: {reason}"
        ) from None


def _environment(*, strict: bool) -> BoundedEnvironment:
    env = BoundedEnvironment(
        undefined=jinja2.StrictUndefined if strict else jinja2.ChainableUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    return env


# --------------------------------------------------------------------------- scrubbing


def _secret_strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("utf-8", "replace")
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _secret_strings(v)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            yield from _secret_strings(v)
    elif value is not None and not isinstance(value, bool):
        yield str(value)


def _scrub(message: str, secrets: Iterable[SecretValue]) -> str:
    """Remove every secret field value (and its repr) from an error message."""
    values = {s for v in secrets for s in _secret_strings(v.data) if s}
    forms = {form for s in values for form in (s, repr(s)[1:-1])}
    for form in sorted(forms, key=len, reverse=True):
        if form not in message:
            continue
        if len(form) < _MIN_SCRUB_LEN:
            return "the error message was hidden because it may contain a secret value"
        message = message.replace(form, _REDACTED)
    return message


# --------------------------------------------------------------------------- secret references


def _referenced_secrets(ast: nodes.Template) -> tuple[frozenset[str], bool]:
    """Secrets named statically as ``secrets.x`` or ``secrets["x"]``; and whether any other
    use of ``secrets`` (a variable index, a loop, passing it whole) makes that set incomplete."""
    names: set[str] = set()
    direct: set[int] = set()  # ids of Name nodes accounted for by a static lookup
    # secrets.items() / secrets.get(x) are method calls, not secret names
    called = {id(call.node) for call in ast.find_all(nodes.Call)}
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, nodes.Getattr | nodes.Getitem)
        target = node.node
        if not (isinstance(target, nodes.Name) and target.name == "secrets"):
            continue
        if id(node) in called:
            continue
        if isinstance(node, nodes.Getattr):
            names.add(node.attr)
            direct.add(id(target))
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            names.add(node.arg.value)
            direct.add(id(target))
    dynamic = any(
        n.name == "secrets" and n.ctx == "load" and id(n) not in direct
        for n in ast.find_all(nodes.Name)
    )
    return frozenset(names), dynamic


# --------------------------------------------------------------------------- filters
# Filter errors are ValueError/TypeError with messages that never quote the value.


def _text(value: object, what: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"{what} must be a string, got {type(value).__name__}")


def tojson(value: object, indent: int | None = None) -> str:
    """JSON with sorted keys, so that equal data always renders to equal bytes."""
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(value, sort_keys=True, indent=indent, separators=separators)


def shell_quote(value: object) -> str:
    """One POSIX shell word: always single-quoted, ``'`` written as ``'\\''``."""
    return "'" + _text(value, "shell_quote input").replace("'", "'\\''") + "'"


_ENV_ESCAPES = {"\\": "\\\\", '"': '\\"', "$": "\\$", "`": "\\`", "\n": "\\n", "\r": "\\r"}


def env_quote(value: object) -> str:
    """A double-quoted dotenv value that always stays on one line (no injected keys):
    backslash, ``"``, ``$`` and backquote are escaped, line breaks written as ``\\n``.
    dotenv loaders (docker compose, python-dotenv, node) and ``sh`` read it back exactly;
    ``sh`` keeps a ``\\n`` literally, so multi-line values suit dotenv loaders only."""
    text = _text(value, "env_quote input")
    if "\0" in text:
        raise ValueError("env_quote input contains a NUL byte")
    return '"' + "".join(_ENV_ESCAPES.get(c, c) for c in text) + '"'


def _credentials(value: object, user: object, password: object, what: str) -> tuple[str, str]:
    """(user, password) from a secret view (``username``/``user``, ``password``) or overrides."""
    view: Mapping[str, Any] = value if isinstance(value, Mapping) else {}
    if user is None:
        user = view.get("username", view.get("user"))
    if password is None:
        password = view.get("password")
    if user is None or password is None:
        raise ValueError(f"{what} needs a secret with username and password fields")
    return _text(user, f"{what} user"), _text(password, f"{what} password")


def _pgpass_field(value: object, what: str) -> str:
    text = _text(value, what)
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} contains a line break, which .pgpass cannot hold")
    return text.replace("\\", "\\\\").replace(":", "\\:")


def pgpass(
    value: object,
    host: object = "*",
    port: object = "*",
    database: object = "*",
    user: object = None,
    password: object = None,
) -> str:
    """A ``.pgpass`` line ``host:port:database:user:password`` (no newline):
    ``{{ secrets.db | pgpass(host="db", port=5432, database="app") }}``."""
    u, p = _credentials(value, user, password, "pgpass")
    fields = [(host, "host"), (port, "port"), (database, "database"), (u, "user"), (p, "password")]
    return ":".join(_pgpass_field(v, f"pgpass {what}") for v, what in fields)


_LIBPQ_BARE = re.compile(r"[A-Za-z0-9_.,/@+-]+")


def _libpq_value(value: object, what: str) -> str:
    text = _text(value, what)
    if _LIBPQ_BARE.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def libpq_dsn(
    value: object,
    host: object = None,
    port: object = None,
    dbname: object = None,
    user: object = None,
    password: object = None,
    **options: object,
) -> str:
    """A keyword/value connection string, values quoted as libpq requires:
    ``{{ secrets.db | libpq_dsn(host="db", dbname="app", sslmode="require") }}``."""
    u, p = _credentials(value, user, password, "libpq_dsn")
    pairs: list[tuple[str, object]] = [("host", host), ("port", port), ("dbname", dbname)]
    pairs += [("user", u), ("password", p)]
    pairs += sorted(options.items())
    return " ".join(
        f"{key}={_libpq_value(v, f'libpq_dsn {key}')}" for key, v in pairs if v is not None
    )


def pg_uri(
    value: object,
    host: object = "localhost",
    port: object = None,
    database: object = None,
    user: object = None,
    password: object = None,
    **params: object,
) -> str:
    """A ``postgresql://user:password@host:port/database?k=v`` URI, percent-encoded."""
    u, p = _credentials(value, user, password, "pg_uri")
    h = _text(host, "pg_uri host")
    netloc = f"{quote(u, safe='')}:{quote(p, safe='')}@"
    netloc += f"[{h}]" if ":" in h else quote(h, safe="")
    if port is not None:
        netloc += f":{_text(port, 'pg_uri port')}"
    path = "/" + quote(_text(database, "pg_uri database"), safe="") if database is not None else ""
    query = "?" + urlencode(sorted((k, _text(v, k)) for k, v in params.items())) if params else ""
    return f"postgresql://{netloc}{path}{query}"


def b64encode(value: object) -> str:
    data = value if isinstance(value, bytes) else _text(value, "b64encode input").encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def b64decode(value: object) -> str:
    try:
        raw = base64.b64decode(_text(value, "b64decode input"), validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("b64decode input is not base64 of UTF-8 text") from None


FILTERS: dict[str, Any] = {
    "tojson": tojson,
    "shell_quote": shell_quote,
    "env_quote": env_quote,
    "pgpass": pgpass,
    "libpq_dsn": libpq_dsn,
    "pg_uri": pg_uri,
    "b64encode": b64encode,
    "b64decode": b64decode,
}
