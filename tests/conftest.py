"""Session-wide real servers: OpenBao dev, PostgreSQL, Redis, MariaDB and moto's AWS.

Tests that need isolation from each other use their own mounts, roles or
databases on these servers rather than mocks. Every log line of the session (in
process and from agent subprocesses) is checked at the end for every secret value
the tests created.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from devservers import (
    AUDIT,
    ROOT_TOKEN,
    MariaDBServer,
    MotoServer,
    OpenBaoServer,
    PostgresCluster,
    RedisServer,
    SecretAudit,
)

# Tests that use one of these fixtures need a real server: they are marked ``servers``
# here, so ``make check`` (``-m "not servers"``) runs only the tests that need none. A
# test that starts servers by other means carries ``@pytest.mark.servers`` itself.
SERVER_FIXTURES = frozenset({"openbao", "postgres", "redis_server", "mariadb", "moto"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


@pytest.fixture(scope="session", autouse=True)
def secret_audit() -> Iterator[SecretAudit]:
    from agent.logs import JsonFormatter

    path = Path(tempfile.mkdtemp(prefix="credsidecar-logs-")) / "in-process.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # every event the agent code logs in process is audited
    AUDIT.log(path)
    AUDIT.secret(ROOT_TOKEN)
    yield AUDIT
    root.removeHandler(handler)
    handler.close()
    leaks = AUDIT.leaks()
    assert not leaks, f"secret values found in logs: {leaks}"


@pytest.fixture
def shm() -> Iterator[Path]:
    """A memory-backed directory for rendered files, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="credsidecar-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class TinyVolume:
    """A tmpfs of its own, a few pages big, that a test fills to get real ENOSPC.

    ``fill()`` writes a filler file until the kernel says ``No space left on device``;
    ``free()`` removes it again. Files already on the volume stay as they are.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / ".filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)
        probe = self.path / ".probe"
        with pytest.raises(OSError, match="No space left"):
            probe.write_bytes(b"x" * 4096)
        probe.unlink(missing_ok=True)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def tiny_volume() -> Iterator[TinyVolume]:
    """A 256 KiB tmpfs mounted for this test (needs root, as the tests run in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = Path(tempfile.mkdtemp(prefix="credsidecar-tiny-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield TinyVolume(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoServer]:
    server = OpenBaoServer().start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().start()
    AUDIT.secret(cluster.password)
    yield cluster
    cluster.remove()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    AUDIT.secret(server.admin_password)
    yield server
    server.remove()


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """MariaDB with the general log on: tests grep it for plaintext passwords."""
    server = MariaDBServer(general_log=True).start()
    AUDIT.secret(server.admin_password)
    yield server
    server.remove()


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.remove()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's fixed credentials and region in our environment, as the AWS chain reads them."""
    from devservers import aws_test_env

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in aws_test_env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
