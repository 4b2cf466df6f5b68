"""Compiles the proxy's hot modules with mypyc when it can; pure Python when it cannot.

Metadata lives in pyproject.toml; this file only adds the extension modules. The list
is ``COMPILED`` in proxy/build.py. When no C compiler works (``CC=false pip install .``
on purpose), mypy is missing, or the compile fails, the install still succeeds with
the pure-Python modules, and says so; ``credsidecar version`` tells which build runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _build_module() -> Any:
    spec = importlib.util.spec_from_file_location("_credsidecar_build", HERE / "proxy/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"credsidecar setup: {message}", file=sys.stderr)


def _compiler_works() -> bool:
    """Compile a file that includes Python.h with the compiler build_ext would use."""
    from distutils.ccompiler import new_compiler  # setuptools' copy once it is imported
    from distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write("#include <Python.h>\nint probe(void) { return 0; }\n")
        try:
            compiler.compile(
                [source], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]]
            )
        except Exception as exc:  # CompileError, a missing executable, ...
            _say(f"no working C compiler ({type(exc).__name__}: {exc})")
            return False
    return True


def _remove_compiled(keep: frozenset[Path] = frozenset()) -> None:
    """Delete extension modules built in place earlier (an editable install) but not wanted
    now: a module taken off the list, or all of them when this in-place build is pure,
    must not keep running old compiled code in place of its source."""
    for path in (HERE / "proxy").rglob("*" + sysconfig.get_config_var("EXT_SUFFIX")):
        if path not in keep:
            _say(f"removing {path.relative_to(HERE)}: not compiled in this build")
            path.unlink()


def _extensions() -> list[Extension]:
    """Placeholders named like mypyc's extensions; :class:`OptionalBuildExt` fills them in.

    Named up front so the wheel is platform-specific; translated only when build_ext
    runs (a type check and code generation, seconds), not for every metadata hook.
    """
    if not _compiler_works():
        return _pure()
    if importlib.util.find_spec("mypyc") is None:
        _say("mypyc (from mypy) is not installed")
        return _pure()
    build = _build_module()
    names = [*build.COMPILED, build.SHARED_LIBRARY + "__mypyc"]
    return [Extension(name, sources=[]) for name in names]


def _mypycify() -> list[Extension]:
    from mypyc.build import mypycify

    build = _build_module()
    paths = [m.replace(".", "/") + ".py" for m in build.COMPILED]
    return list(mypycify(paths, opt_level="3", group_name=build.SHARED_LIBRARY))


def _pure() -> list[Extension]:
    _say("building the pure-Python modules only")
    return []


class OptionalBuildExt(build_ext):
    """All the extensions or none: a failed compile leaves the pure-Python modules."""

    def finalize_options(self) -> None:
        dist = self.distribution
        if dist.ext_modules and not dist.ext_modules[0].sources:  # still the placeholders
            try:
                dist.ext_modules = _mypycify()
            except (Exception, SystemExit) as exc:  # mypyc exits on a type error
                _say(f"mypyc could not translate the modules ({exc!r}); pure Python")
                dist.ext_modules = []
        super().finalize_options()

    def run(self) -> None:
        if self.inplace:
            _remove_compiled(
                frozenset(HERE / self.get_ext_filename(e.name) for e in self.extensions)
            )
        try:
            super().run()
        except Exception as exc:  # CCompilerError, DistutilsExecError, a linker missing
            _say(f"compiling failed ({exc}); pure Python")
            self._remove_outputs()
            self.extensions = []

    def _remove_outputs(self) -> None:
        # a shim without its shared library must not shadow the .py
        for path in self.get_outputs():
            if os.path.exists(path):
                os.remove(path)
        if self.inplace:
            _remove_compiled()


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
