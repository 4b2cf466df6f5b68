"""The two builds of the protocol modules: each run is the build it claims to be.

``make test`` runs the proxy tests twice, with ``CREDSIDECAR_EXPECT_BUILD=compiled``
and with ``CREDSIDECAR_PURE_PYTHON=1 CREDSIDECAR_EXPECT_BUILD=pure``; the first test
here fails when a run silently got the other build (a venv installed without a C
compiler, a switch that stopped working, a stale compiled module).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from proxyhelpers import ProxyFactory

from proxy import build

EXPECTED = os.environ.get("CREDSIDECAR_EXPECT_BUILD")
ROOT = Path(__file__).resolve().parents[2]


def _expected() -> str:
    if EXPECTED is None:
        pytest.skip("CREDSIDECAR_EXPECT_BUILD is not set (make test sets it)")
    assert EXPECTED in ("compiled", "pure"), f"CREDSIDECAR_EXPECT_BUILD={EXPECTED!r}"
    return EXPECTED


def test_this_run_is_the_build_it_claims() -> None:
    expected = _expected()
    assert build.pure_requested() == (expected == "pure")
    for name in build.COMPILED:
        module = importlib.import_module(name)
        loader = module.__loader__
        if expected == "compiled":
            assert isinstance(loader, importlib.machinery.ExtensionFileLoader), (
                f"{name} is not compiled: the venv was installed without a working C "
                "compiler or mypy; reinstall with one (make clean && make)"
            )
        else:
            assert isinstance(loader, importlib.machinery.SourceFileLoader), name
            assert module.__file__ is not None and module.__file__.endswith(".py"), name
    assert build.mode() == expected


def test_compiled_modules_are_not_older_than_their_source() -> None:
    """An in-place build must not run yesterday's code (the Makefile rebuilds first)."""
    if _expected() != "compiled":
        pytest.skip("the pure run reads the sources themselves")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in build.COMPILED:
        source = ROOT / (name.replace(".", "/") + ".py")
        compiled = source.with_name(source.stem + suffix)
        if compiled.exists():  # an editable install; a wheel has no sources to compare
            assert compiled.stat().st_mtime >= source.stat().st_mtime, (
                f"{compiled.name} is older than {source.name}: run make to rebuild"
            )


def _child(code: str, pure: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != build.PURE_ENV}
    if pure:
        env[build.PURE_ENV] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_switch_picks_the_sources_whatever_is_installed() -> None:
    code = "from proxy import build; print(build.mode())"
    assert _child(code, pure=True) == "pure"
    installed = _child(code, pure=False)
    assert installed in ("compiled", "pure")  # never a mix of the two
    if EXPECTED is not None:
        assert installed == "compiled"  # make test's venv is compiled; only the switch differs


def test_version_says_which_build_runs() -> None:
    code = "from agent.cli import main; main(['version'])"
    pure = _child(code, pure=True).splitlines()
    assert pure[-1] == "proxy build: pure Python (CREDSIDECAR_PURE_PYTHON is set)"
    installed = _child("from proxy import build; print(build.mode())", pure=False)
    line = _child(code, pure=False).splitlines()[-1]
    if installed == "compiled":
        assert line == f"proxy build: compiled with mypyc: {', '.join(build.COMPILED)}"
    else:
        assert line.startswith("proxy build: pure Python (not compiled at install")


async def test_startup_log_says_which_build_runs(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credsidecar.proxy")
    await make_proxy()
    started = [r for r in caplog.records if r.getMessage() == "proxy_started"]
    assert len(started) == 1
    assert started[0].build == build.mode()
    if EXPECTED is not None:
        assert started[0].build == EXPECTED
