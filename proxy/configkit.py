"""The one config reader kit: key paths, problem collection and value converters.

Every config section of both packages (``agent/config.py``, ``agent/rotate/config.py``,
``proxy/config.py``) is read with these pieces, so a problem always reads the same way:
``<key path>: <what is wrong with the value seen>``. It lives in ``proxy`` because the
proxy must stand alone (it never imports ``agent``) while the agent imports the proxy.
This module imports nothing of either package.
"""

from __future__ import annotations

import grp
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def show_value(value: object) -> str:
    """A bad value as it appears in an error: strings quoted, long ones shortened."""
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Problems:
    """Collects ``key.path: message`` lines; a config is valid when none were added."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)

    def __bool__(self) -> bool:
        return bool(self.items)


class Section:
    """One mapping of the config: reads keys with converters, recording each problem
    under its key path. ``known`` (when given) rejects keys it does not list."""

    def __init__(
        self,
        problems: Problems,
        path: str,
        raw: object,
        known: tuple[str, ...] | None = None,
        *,
        base_dir: Path | None = None,
    ) -> None:
        self.problems, self.path = problems, path
        self.base_dir = base_dir or Path.cwd()
        self.raw: Mapping[str, Any] = {}
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            problems.add(path, f"must be a mapping, got {type(raw).__name__}")
            return
        self.raw = raw
        if known is not None:
            for key in raw:
                if key not in known:
                    problems.add(
                        self.key(str(key)), f"unknown key (expected one of: {', '.join(known)})"
                    )

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def get(self, name: str, convert: Callable[[Any], T], default: T, *, secret: bool = False) -> T:
        """The converted value, or ``default`` when absent (or null) or invalid."""
        if self.raw.get(name) is None:
            return default
        try:
            return convert(self.raw[name])
        except (ValueError, TypeError) as exc:
            self.problems.add(self.key(name), "(value hidden)" if secret else str(exc))
            return default

    def required(self, name: str, convert: Callable[[Any], T], default: T, *, why: str = "") -> T:
        if self.raw.get(name) in (None, ""):
            self.problems.add(self.key(name), f"is required{' ' + why if why else ''}")
            return default
        return self.get(name, convert, default)

    def path_value(self, name: str, default: Path | None = None) -> Path | None:
        """A file path; relative paths are relative to the config file's directory."""
        text = self.get(name, as_str, "")
        if not text:
            return default
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def sub(self, name: str, known: tuple[str, ...] | None = None) -> Section:
        return Section(
            self.problems, self.key(name), self.raw.get(name), known, base_dir=self.base_dir
        )


# --------------------------------------------------------------------------- converters
# Each takes the raw YAML value and returns the typed one, or raises ValueError whose
# message shows the value; Section.get prefixes the key path.


def as_str(value: object) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"{show_value(value)} is not a string")
    return str(value)


def as_nonempty_str(value: object) -> str:
    text = as_str(value)
    if not text:
        raise ValueError('"" is empty')
    return text


def as_http_url(value: object) -> str:
    """An ``http://`` or ``https://`` URL with a host, without a trailing slash."""
    text = as_nonempty_str(value)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"{show_value(text)} is not an http:// or https:// URL")
    return text.rstrip("/")


def as_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{show_value(value)} is not true or false")
    return value


def as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{show_value(value)} is not an integer")
    return value


def as_positive_int(value: object) -> int:
    number = as_int(value)
    if number < 1:
        raise ValueError(f"{show_value(value)} must be at least 1")
    return number


def as_port(value: object) -> int:
    number = as_int(value)
    if not 0 < number < 65536:
        raise ValueError(f"{number} is not a port")
    return number


def as_fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"{show_value(value)} is not a fraction between 0 and 1")
    return float(value)


def as_command(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not value:
        raise ValueError(f"{show_value(value)} must be a non-empty list of strings (no shell)")
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{show_value(value)} must be a list of strings")
    return tuple(value)


def as_str_map(value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{show_value(value)} is not a mapping of strings")
    return {str(k): as_str(v) for k, v in value.items()}


def as_mapping(value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{show_value(value)} is not a mapping")
    return {str(k): v for k, v in value.items()}


def as_int_list(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{show_value(value)} is not a list of integers")
    return tuple(value)


def as_str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{show_value(value)} is not a list of non-empty strings")
    return tuple(value)


def parse_mode(value: object) -> int:
    """A file mode: ``"0640"``, ``"640"`` or YAML's octal ``0640`` (read as an int)."""
    text = str(value) if not isinstance(value, int) else f"{value:o}"
    if not re.fullmatch(r"0?[0-7]{3,4}", text):
        raise ValueError(f"{show_value(value)} is not an octal mode")
    return int(text, 8)


def as_group(value: object) -> int:
    """A group name or gid -> the gid (resolved now, so a typo is a config error)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    try:
        return grp.getgrnam(as_nonempty_str(value)).gr_gid
    except KeyError:
        raise ValueError(f"{show_value(value)} is not a group on this system") from None


def choice(options: tuple[T, ...]) -> Callable[[object], T]:
    """A converter accepting exactly one of ``options`` (typed: pass a Literal's args)."""

    def check(value: object) -> T:
        for option in options:
            if value == option:
                return option
        raise ValueError(f"{show_value(value)} is not one of {', '.join(map(str, options))}")

    return check


def parse_duration(value: object) -> float:
    """``"200ms"``, ``"30s"``, ``"1m30s"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{show_value(value)} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{show_value(value)} is negative")
        return float(value)
    if isinstance(value, str) and value.strip():
        parts = _DURATION_RE.findall(value.strip())
        if parts and "".join(n + u for n, u in parts) == value.strip():
            return sum(float(n) * _UNITS[u] for n, u in parts)
    raise ValueError(f"{show_value(value)} is not a duration (use 200ms, 30s, 5m, 1h)")


def parse_listen(value: object) -> tuple[str, int]:
    """``host:port``, ``[::1]:port`` or ``:port`` (loopback) -> (host, port); port 0 means
    any free port."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError(f"{show_value(value)} is not host:port")
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{show_value(value)} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)
