"""AdmissionReviews per second and latency of ``credsidecar injector``, on this machine.

A real injector process (HTTPS with a test CA) answers AdmissionReviews of two pods: the
injector example ``examples/k8s/injector/app.yaml`` (native annotations, a Jinja
template, SIGHUP) and the Vault documentation's environment-variable pod (annotations
translated, a Go template turned into Jinja). Two measurements per pod, interleaved:

- throughput: ``--connections`` keep-alive clients sending back to back for ``--seconds``;
- latency at a fixed rate: open loop at ``--rate`` requests/s (default 100, the target
  says p99 under 20 ms there) for ``--seconds``, p50 and p99 of each request's time;
- and, for scale, ``review()`` called in this process: the cost without HTTP and TLS.

The peer measured the same way in the same run is ``GET /healthz`` on the same server: the
floor of an HTTPS round trip through this Python server, so the ratio is what reviewing
a pod costs on top. Run with ``make bench`` or ``python benchmarks/injector.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "injector")]

import aiohttp  # noqa: E402
from injectorproc import EXAMPLES, VAULT_DOCS, InjectorProcess, manifests, review_body  # noqa: E402

TARGET_P99_MS = 20.0


@dataclass
class Workload:
    name: str
    method: str
    path: str
    body: bytes | None


@dataclass
class Result:
    per_second: float
    p50_ms: float
    p99_ms: float


def workloads() -> list[Workload]:
    app = next(pod for file, pod, _ in manifests(EXAMPLES) if file == "app.yaml")
    web = next(pod for file, pod, _ in manifests(VAULT_DOCS) if file == "environment.yaml")
    return [
        Workload("native pod (app.yaml)", "POST", "/mutate", json.dumps(review_body(app)).encode()),
        Workload(
            "Vault pod (Go template)", "POST", "/mutate", json.dumps(review_body(web)).encode()
        ),
        Workload("GET /healthz (floor)", "GET", "/healthz", None),
    ]


async def one(session: aiohttp.ClientSession, url: str, work: Workload) -> float:
    started = time.perf_counter()
    async with session.request(work.method, url + work.path, data=work.body) as response:
        body = await response.read()
        if response.status != 200 or (work.body and b'"patch"' not in body):
            raise RuntimeError(f"{work.name}: HTTP {response.status} {body[:200]!r}")
    return time.perf_counter() - started


async def throughput(
    url: str, context: ssl.SSLContext, work: Workload, connections: int, seconds: float
) -> float:
    connector = aiohttp.TCPConnector(ssl=context, limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds
        done = 0

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await one(session, url, work)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(connections)))
        return done / (time.perf_counter() - started)


async def paced(
    url: str, context: ssl.SSLContext, work: Workload, rate: float, seconds: float
) -> list[float]:
    """Open loop: one request every 1/rate s whatever the answers do (no coordinated
    omission: a slow answer does not delay the next request)."""
    connector = aiohttp.TCPConnector(ssl=context, limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = asyncio.get_running_loop()
        start, tasks = loop.time(), []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            tasks.append(asyncio.create_task(one(session, url, work)))
        return list(await asyncio.gather(*tasks))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(args: argparse.Namespace, injector: InjectorProcess) -> dict[str, Result]:
    url = f"https://localhost:{injector.port}"
    works = workloads()
    rates: dict[str, list[float]] = {w.name: [] for w in works}
    latencies: dict[str, list[float]] = {w.name: [] for w in works}
    for work in works:  # warm-up: imports, caches, TLS sessions
        await throughput(url, injector.context, work, args.connections, 1.0)
    for round_ in range(args.rounds):
        for work in works:
            print(f"round {round_ + 1}/{args.rounds}: {work.name}", flush=True)
            rates[work.name].append(
                await throughput(url, injector.context, work, args.connections, args.seconds)
            )
            latencies[work.name] += await paced(
                url, injector.context, work, args.rate, args.seconds
            )
    return {
        w.name: Result(
            statistics.median(rates[w.name]),
            percentile(latencies[w.name], 0.5) * 1000,
            percentile(latencies[w.name], 0.99) * 1000,
        )
        for w in works
    }


def in_process(work: Workload, count: int = 3000) -> Result:
    """``review()`` called directly: what one AdmissionReview costs without HTTP and TLS."""
    from agent.injector.review import review
    from agent.injector.settings import parse_settings

    settings = parse_settings({"tls_cert": "-", "tls_key": "-", "vault_address": "https://o:8200"})
    assert work.body is not None
    review(work.body, settings)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        review(work.body, settings)
        times.append(time.perf_counter() - started)
    return Result(count / sum(times), percentile(times, 0.5) * 1000, percentile(times, 0.99) * 1000)


def report(results: dict[str, Result], args: argparse.Namespace) -> str:
    floor = results["GET /healthz (floor)"]
    lines = [
        f"credsidecar injector, {platform.python_implementation()} {platform.python_version()}, "
        f"{args.connections} connections for throughput, {args.rate:g}/s open loop for latency, "
        f"{args.rounds} x {args.seconds:g}s",
        "",
        f"{'workload':<26}{'reviews/s':>11}{'x floor':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'p99 x floor':>13}",
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<26}{r.per_second:>11.0f}{r.per_second / floor.per_second:>9.2f}"
            f"{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.p99_ms / floor.p99_ms:>13.2f}"
        )
    served = {n: r for n, r in results.items() if "in process" not in n and "floor" not in n}
    worst = max(r.p99_ms for r in served.values())
    verdict = "met" if worst < TARGET_P99_MS else "MISSED"
    lines += [
        "",
        f"target p99 < {TARGET_P99_MS:g} ms at {args.rate:g}/s: {verdict} (worst {worst:.2f} ms)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="per measurement (10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--rate", type=float, default=100, help="requests/s for latency (100)")
    parser.add_argument("--connections", type=int, default=8, help="for throughput (8)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="credsidecar-bench-injector-") as tmp:
        settings: dict[str, Any] = {"vault_address": "https://openbao.openbao.svc:8200"}
        injector = InjectorProcess(Path(tmp), **settings).start()
        try:
            results = asyncio.run(measure(args, injector))
        finally:
            injector.stop()
    results["review() in process (app)"] = in_process(workloads()[0])
    print(report(results, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
