"""Vault Agent templates (Go ``text/template`` with consul-template functions) -> Jinja.

Only the common forms are translated, each to Jinja that renders the same bytes:

- ``{{ with secret "PATH" ["k=v" ...] }} ... {{ end }}`` (and ``pkiCert``): the block's
  text, with ``.Data.<field>`` (``.Data.data.<field>`` for KV v2) as ``secrets["name"]``;
- ``{{ range $k, $v := .Data[.data] }} ... {{ end }}`` in key order, as Go ranges a map;
- ``printf`` with ``%s``, ``%v``, ``%d``; ``index``; the functions ``toJSON``,
  ``toJSONPretty``, ``base64Encode``, ``base64Decode``, ``toUpper``, ``toLower``,
  ``trimSpace``; ``{{- ``/`` -}}`` trim markers and ``{{/* comments */}}``.

Everything else raises :class:`TranslationError` naming the construct, so a template is
never translated into something that renders different bytes. Trim markers are applied
here, with Go's rules, so the Jinja output carries none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import SecretKind


class TranslationError(ValueError):
    """A construct this translator does not map; the message names it."""


# (path, params) -> (the agent's secret name, its kind); may raise TranslationError
Resolve = Callable[[str, dict[str, str]], tuple[str, SecretKind]]

_TRIM = " \t\r\n"
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\\n]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    | (?P<decl>:=)
    | (?P<punct>[|,()])
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_FILTERS = {
    "toJSON": "tojson",
    "toJSONPretty": "tojson(2)",
    "base64Encode": "b64encode",
    "base64Decode": "b64decode",
    "toUpper": "upper",
    "toLower": "lower",
    "trimSpace": "trim",
}
_PKI_FIELDS = {"Cert": "certificate", "Key": "private_key", "CA": "issuing_ca"}
_PRINTF_VERB = re.compile(r"%(.)")


@dataclass
class _Token:
    kind: str
    text: str


@dataclass
class _Block:
    kind: str  # "with" | "range"
    secret: str | None = None
    secret_kind: SecretKind | None = None
    kv2: bool = False
    pki: bool = False
    variables: tuple[str, ...] = ()


@dataclass
class _Scope:
    blocks: list[_Block] = field(default_factory=list)

    def secret(self) -> _Block | None:
        for block in reversed(self.blocks):
            if block.kind == "with":
                return block
        return None

    def variables(self) -> set[str]:
        return {v for b in self.blocks for v in b.variables}


def split_actions(text: str) -> list[tuple[str, str | None, bool, bool]]:
    """Go's lexing of delimiters: ``[(text_before, action_or_None, trim_left, trim_right)]``;
    the last item's action is None. Raises TranslationError on an unclosed action."""
    out: list[tuple[str, str | None, bool, bool]] = []
    pos = 0
    while True:
        start = text.find("{{", pos)
        if start < 0:
            out.append((text[pos:], None, False, False))
            return out
        body_start = start + 2
        trim_left = text.startswith("- ", body_start) or text.startswith("-\t", body_start)
        trim_left = trim_left or text.startswith("-\n", body_start)
        if trim_left:
            body_start += 2
        end = _find_close(text, body_start)
        trim_right = end >= 2 and text[end - 1] == "-" and text[end - 2] in _TRIM
        body_end = end - 2 if trim_right else end
        out.append((text[pos:start], text[body_start:body_end].strip(), trim_left, trim_right))
        pos = end + 2


def _find_close(text: str, pos: int) -> int:
    """Index of the ``}}`` ending the action at ``pos``, skipping strings and comments."""
    if text.startswith("/*", pos):
        end = text.find("*/", pos + 2)
        close = text.find("}}", end) if end >= 0 else -1
        if close < 0:
            raise TranslationError("an unclosed comment {{/* ...")
        return close
    i, quote = pos, ""
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in '"`':
            quote = c
        elif text.startswith("}}", i):
            return i
        i += 1
    raise TranslationError("an unclosed action {{ ... (no }})")


def _tokens(action: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(action):
        if action[pos:].strip() == "":
            break
        match = _TOKEN.match(action, pos)
        if match is None or match.end() == pos:
            raise TranslationError(f"{{{{ {action} }}}}: cannot read {action[pos:].strip()!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append(_Token(kind, match.group(kind)))
        pos = match.end()
    return tokens


def _go_string(token: _Token) -> str:
    if token.kind == "raw":
        return token.text[1:-1]
    try:
        value = json.loads(token.text)  # Go's common escapes are JSON's
    except ValueError:
        raise TranslationError(f"the string {token.text} uses an escape JSON lacks") from None
    assert isinstance(value, str)
    return value


def _jinja_string(value: str) -> str:
    return json.dumps(value)


def _subscript(expr: str, keys: list[str]) -> str:
    # subscripts, never attributes: a field named "items" must not find dict.items
    return expr + "".join(f"[{_jinja_string(k)}]" for k in keys)


def fields_expression(secret: str) -> str:
    """The secret's fields as a dict without the ``lease`` metadata, key-sorted."""
    return (
        f'dict(secrets[{_jinja_string(secret)}] | dictsort(true) | rejectattr("0", "eq", "lease"))'
    )


class _Translator:
    def __init__(self, resolve: Resolve) -> None:
        self.resolve = resolve
        self.scope = _Scope()

    # ---------------------------------------------------------------- operands

    def _secret_block(self, construct: str) -> _Block:
        block = self.scope.secret()
        if block is None or block.secret is None:
            raise TranslationError(f"{construct} outside a {{{{ with secret ... }}}} block")
        return block

    def _field(self, text: str) -> str:
        if text == ".":
            raise TranslationError("{{ . }} (the whole secret) is not translated")
        if self.scope.blocks and self.scope.blocks[-1].kind == "range":
            raise TranslationError(f"{text} inside range (dot is the element there: use $value)")
        parts = text.lstrip(".").split(".")
        block = self._secret_block(text)
        assert block.secret is not None
        name = _jinja_string(block.secret)
        if block.pki:
            if len(parts) != 1 or parts[0] not in _PKI_FIELDS:
                raise TranslationError(f"{text} of pkiCert (use .Cert, .Key or .CA)")
            return f"secrets[{name}][{_jinja_string(_PKI_FIELDS[parts[0]])}]"
        if parts[0] != "Data":
            raise TranslationError(f"{text} (only .Data of a secret is translated)")
        rest = parts[1:]
        if block.kv2:
            if not rest:
                raise TranslationError(f"{text} of a KV v2 secret (use .Data.data)")
            if rest[0] != "data":
                raise TranslationError(f"{text} (KV v2 metadata is not available)")
            rest = rest[1:]
        if not rest:
            return fields_expression(block.secret)
        return _subscript(f"secrets[{name}]", rest)

    def _variable(self, text: str) -> str:
        name, *rest = text[1:].split(".")
        if name not in self.scope.variables():
            raise TranslationError(f"the variable {text} (only range variables are translated)")
        return _subscript(f"v_{name}", rest)

    def _operand(self, token: _Token) -> str:
        if token.kind == "field":
            return self._field(token.text)
        if token.kind == "var":
            return self._variable(token.text)
        if token.kind in ("str", "raw"):
            return _jinja_string(_go_string(token))
        if token.kind == "num":
            return token.text
        raise TranslationError(f"{token.text!r} as a value")

    # ---------------------------------------------------------------- pipelines

    def _command(self, tokens: list[_Token], piped: str | None) -> str:
        head = tokens[0]
        if head.kind != "ident":
            if len(tokens) != 1 or piped is not None:
                raise TranslationError(f"{' '.join(t.text for t in tokens)} (a call on a value)")
            return self._operand(head)
        args = [self._operand(t) for t in tokens[1:]]
        if piped is not None:
            args.append(piped)
        name = head.text
        if name in _FILTERS:
            if len(args) != 1:
                raise TranslationError(f"{name} with {len(args)} arguments")
            return f"({args[0]} | {_FILTERS[name]})"
        if name == "printf":
            if not args or tokens[1].kind not in ("str", "raw"):
                raise TranslationError("printf without a literal format string")
            fmt = _printf_format(_go_string(tokens[1]))
            rest = ", ".join(args[1:])
            return f"({_jinja_string(fmt)} | format({rest}))"
        if name == "index":
            if len(args) < 2 or any(t.kind not in ("str", "raw") for t in tokens[2:]):
                raise TranslationError("index with keys that are not string literals")
            return _subscript(args[0], [_go_string(t) for t in tokens[2:]])
        raise TranslationError(f"the function {name}")

    def _pipeline(self, tokens: list[_Token]) -> str:
        if any(t.kind == "punct" and t.text in "()" for t in tokens):
            raise TranslationError("parenthesized expressions")
        if any(t.kind == "decl" for t in tokens):
            raise TranslationError("variable declarations outside range")
        commands: list[list[_Token]] = [[]]
        for token in tokens:
            if token.kind == "punct" and token.text == "|":
                commands.append([])
            elif token.kind == "punct":
                raise TranslationError(f"{token.text!r} in an expression")
            else:
                commands[-1].append(token)
        if any(not c for c in commands):
            raise TranslationError("an empty command in a pipeline")
        value: str | None = None
        for command in commands:
            value = self._command(command, value)
        assert value is not None
        return value

    # ---------------------------------------------------------------- actions

    def action(self, action: str) -> str:
        if action.startswith("/*"):
            return ""
        tokens = _tokens(action)
        if not tokens:
            raise TranslationError("an empty action {{ }}")
        head = tokens[0].text if tokens[0].kind == "ident" else ""
        if head == "with":
            return self._with(tokens[1:])
        if head == "range":
            return self._range(tokens[1:])
        if head == "end":
            return self._end()
        if head in ("if", "else", "template", "define", "block", "break", "continue"):
            raise TranslationError(f"{{{{ {head} }}}}")
        return "{{ " + self._pipeline(tokens) + " }}"

    def _with(self, tokens: list[_Token]) -> str:
        if len(tokens) < 2 or tokens[0].text not in ("secret", "pkiCert"):
            raise TranslationError('with other than {{ with secret "PATH" }}')
        if tokens[1].kind not in ("str", "raw"):
            raise TranslationError("with secret and a path that is not a string literal")
        if any(t.kind not in ("str", "raw") for t in tokens[2:]):
            raise TranslationError("with secret and arguments that are not string literals")
        path = _go_string(tokens[1])
        params: dict[str, str] = {}
        for token in tokens[2:]:
            key, sep, value = _go_string(token).partition("=")
            if not sep or not key:
                raise TranslationError(f'the secret argument {token.text} (use "key=value")')
            params[key] = value
        name, kind = self.resolve(path, params)
        pki = tokens[0].text == "pkiCert"
        if pki and kind != "pki":
            raise TranslationError(f'pkiCert "{path}" is not a <mount>/issue/<role> path')
        kv2 = kind == "kv" and re.match(r"[^/]+/data/", path.lstrip("/")) is not None
        self.scope.blocks.append(_Block("with", name, kind, kv2=kv2, pki=pki))
        return ""

    def _range(self, tokens: list[_Token]) -> str:
        texts = [t.text for t in tokens]
        if len(texts) >= 5 and texts[1] == "," and texts[3] == ":=":
            names, source = [texts[0], texts[2]], tokens[4:]
        elif len(texts) >= 3 and texts[1] == ":=":
            names, source = ["", texts[0]], tokens[2:]
        else:
            raise TranslationError("range without $key, $value := (or $value :=)")
        if any(not n.startswith("$") or "." in n for n in names if n):
            raise TranslationError("range variables that are not plain $names")
        if len(source) != 1 or source[0].kind != "field":
            raise TranslationError("range over anything but .Data or .Data.data")
        iterable = self._field(source[0].text)
        if not iterable.startswith("dict("):
            raise TranslationError(f"range over {source[0].text} (only the whole secret)")
        variables = tuple(n[1:] for n in names if n)
        if any(not v for v in variables):
            raise TranslationError("range over $ (the root)")
        key = f"v_{variables[0]}" if names[0] else "_"
        value = f"v_{variables[-1]}"
        self.scope.blocks.append(_Block("range", variables=variables))
        return "{% for " + key + ", " + value + " in " + iterable + ".items() %}"

    def _end(self) -> str:
        if not self.scope.blocks:
            raise TranslationError("{{ end }} without an open block")
        block = self.scope.blocks.pop()
        return "{% endfor %}" if block.kind == "range" else ""


def _printf_format(fmt: str) -> str:
    """Go verbs -> Python %-format; only %s, %v, %d and %%."""

    def verb(match: re.Match[str]) -> str:
        mapped = {"s": "%s", "v": "%s", "d": "%d", "%": "%%"}.get(match.group(1))
        if mapped is None:
            raise TranslationError(f"printf verb %{match.group(1)} (only %s, %v, %d)")
        return mapped

    return _PRINTF_VERB.sub(verb, fmt)


def _jinja_text(text: str) -> str:
    """Literal text, protected from Jinja where it holds (or ends in) a tag opener."""
    if not text:
        return ""
    if "{%" in text or "{#" in text or "{{" in text or text.endswith("{"):
        if "endraw" in text:
            raise TranslationError("text containing endraw")
        return "{% raw %}" + text + "{% endraw %}"
    return text


def translate(template: str, resolve: Resolve) -> str:
    """The Jinja equivalent of a Vault Agent template. Raises TranslationError."""
    pieces = split_actions(template)
    translator = _Translator(resolve)
    out: list[str] = []
    texts = [text for text, _, _, _ in pieces]
    for i, (_, _, trim_left, trim_right) in enumerate(pieces):
        if trim_left:
            texts[i] = texts[i].rstrip(_TRIM)
        if trim_right and i + 1 < len(texts):
            texts[i + 1] = texts[i + 1].lstrip(_TRIM)
    for i, (_, action, _, _) in enumerate(pieces):
        out.append(_jinja_text(texts[i]))
        if action is not None:
            out.append(translator.action(action))
    if translator.scope.blocks:
        raise TranslationError(
            f"{{{{ {translator.scope.blocks[-1].kind} }}}} without {{{{ end }}}}"
        )
    return "".join(out)
