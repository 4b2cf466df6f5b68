"""Vault answers -> typed results, checked field by field.

Vault is a dependency like any other: an answer can be malformed (a proxy in between,
a plugin bug, an incompatible server). Every field the agent uses is read here, with
its type checked, so a bad answer is a :class:`VaultError` that names the request and
the field (``renew_lease sys/leases/renew: malformed answer: lease_duration should be a
number, got str``), never a ``ValueError`` from deep inside a source. Messages name
types only: the values may be secret.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import VaultError


@dataclass(frozen=True)
class Lease:
    """A dynamic secret: ``database/creds/<role>`` and the like."""

    lease_id: str
    lease_duration: float
    renewable: bool
    data: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Renewal:
    """The answer to ``sys/leases/renew``: how long the lease lives now."""

    lease_duration: float
    renewable: bool


@dataclass(frozen=True)
class Auth:
    """The ``auth`` block of a login or a token renewal."""

    client_token: str = field(repr=False)
    lease_duration: float
    renewable: bool
    accessor: str | None


class Answer:
    """One answer (or a block of it), read field by field; problems name the field path."""

    def __init__(self, operation: str, path: str, raw: object, prefix: str = "") -> None:
        self.where = f"{operation} {path}"
        self.prefix = prefix
        if not isinstance(raw, Mapping):
            raise self._bad(prefix.rstrip(".") or "the answer", "an object", _kind(raw))
        self.raw: Mapping[str, Any] = raw

    def _bad(self, name: str, expected: str, got: str) -> VaultError:
        return VaultError(f"{self.where}: malformed answer: {name} should be {expected}, got {got}")

    def block(self, key: str) -> Answer:
        """A nested object (``data``, ``auth``); missing or not an object is an error."""
        operation, path = self.where.split(" ", 1)
        return Answer(operation, path, self.raw.get(key), f"{self.prefix}{key}.")

    def mapping(self, key: str) -> Mapping[str, Any]:
        return self.block(key).raw

    def number(self, key: str, default: float = 0.0) -> float:
        """A non-negative finite number; missing or null is ``default``."""
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(self.prefix + key, "a number", _kind(value))
        if not math.isfinite(value) or value < 0:
            raise self._bad(self.prefix + key, "a non-negative finite number", "one out of range")
        return float(value)

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(self.prefix + key, "true or false", _kind(value))
        return value

    def string(self, key: str) -> str:
        """A non-empty string (required)."""
        value = self.raw.get(key)
        if not isinstance(value, str) or not value:
            raise self._bad(self.prefix + key, "a non-empty string", _kind(value))
        return value

    def optional_string(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self._bad(self.prefix + key, "a string", _kind(value))
        return value


_KINDS: dict[type, str] = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


def _kind(value: object) -> str:
    """What a value is, for a message: never the value itself (it may be secret)."""
    if value is None:
        return "nothing"
    if value == "":
        return "an empty string"
    return _KINDS.get(type(value), type(value).__name__)


def parse_lease(operation: str, path: str, raw: object) -> Lease:
    answer = Answer(operation, path, raw)
    return Lease(
        lease_id=answer.string("lease_id"),
        lease_duration=answer.number("lease_duration"),
        renewable=answer.boolean("renewable"),
        data=dict(answer.mapping("data")),
    )


def parse_renewal(operation: str, path: str, raw: object) -> Renewal:
    answer = Answer(operation, path, raw)
    return Renewal(
        lease_duration=answer.number("lease_duration"),
        renewable=answer.boolean("renewable"),
    )


def parse_token_lookup(operation: str, path: str, raw: object, token: str) -> Auth:
    """``auth/token/lookup-self``: the token we hold, its TTL and accessor."""
    data = Answer(operation, path, raw).block("data")
    return Auth(
        client_token=token,
        lease_duration=data.number("ttl"),
        renewable=data.boolean("renewable"),
        accessor=data.optional_string("accessor"),
    )


def parse_auth(operation: str, path: str, raw: object) -> Auth:
    auth = Answer(operation, path, raw).block("auth")
    return Auth(
        client_token=auth.string("client_token"),
        lease_duration=auth.number("lease_duration"),
        renewable=auth.boolean("renewable"),
        accessor=auth.optional_string("accessor"),
    )
