"""The render pipeline on its own (no server): when a version counts as delivered, and
readiness per destination, on an injected clock."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from waiting import wait_until

from agent.acks import Acks
from agent.config import NotifyConfig, TemplateConfig, Wait
from agent.notify import Notifier
from agent.pipeline import RenderPipeline
from agent.secret import SecretValue


class App:
    """A notify target that is told only when the test says so."""

    def __init__(self, name: str = "app") -> None:
        self.name = name
        self.acks = Acks()

    def trigger(self) -> None:
        self.acks.issue()

    def told(self) -> None:
        self.acks.cover(self.acks.issued)


def db(version: str, expires_at: float | None = None) -> SecretValue:
    return SecretValue(
        "db",
        {"password": f"pw-{version}"},
        version,
        issued_at=1000.0,
        expires_at=expires_at,
        lease_duration=100.0 if expires_at else None,
    )


def pipeline(shm: Path, *names: str, clock: Any = None) -> tuple[RenderPipeline, list[Any]]:
    delivered: list[Any] = []
    templates = [TemplateConfig(shm / n, contents="{{ secrets.db.password }}") for n in names]
    kv = TemplateConfig(shm / "kv", contents="{{ secrets.kv.x }}")
    return RenderPipeline(
        [*templates, kv],
        ["db", "kv"],
        on_delivered=lambda name, version, at: delivered.append((name, version)),
        clock=clock or (lambda: 1000.0),
    ), delivered


async def test_a_version_is_delivered_once_every_destination_that_uses_it_holds_it(
    shm: Path,
) -> None:
    pipe, delivered = pipeline(shm, "a", "b")
    await pipe.publish(SecretValue("kv", {"x": "1"}, "k1"))
    await pipe.publish(db("v1"))
    await pipe.run_pass()
    assert sorted(delivered) == [("db", "v1"), ("kv", "k1")]

    (shm / "b").unlink()
    os.mkfifo(shm / "b")  # b cannot be written any more: it keeps v1
    await pipe.publish(db("v2"))
    burst = await pipe.run_pass()
    assert len(burst.failed) == 1 and (shm / "a").read_text() == "pw-v2"
    assert ("db", "v2") not in delivered  # b still holds v1
    await pipe.publish(SecretValue("kv", {"x": "2"}, "k2"))
    await pipe.run_pass()
    assert ("kv", "k2") in delivered  # another secret is not held up by it

    (shm / "b").unlink()
    await pipe.run_pass()  # the retry
    assert delivered[-1] == ("db", "v2")
    assert [s.holds["db"].version for s in pipe.templates[:2]] == ["v2", "v2"]


async def test_a_version_is_delivered_only_once_the_application_was_told(shm: Path) -> None:
    pipe, delivered = pipeline(shm, "a")
    app = App()
    pipe.targets.append(app)
    await pipe.publish(SecretValue("kv", {"x": "1"}, "k1"))
    await pipe.publish(db("v1"))
    await pipe.run_pass()
    assert delivered == []  # written, not told yet
    assert app.acks.issued == 1  # one trigger for the pass, however many files
    app.told()
    await wait_until(lambda: len(delivered) == 2, 10, "the deliveries")

    await pipe.publish(db("v2"))
    await pipe.run_pass()
    await pipe.publish(db("v3"))
    await pipe.run_pass()  # a delivery that fails covers nothing: v2 and v3 wait
    assert delivered[2:] == []
    app.told()  # the next one that succeeds covers both triggers
    await wait_until(lambda: delivered[2:] == [("db", "v3")], 10, "v3 delivered")
    await pipe.aclose()


async def test_readiness_follows_what_each_destination_holds(shm: Path) -> None:
    now = [1000.0]
    pipe, _ = pipeline(shm, "a", "b", clock=lambda: now[0])
    await pipe.publish(SecretValue("kv", {"x": "1"}, "k1"))
    await pipe.publish(db("v1", expires_at=1100.0))  # 100 s lease: margin 10 s
    assert pipe.readiness(1000.0) == [f"template {shm / n}: not rendered yet" for n in "ab"] + [
        f"template {shm / 'kv'}: not rendered yet"
    ]
    await pipe.run_pass()
    assert pipe.readiness(1000.0) == []

    (shm / "b").unlink()
    os.mkfifo(shm / "b")
    await pipe.publish(db("v2", expires_at=1200.0))
    await pipe.run_pass()
    assert pipe.readiness(1050.0) == []  # b holds v1, still valid for 50 s
    assert pipe.readiness(1095.0) == [f"template {shm / 'b'}: secret db expires in 5.0s"]
    pipe.mark_revoked("db", "v1")  # e.g. revoked by someone else
    assert pipe.readiness(1050.0) == [
        f"template {shm / 'b'}: holds revoked credentials of secret db (version v1)"
    ]
    pipe.mark_revoked("db", "v0")  # held by no destination: nothing to say
    assert ("db", "v0") not in pipe.revoked


async def test_a_change_to_one_template_triggers_only_the_notifiers_it_names(
    shm: Path, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    script = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + ';')"

    def command(name: str) -> NotifyConfig:
        argv = (sys.executable, "-c", script, str(ran), name)
        return NotifyConfig(name=name, command=argv, wait=Wait(min=0.05, max=1.0))

    notifiers = [Notifier(command("db-app")), Notifier(command("kv-app"))]
    delivered: list[tuple[str, str]] = []
    pipe = RenderPipeline(
        [
            TemplateConfig(shm / "db", contents="{{ secrets.db.password }}", notify=("db-app",)),
            TemplateConfig(shm / "kv", contents="{{ secrets.kv.x }}", notify=("kv-app",)),
            TemplateConfig(shm / "none", contents="{{ secrets.kv.x }}", notify=()),
        ],
        ["db", "kv"],
        on_delivered=lambda name, version, at: delivered.append((name, version)),
    )
    pipe.targets.extend(notifiers)
    tasks = [asyncio.create_task(n.run()) for n in notifiers]
    try:
        await pipe.publish(db("v1"))
        await pipe.publish(SecretValue("kv", {"x": "1"}, "k1"))
        await pipe.run_pass()  # both written: each notifier once
        await wait_until(lambda: len(delivered) == 2, 30, "the first deliveries")
        assert sorted(ran.read_text().split(";")[:-1]) == ["db-app", "kv-app"]

        await pipe.publish(db("v2"))
        await pipe.run_pass()  # only the db file changed
        await wait_until(lambda: ("db", "v2") in delivered, 30, "v2 delivered")
        assert ran.read_text().split(";")[2:-1] == ["db-app"]
        assert [n.acks.issued for n in notifiers] == [2, 1]  # kv-app was not even triggered

        await pipe.publish(SecretValue("kv", {"x": "2"}, "k2"))
        await pipe.run_pass()
        await wait_until(lambda: ("kv", "k2") in delivered, 30, "k2 delivered")
        assert ran.read_text().split(";")[3:-1] == ["kv-app"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pipe.aclose()


async def test_a_template_that_names_no_target_is_delivered_once_written(shm: Path) -> None:
    delivered: list[tuple[str, str]] = []
    pipe = RenderPipeline(
        [TemplateConfig(shm / "kv", contents="{{ secrets.kv.x }}", notify=())],
        ["kv"],
        on_delivered=lambda name, version, at: delivered.append((name, version)),
    )
    app = App()
    pipe.targets.append(app)
    await pipe.publish(SecretValue("kv", {"x": "1"}, "k1"))
    await pipe.run_pass()
    assert delivered == [("kv", "k1")] and app.acks.issued == 0
