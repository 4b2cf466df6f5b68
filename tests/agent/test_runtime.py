"""The runtime in process, on the session's real OpenBao: a failed part restarts alone,
and a long render does not keep the event loop (the probes) waiting.

In process, so the test sees inside: a render probe (a filter registered like any
other) says when the template started and ended, and a bug is put into one source
(its fetch raises once) - the one fault that cannot be produced from outside.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from devservers import ROOT_TOKEN, OpenBaoServer, free_port
from waiting import wait_until

from agent import metrics
from agent.config import TemplateConfig, parse_config
from agent.render import FILTERS
from agent.runtime import Runtime


def kv_config(openbao: OpenBaoServer, shm: Path, paths: dict[str, str], **extra: Any) -> Any:
    """Each name a KV secret polled every 200 ms, rendered to ``shm/<name>``."""
    return parse_config(
        {
            "vault": {
                "address": openbao.address,
                "auth": {"method": "token", "token": ROOT_TOKEN},
                "retry": {"initial": "100ms", "max": "500ms"},
            },
            "secrets": {
                name: {"kind": "kv", "path": f"secret/data/{path}", "refresh": "200ms"}
                for name, path in paths.items()
            },
            "templates": [
                {"destination": str(shm / name), "contents": f"{{{{ secrets.{name}.v }}}}"}
                for name in paths
            ],
            "state_dir": str(shm / "state"),
            "health": {"listen": f"127.0.0.1:{free_port()}"},
            **extra,
        },
        base_dir=shm,
        env={},
    )


@asynccontextmanager
async def running(runtime: Runtime) -> AsyncIterator[asyncio.Task[int]]:
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def healthz(runtime: Runtime) -> int:
    assert runtime.config.health is not None
    url = f"http://127.0.0.1:{runtime.config.health.listen_port}/healthz"
    async with aiohttp.ClientSession() as session, session.get(url, timeout=10) as response:
        return response.status


def kv_put(openbao: OpenBaoServer, path: str, value: str) -> None:
    openbao.client().secrets.kv.v2.create_or_update_secret(path=path, secret={"v": value})


def failures(task: str) -> float:
    return metrics.REGISTRY.get_sample_value("credsidecar_task_failures_total", {"task": task}) or 0


async def test_a_part_that_fails_is_restarted_alone_while_the_rest_serves(
    openbao: OpenBaoServer, shm: Path, events: Any
) -> None:
    a, b = f"sup-a-{uuid.uuid4().hex[:6]}", f"sup-b-{uuid.uuid4().hex[:6]}"
    kv_put(openbao, a, "a1")
    kv_put(openbao, b, "b1")
    runtime = Runtime(kv_config(openbao, shm, {"a": a, "b": b}))
    before = failures("source:a")
    async with running(runtime) as task:
        await wait_until(lambda: runtime.readiness()[0], 30, "ready")
        source = runtime.sources["a"]
        real_fetch = source.fetch  # type: ignore[attr-defined]
        broken = asyncio.Event()

        async def fetch_with_a_bug() -> Any:
            if not broken.is_set():
                broken.set()
                raise RuntimeError("a bug in the source")
            return await real_fetch()

        source.fetch = fetch_with_a_bug  # type: ignore[attr-defined]
        await wait_until(lambda: events.named("task_failed", task="source:a"), 30, "the failure")
        (failed,) = events.named("task_failed", task="source:a")
        assert failed.error == "RuntimeError"  # the type only: a message may quote a value
        assert failed.where.startswith("agent/sources/polling.py:")  # where it surfaced
        assert failures("source:a") == before + 1
        # the rest keeps serving meanwhile, and the failed part comes back
        kv_put(openbao, b, "b2")
        await wait_until(lambda: (shm / "b").read_text() == "b2", 30, "b still served")
        assert await healthz(runtime) == 200
        kv_put(openbao, a, "a2")
        await wait_until(lambda: (shm / "a").read_text() == "a2", 30, "a restarted")
        assert events.named("task_restarted", task="source:a")
        assert runtime.supervisor.parts["source:a"].failures == 1
        assert not task.done()
    assert task.result() == 0


async def test_healthz_answers_while_a_long_render_runs(
    openbao: OpenBaoServer, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = f"slow-{uuid.uuid4().hex[:6]}"
    kv_put(openbao, path, "v1")
    started, ended = threading.Event(), threading.Event()

    def probe(flag: threading.Event) -> Callable[[object], str]:
        def mark(_: object) -> str:
            flag.set()
            return ""

        return mark

    monkeypatch.setitem(FILTERS, "probe_started", probe(started))
    monkeypatch.setitem(FILTERS, "probe_ended", probe(ended))
    slow = (
        "{{ secrets.slow.v | probe_started }}"
        "{% for i in range(4000) %}{% for j in range(4000) %}"
        '{% if secrets.slow.v == "never" %}x{% endif %}{% endfor %}{% endfor %}'
        "{{ secrets.slow.v | probe_ended }}"
    )
    config = kv_config(openbao, shm, {"slow": path})
    template = TemplateConfig(destination=shm / "slow", contents=slow)
    runtime = Runtime(dataclasses.replace(config, templates=(template,)))
    async with running(runtime):
        await wait_until(started.is_set, 30, "the render to start")
        # the 16-million-step loop runs in its thread; the loop answers meanwhile
        assert await healthz(runtime) == 200
        assert not ended.is_set(), "/healthz answered only after the render"
    # stopping ended the render early: nothing waited for its 16 million steps
    assert not ended.is_set()
