"""Fixtures: the session's injector (pods pointed at the session's OpenBao) and
injectors of a test's own with other settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from devservers import OpenBaoServer
from injectorproc import InjectorProcess


@pytest.fixture(scope="session")
def injector(
    openbao: OpenBaoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InjectorProcess]:
    """The injector with default settings, pointing pods at the session's OpenBao."""
    process = InjectorProcess(
        tmp_path_factory.mktemp("injector"), vault_address=openbao.address
    ).start()
    yield process
    process.stop()


@pytest.fixture
def start_injector(tmp_path: Path) -> Iterator[Callable[..., InjectorProcess]]:
    """``start_injector(**settings)``: an injector of the test's own, stopped afterwards."""
    started: list[InjectorProcess] = []

    def start(**settings: Any) -> InjectorProcess:
        process = InjectorProcess(tmp_path / f"injector-{len(started)}", **settings).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
