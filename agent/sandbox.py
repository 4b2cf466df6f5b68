"""Jinja's sandbox with bounds: output size, amplifying operations, time, and a stop switch.

Jinja's :class:`SandboxedEnvironment` keeps templates away from Python internals,
but not from exhausting the agent: ``{{ "x" * 200000000 }}`` allocates 200 MB in one
operation and a loop 4000 x 4000 over a secret runs for seconds. Templates render in a
thread (see :mod:`agent.pipeline`), under a :class:`Budget`:

* the output is streamed and counted; past ``max_size`` the render stops;
* operations that build a big string from small operands (``*``, ``+``, ``%``
  widths, ``ljust``/``center``/``zfill``/``replace``/``join``/``format``, and the
  ``center``/``indent``/``join``/``replace``/``format`` filters) are checked against
  ``max_size`` *before* they run;
* loops (``range``), attribute lookups and calls count against a deadline and watch
  a stop flag, so a shutdown or a runaway template ends the render promptly.

Every refusal is a :class:`TemplateLimit`, whose message names the bound, never a value.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jinja2 import filters as jinja_filters
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment, safe_range

CHECK_EVERY = 255  # a mask: look at the clock and the stop flag every 256 operations


class TemplateLimit(Exception):
    """A render went past one of its bounds (size, time) or was told to stop."""


class Budget:
    """The bounds of one render, checked from inside the template's own operations."""

    def __init__(self, max_size: int, deadline: float, stop: threading.Event | None = None) -> None:
        self.max_size = max_size
        self.deadline = deadline  # time.monotonic()
        self.stop = stop
        self.ops = 0

    def tick(self) -> None:
        self.ops += 1
        if not self.ops & CHECK_EVERY:
            self.check()

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise TemplateLimit("stopped: the agent is shutting down")
        if time.monotonic() > self.deadline:
            raise TemplateLimit("took too long (a loop that never ends?)")

    def allow(self, size: float, what: str) -> None:
        """Refuse an operation whose result would be ``size`` characters or more."""
        if size > self.max_size:
            raise TemplateLimit(f"{what} would exceed max_size ({self.max_size} bytes)")


class _Current(threading.local):
    budget: Budget | None = None  # the Budget of the render running in this thread


_current = _Current()


def budget() -> Budget:
    found = _current.budget
    if found is None:
        raise TemplateLimit("rendered outside Template.render")
    return found


def _count() -> None:
    """Count one step (a lookup) of the render running in this thread."""
    limits = _current.budget
    if limits is not None:  # None: Jinja folding a constant while compiling
        limits.ops += 1
        if not limits.ops & CHECK_EVERY:
            limits.check()


def render_bounded(chunks: Callable[[], Iterable[str]], limits: Budget) -> bytes:
    """Run ``chunks()`` (Jinja's ``generate``) under ``limits``; the UTF-8 output."""
    _current.budget = limits
    try:
        size, parts = 0, []
        for chunk in chunks():
            data = chunk.encode("utf-8")
            size += len(data)
            if size > limits.max_size:
                raise TemplateLimit(f"output exceeds max_size ({limits.max_size} bytes)")
            parts.append(data)
            limits.tick()
        return b"".join(parts)
    finally:
        _current.budget = None


# --------------------------------------------------------------------------- size estimates


def _len(value: object) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple) else 0


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


_WIDTHS = re.compile(r"\d+")


def _widths(text: object) -> int:
    """The largest number written in a format string (a width or a precision)."""
    if not isinstance(text, str):
        return 0
    return max((int(n) for n in _WIDTHS.findall(text) if len(n) < 20), default=0) + len(text)


def _joined(sep: object, items: object) -> int:
    if not isinstance(items, list | tuple | str):
        return 0
    return _len(sep) * len(items) + sum(_len(i) for i in items)


def _indented(text: object, width: object) -> int:
    prefix = _len(width) if isinstance(width, str) else _int(width)
    return _len(text) + (text.count("\n") + 1) * prefix if isinstance(text, str) else 0


def _replaced(text: object, old: object, new: object) -> int:
    if not isinstance(text, str) or not isinstance(old, str) or not isinstance(new, str):
        return 0
    count = text.count(old) if old else len(text) + 1
    return len(text) + count * max(0, len(new) - len(old))


# what a str method call could produce, from its receiver and arguments
_METHODS: dict[str, Callable[..., float]] = {
    "ljust": lambda s, w=0, *_: max(_len(s), _int(w)),
    "rjust": lambda s, w=0, *_: max(_len(s), _int(w)),
    "center": lambda s, w=0, *_: max(_len(s), _int(w)),
    "zfill": lambda s, w=0, *_: max(_len(s), _int(w)),
    "expandtabs": lambda s, n=8, *_: _len(s) * max(1, _int(n)),
    "replace": lambda s, old="", new="", *_: _replaced(s, old, new),
    "join": lambda s, items=(), *_: _joined(s, items),
    "format": lambda s, *_: _widths(s),
    "format_map": lambda s, *_: _widths(s),
}


def _product(left: object, right: object) -> float:
    if isinstance(right, int) and not isinstance(right, bool):
        return _len(left) * right
    if isinstance(left, int) and not isinstance(left, bool):
        return _len(right) * left
    return 0


def _power_digits(left: object, right: object) -> float:
    if _int(left) and _int(right) > 0 and abs(_int(left)) > 1:
        return _int(right) * math.log10(abs(_int(left)))  # decimal digits of the result
    return 0


_BINOPS: dict[str, Callable[[Any, Any], float]] = {
    "*": _product,
    "+": lambda a, b: _len(a) + _len(b),
    "%": lambda a, b: _widths(a),
    "**": _power_digits,
}


# --------------------------------------------------------------------------- environment


def _bounded_range(*args: int) -> Iterator[int]:
    limits = budget()
    for i in safe_range(*args):
        limits.ops += 1
        if not limits.ops & CHECK_EVERY:
            limits.check()
        yield i


def _checked_filter(
    name: str, estimate: Callable[..., float], original: Callable[..., Any]
) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        budget().allow(estimate(*args, **kwargs), f"the {name} filter")
        return original(*args, **kwargs)

    run.__name__ = original.__name__
    if hasattr(original, "jinja_pass_arg"):  # keep Jinja's pass_eval_context & co.
        run.jinja_pass_arg = original.jinja_pass_arg  # type: ignore[attr-defined]
    return run


def _filter_estimates() -> dict[str, Callable[..., float]]:
    def skip_ctx(fn: Callable[..., float]) -> Callable[..., float]:
        return lambda _ctx, *a, **k: fn(*a, **k)  # filters given the eval context first

    return {
        "center": lambda s, width=80: max(_len(s), _int(width)),
        "indent": lambda s, width=4, *_, **__: _indented(s, width),
        "join": skip_ctx(lambda items, d="", *_, **__: _joined(d, items)),
        "replace": skip_ctx(lambda s, old, new, *_: _replaced(s, old, new)),
        "format": lambda s, *a, **k: _widths(s),
    }


class BoundedEnvironment(SandboxedEnvironment):
    """A :class:`SandboxedEnvironment` whose templates count against a :class:`Budget`."""

    intercepted_binops = frozenset(_BINOPS)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["range"] = _bounded_range
        for name, estimate in _filter_estimates().items():
            self.filters[name] = _checked_filter(name, estimate, jinja_filters.FILTERS[name])

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        limits = budget()
        limits.tick()
        limits.allow(_BINOPS[operator](left, right), f"the {operator!r} operation")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _count()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _count()
        return super().getitem(obj, argument)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        limits = budget()
        limits.tick()
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by Jinja
        receiver = getattr(method, "__self__", None)
        estimate = _METHODS.get(getattr(method, "__name__", ""))
        if isinstance(receiver, str) and estimate is not None:
            limits.allow(estimate(receiver, *args), f"str.{method.__name__}()")
        return super().call(__context, __obj, *args, **kwargs)
