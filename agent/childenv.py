"""The environment of every process the agent starts: the exec child, notify commands
and rotation commands. One function computes it; every place that spawns calls it.

By default a child gets the agent's environment minus our credentials: the Vault/OpenBao
tokens and AppRole halves (``VAULT_TOKEN``, ``BAO_TOKEN``, ``*_SECRET_ID``, ...) and
every name the config lists under ``sensitive_env``. Per child, ``env: {pass: [...],
set: {...}}`` lets the operator choose: ``pass`` inherits only the names listed (a
sensitive name only when listed literally, never through a pattern), ``set`` adds
literal values. Nomad's ``env.denylist`` filters the host's tokens the same way.

This module is a leaf (no agent imports) so that ``agent/config.py`` and
``agent/rotate/config.py`` both read ``env:`` with it.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.configkit import Problems, as_str, show_value

# Name patterns (case-insensitive, shell globs) that never reach a child unless asked.
DEFAULT_SENSITIVE: tuple[str, ...] = (
    "VAULT_TOKEN",
    "BAO_TOKEN",
    "VAULT_*TOKEN*",  # e.g. VAULT_AGENT_TOKEN, VAULT_WRAPPED_TOKEN
    "BAO_*TOKEN*",
    "*_SECRET_ID",  # AppRole: VAULT_SECRET_ID, BAO_SECRET_ID, APPROLE_SECRET_ID
    "*_ROLE_ID",  # its other half
    "VAULT_LICENSE*",
    "BAO_LICENSE*",
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATTERN = re.compile(r"[A-Za-z0-9_*?\[\]!-]+")


@dataclass(frozen=True)
class EnvPolicy:
    """What one child inherits (``passed``: None = everything not sensitive) and gets set."""

    passed: tuple[str, ...] | None = None
    set: Mapping[str, str] = field(default_factory=dict, repr=False)
    sensitive: tuple[str, ...] = DEFAULT_SENSITIVE

    def is_sensitive(self, name: str) -> bool:
        upper = name.upper()
        return any(fnmatch.fnmatchcase(upper, p.upper()) for p in self.sensitive)

    def inherits(self, name: str) -> bool:
        if self.passed is None:
            return not self.is_sensitive(name)
        if name in self.passed:  # named literally: the operator's explicit choice
            return True
        matched = any(fnmatch.fnmatchcase(name, p) for p in self.passed)
        return matched and not self.is_sensitive(name)


def child_environment(policy: EnvPolicy, parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child under ``policy``, from ``parent`` (default: ours)."""
    source = os.environ if parent is None else parent
    env = {name: value for name, value in source.items() if policy.inherits(name)}
    env.update(policy.set)
    return env


# --------------------------------------------------------------------------- config


def parse_sensitive(problems: Problems, path: str, raw: object) -> tuple[str, ...]:
    """The top-level ``sensitive_env`` list, added to :data:`DEFAULT_SENSITIVE`."""
    if raw is None:
        return DEFAULT_SENSITIVE
    names = _patterns(problems, path, raw)
    return DEFAULT_SENSITIVE + tuple(n for n in names if n not in DEFAULT_SENSITIVE)


def parse_env(
    problems: Problems,
    path: str,
    raw: object,
    sensitive: tuple[str, ...] = DEFAULT_SENSITIVE,
    *,
    legacy: bool = False,
) -> EnvPolicy:
    """``env: {pass: [NAME, GLOB...], set: {NAME: VALUE}}``.

    With ``legacy`` (``exec.env``), a flat ``{NAME: VALUE}`` mapping is also accepted:
    it is the older spelling of ``set`` and keeps inheriting the (filtered) environment.
    """
    if raw is None:
        return EnvPolicy(sensitive=sensitive)
    shape = "{pass: [NAME, ...], set: {NAME: VALUE}}"
    if not isinstance(raw, Mapping):
        problems.add(path, f"must be {shape}, got {type(raw).__name__}")
        return EnvPolicy(sensitive=sensitive)
    structured = isinstance(raw.get("pass"), list) or isinstance(raw.get("set"), Mapping)
    if legacy and not structured:
        return EnvPolicy(set=parse_values(problems, path, raw), sensitive=sensitive)
    for key in raw:
        if key not in ("pass", "set"):
            problems.add(f"{path}.{key}", f"unknown key (expected pass or set: {shape})")
    passed = None
    if raw.get("pass") is not None:
        passed = _patterns(problems, f"{path}.pass", raw["pass"])
    values: Mapping[str, str] = {}
    if raw.get("set") is not None:
        if isinstance(raw["set"], Mapping):
            values = parse_values(problems, f"{path}.set", raw["set"])
        else:
            problems.add(f"{path}.set", f"{show_value(raw['set'])} is not a mapping NAME: VALUE")
    return EnvPolicy(passed=passed, set=values, sensitive=sensitive)


def _patterns(problems: Problems, path: str, raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list):
        problems.add(path, f"{show_value(raw)} is not a list of variable names")
        return ()
    out = []
    for index, item in enumerate(raw):
        if not isinstance(item, str) or not _PATTERN.fullmatch(item):
            problems.add(f"{path}[{index}]", f"{show_value(item)} is not a variable name or glob")
            continue
        out.append(item)
    return tuple(out)


def parse_values(problems: Problems, path: str, raw: Mapping[object, object]) -> dict[str, str]:
    """``{NAME: VALUE}``: names checked, values strings and never echoed."""
    out = {}
    for name, value in raw.items():
        key = str(name)
        if not _NAME.fullmatch(key):
            problems.add(f"{path}.{key}", "is not a variable name (letters, digits, _)")
            continue
        try:
            out[key] = as_str(value)
        except ValueError:  # never echo the value: it may be a credential of the app
            problems.add(f"{path}.{key}", "is not a string")
    return out
