"""Rendered files: atomic under a concurrent reader, unchanged bytes not rewritten,
strict permissions, and destinations that are not memory-backed refused."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import TemplateConfig
from agent.errors import RenderError
from agent.files import MEMORY_FILESYSTEMS, check_memory_backed, mount_of, parse_mountinfo
from agent.files import write_destination as write
from agent.render import Template
from agent.secret import SecretValue


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory on /dev/shm (tmpfs)."""
    path = Path(tempfile.mkdtemp(prefix="credsidecar-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _fstype(path: Path) -> str:
    found = mount_of(path.resolve(), parse_mountinfo(Path("/proc/self/mountinfo").read_text()))
    assert found is not None
    return found[1]


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a disk-backed filesystem (tmp_path, else next to the tests)."""
    for candidate in (tmp_path, Path(__file__).parent):
        if _fstype(candidate) not in MEMORY_FILESYSTEMS:
            path = Path(tempfile.mkdtemp(prefix=".disk-", dir=candidate))
            yield path
            shutil.rmtree(path, ignore_errors=True)
            return
    pytest.skip("no disk-backed directory available on this machine")


def cfg(destination: Path, **options: Any) -> TemplateConfig:
    contents = '{"user": {{ secrets.db.username | tojson }}, "pad": "{{ secrets.db.pad }}"}'
    return TemplateConfig(destination=destination, contents=contents, **options)


def secret(version: int, pad: int = 10) -> dict[str, SecretValue]:
    data = {"username": f"user-{version}", "pad": str(version % 10) * pad}
    return {"db": SecretValue("db", data, str(version))}


def test_concurrent_reader_never_sees_a_partial_or_mixed_file(shm: Path) -> None:
    target = cfg(shm / "db.json")
    tmpl = Template(target)
    # sizes from tiny to several pages, so a torn write would be visible
    versions = [tmpl.render(secret(i, pad=(i * 7919) % 300_000)) for i in range(120)]
    valid = set(versions)
    write(target, versions[0])
    reads = 0
    bad: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            data = target.destination.read_bytes()
            reads += 1
            if data not in valid:
                bad.append(data[:40])

    thread = threading.Thread(target=reader)
    thread.start()
    writes = 0
    try:
        # at least two passes, and until the reader has really raced the writer
        while writes < 2 * len(versions) or (reads < 500 and writes < 20_000):
            writes += 1
            assert write(target, versions[writes % len(versions)]) is True
    finally:
        stop.set()
        thread.join()
    assert not bad, f"{len(bad)} torn reads, e.g. {bad[0]!r}"
    assert reads >= 500
    assert target.destination.read_bytes() == versions[writes % len(versions)]
    leftovers = [p.name for p in shm.iterdir() if p.name != "db.json"]
    assert leftovers == []  # no temp files left behind


def test_a_failed_render_leaves_the_previous_file(shm: Path) -> None:
    good = cfg(shm / "db.json")
    write(good, Template(good).render(secret(1)))
    before = (shm / "db.json").read_bytes()
    broken = Template(cfg(shm / "db.json"))
    with pytest.raises(RenderError):
        broken.render({"db": SecretValue("db", {"username": "u"}, "2")})  # no "pad" field
    assert (shm / "db.json").read_bytes() == before
    assert sorted(p.name for p in shm.iterdir()) == ["db.json"]


def test_identical_bytes_are_not_rewritten(shm: Path) -> None:
    target = cfg(shm / "db.json")
    data = Template(target).render(secret(1))
    assert write(target, data) is True
    before = os.stat(target.destination)
    assert write(target, Template(target).render(secret(1))) is False
    after = os.stat(target.destination)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert write(target, Template(target).render(secret(2))) is True
    assert os.stat(target.destination).st_ino != before.st_ino


def test_default_mode_is_0600(shm: Path) -> None:
    old = os.umask(0)  # a lax umask must not loosen the file
    try:
        write(cfg(shm / "db.json"), b"x")
    finally:
        os.umask(old)
    assert os.stat(shm / "db.json").st_mode & 0o7777 == 0o600


def test_configured_perms_uid_and_gid(shm: Path) -> None:
    write(cfg(shm / "db.json", perms=0o640), b"x")
    assert os.stat(shm / "db.json").st_mode & 0o7777 == 0o640
    write(cfg(shm / "db.json", perms=0o400), b"x")  # same bytes: the mode still follows
    assert os.stat(shm / "db.json").st_mode & 0o7777 == 0o400
    if os.geteuid() != 0:
        pytest.skip("changing the owner needs root")
    write(cfg(shm / "owned.json", uid=65534, gid=65534), b"x")
    st = os.stat(shm / "owned.json")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (65534, 65534, 0o600)


def test_disk_destination_is_refused_unless_allowed(disk: Path) -> None:
    destination = disk / "db.json"
    with pytest.raises(RenderError) as info:
        write(cfg(destination), b"secret-bytes")
    message = str(info.value)
    assert str(destination) in message
    assert f"is on {_fstype(disk)}" in message
    assert "allow_disk: true" in message
    assert not destination.exists()
    assert list(disk.iterdir()) == []

    assert write(cfg(destination, allow_disk=True), b"secret-bytes") is True
    assert destination.read_bytes() == b"secret-bytes"
    assert os.stat(destination).st_mode & 0o7777 == 0o600


def test_symlinks_are_resolved_before_the_check(shm: Path, disk: Path) -> None:
    to_memory = disk / "to-memory"
    to_memory.symlink_to(shm)
    check_memory_backed(to_memory / "db.json")  # really on tmpfs: accepted

    to_disk = shm / "to-disk"
    to_disk.symlink_to(disk)
    with pytest.raises(RenderError, match="not memory-backed"):
        check_memory_backed(to_disk / "db.json")


def test_unwritable_destination_is_a_render_error(shm: Path) -> None:
    destination = shm / "missing-dir" / "db.json"
    with pytest.raises(RenderError, match=f"cannot write {destination}: No such file"):
        write(cfg(destination), b"x")
    (shm / "dir.json").mkdir()
    with pytest.raises(RenderError, match="it is a directory"):
        write(cfg(shm / "dir.json"), b"x")


@pytest.mark.timeout(30)  # before the fix the first write blocked forever opening the FIFO
def test_a_fifo_or_any_non_regular_destination_is_refused_without_blocking(shm: Path) -> None:
    fifo = shm / "db.json"
    os.mkfifo(fifo)
    with pytest.raises(RenderError, match=r"it is a FIFO \(named pipe\), not a regular file"):
        write(cfg(fifo), b"credentials")
    assert fifo.is_fifo()  # refused, not replaced: whoever made it should look

    # a symlink: its target must be neither replaced nor chmod-ed through it
    target = shm / "elsewhere"
    target.write_bytes(b"credentials")
    target.chmod(0o644)
    link = shm / "link.json"
    link.symlink_to(target)
    with pytest.raises(RenderError, match="it is a symbolic link"):
        write(cfg(link, perms=0o600), b"credentials")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and link.is_symlink()

    # a regular file is still replaced, and unchanged bytes still leave it alone
    regular = shm / "ok.json"
    assert write(cfg(regular), b"v1") is True
    assert write(cfg(regular), b"v1") is False
    assert write(cfg(regular), b"v2") is True and regular.read_bytes() == b"v2"


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=100k
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:40 / /var/lib/kubelet/pods/x/volumes/secret\\040vol rw shared:1 - ramfs none rw
41 27 254:0 /data /srv rw,relatime - ext4 /dev/vda rw
42 41 0:41 / /srv rw,relatime - tmpfs tmpfs rw
43 27 0:42 / /mnt/shmx rw,relatime - xfs /dev/vdb rw
"""


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        ("/dev/shm/app", ("/dev/shm", "tmpfs")),
        ("/dev/shm", ("/dev/shm", "tmpfs")),
        ("/dev/shmother", ("/", "ext4")),  # a prefix of the name is not a parent
        ("/etc", ("/", "ext4")),
        (
            "/var/lib/kubelet/pods/x/volumes/secret vol/a",
            ("/var/lib/kubelet/pods/x/volumes/secret vol", "ramfs"),
        ),
        ("/srv/app", ("/srv", "tmpfs")),  # the later mount on the same point is on top
        ("/mnt/shmx/a", ("/mnt/shmx", "xfs")),
    ],
)
def test_mount_lookup(directory: str, expected: tuple[str, str]) -> None:
    assert mount_of(Path(directory), parse_mountinfo(MOUNTINFO)) == expected
