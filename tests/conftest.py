"""Session-wide real servers: one OpenBao dev server and one PostgreSQL cluster.

Tests that need isolation from each other use their own mounts, roles or
databases on these servers rather than mocks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from devservers import OpenBaoServer, PostgresCluster


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoServer]:
    server = OpenBaoServer().start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().start()
    yield cluster
    cluster.remove()
