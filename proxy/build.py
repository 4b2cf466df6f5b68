"""Which build of the proxy's hot modules runs: compiled with mypyc, or pure Python.

``COMPILED`` is the one list of modules that ``setup.py`` compiles with mypyc when a C
compiler works. The compiled modules are built from the same typed source and sit next
to it (``messages.py`` and ``messages.cpython-311-*.so``); Python's importer prefers
the extension module. ``CREDSIDECAR_PURE_PYTHON=1`` in the environment makes the
package import the ``.py`` sources instead (``proxy/__init__`` calls :func:`install`
before any of these modules can be imported), which is how ``make test`` runs the
suite against both builds from one tree and one install.

Stdlib only, and nothing from ``proxy``: ``setup.py`` loads this file by its path.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

# Not proxy.protocol.errors: compiled exception classes lose their class-level
# ``sqlstate`` default and cannot be subclassed by Python code; raising is not hot.
COMPILED = (
    "proxy.protocol.messages",
    "proxy.protocol.states",
    "proxy.protocol.events",
    "proxy.protocol.frontend",
    "proxy.protocol.backend",
    "proxy.protocol.statements",
    "proxy.protocol.parameters",
    "proxy.protocol.pipeline",
    "proxy.protocol.auth",
    "proxy.transport",
    "proxy.session",
    "proxy.pool",
    "proxy.upstream",
    "proxy.listener",
    "proxy.login",
    "proxy.migrate",
    "proxy.cancel",
    "proxy.server",
    "proxy.credentials",
    "proxy.counts",
    "proxy.deadlines",
)
# mypyc puts the code of all of them in one shared library; the per-module extensions
# are small shims that load it. A dotted name keeps it inside the package (importable
# through an editable install's finder, which maps only the packages).
SHARED_LIBRARY = "proxy._native"

PURE_ENV = "CREDSIDECAR_PURE_PYTHON"


class _SourceFinder:
    """Finds the listed modules' ``.py`` sources, never their compiled extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in COMPILED or path is None:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, leaf + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def install() -> None:
    """Import the pure-Python sources from now on when ``CREDSIDECAR_PURE_PYTHON`` says so."""
    if pure_requested() and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())


def is_compiled(module: ModuleType) -> bool:
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def compiled_modules() -> list[str]:
    """The listed modules that were loaded as compiled extension modules (imports them)."""
    return [name for name in COMPILED if is_compiled(importlib.import_module(name))]


def mode() -> str:
    """``compiled`` (every listed module), ``pure`` (none) or ``partial`` (a broken install)."""
    count = len(compiled_modules())
    return "compiled" if count == len(COMPILED) else "pure" if count == 0 else "partial"


def describe() -> str:
    """One line for ``credsidecar version``: the build and why."""
    compiled = compiled_modules()
    if len(compiled) == len(COMPILED):
        return f"compiled with mypyc: {', '.join(compiled)}"
    if compiled:
        pure = [name for name in COMPILED if name not in compiled]
        return f"partial (a broken install; reinstall): pure Python: {', '.join(pure)}"
    if pure_requested():
        return f"pure Python ({PURE_ENV} is set)"
    return "pure Python (not compiled at install: no working C compiler, or mypy missing)"


if __name__ == "__main__":  # the Makefile's list of sources to rebuild from
    print(" ".join(name.replace(".", "/") + ".py" for name in COMPILED))
