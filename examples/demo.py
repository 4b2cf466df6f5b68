"""``make demo``: credsidecar keeping a sample app's PostgreSQL login fresh.

Starts a throwaway OpenBao dev server and PostgreSQL cluster, configures the
database secrets engine with short leases (TTL 6 s, max TTL 20 s), and runs
``credsidecar run`` supervising ``examples/app.py``. It prints one line per
event: renders, lease issue/renewal/replacement/revocation, signals, and the
app's queries. ``DURATION=60`` stops by itself after 60 s; 0 runs until Ctrl-C.
Whatever ends it (duration, Ctrl-C, SIGTERM, the agent dying), everything it
started is stopped and removed: processes, cluster, temp dir.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO

import yaml

# the demo starts the same throwaway OpenBao and PostgreSQL as the tests
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from devservers import (
    ROOT_TOKEN,
    OpenBaoServer,
    PostgresCluster,
    configure_database_engine,
    free_port,
)
from procs import mentioning, sessions_alive, stop_group, terminate

EXAMPLES = Path(__file__).resolve().parent
# Agent events worth a line; anything at warning level or above is shown as well.
SHOWN = {
    "rendered",
    "render_failed",
    "issued",
    "adopted",
    "renewed",
    "renew_failed",
    "replaced",
    "revoked",
    "kv_updated",
    "updated",
    "signalled",
    "notify_failed",
    "vault_unavailable",
    "token_renewed",
    "token_relogin",
    "child_started",
    "child_exited",
}
HIDDEN_FIELDS = {"ts", "level", "logger", "event"}
LONG_IDS = {"version", "old_version", "new_version", "lease_id"}

# The rendered file the app reads; host/port/database are fixed per deployment.
DB_TEMPLATE = (
    '{{"username": {{{{ secrets.db.username | tojson }}}}, '
    '"password": {{{{ secrets.db.password | tojson }}}}, '
    '"host": "127.0.0.1", "port": {port}, "database": "postgres"}}\n'
)


class Stop(Exception):
    """Raised from a signal handler to unwind into the cleanup."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def now() -> str:
    t = time.time()
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def short(key: str, value: object) -> str:
    text = str(value)
    # lease ids are long and not secret; the tail is enough to tell them apart
    if key in LONG_IDS and len(text) > 24:
        return "…" + text[-10:]
    return text


def agent_line(line: str) -> str | None:
    """One readable line for an agent JSON log line, or None when it is not worth showing."""
    try:
        record = json.loads(line)
    except ValueError:
        return f"agent  {line}" if line.strip() else None
    if not isinstance(record, dict):
        return f"agent  {line}"
    name = str(record.get("event", "?"))
    loud = record.get("level") in ("warning", "error", "critical")
    if name not in SHOWN and not loud:
        return None
    fields = " ".join(
        f"{k}={short(k, v)}" for k, v in record.items() if k not in HIDDEN_FIELDS and v is not None
    )
    return f"agent  {name:<13} {fields}".rstrip()


def app_line(line: str) -> str | None:
    if line.startswith("app "):
        return f"app    {line[4:]}"
    return f"child  {line}" if line.strip() else None


def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "credsidecar"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "agent"]


def write_config(workdir: Path, bao: OpenBaoServer, pg: PostgresCluster) -> tuple[Path, int]:
    token_file = workdir / "vault-token"
    token_file.write_text(ROOT_TOKEN + "\n")
    token_file.chmod(0o600)
    appdir, state = workdir / "app", workdir / "state"
    appdir.mkdir(mode=0o700)
    state.mkdir(mode=0o700)
    health_port = free_port()
    config = {
        "vault": {
            "address": bao.address,
            "auth": {"method": "token", "token_file": str(token_file)},
        },
        # revoke the replaced lease soon after the switch so the demo shows it
        "secrets": {"db": {"kind": "database", "path": "database/creds/app", "revoke_grace": "3s"}},
        "templates": [
            {"destination": str(appdir / "db.json"), "contents": DB_TEMPLATE.format(port=pg.port)}
        ],
        "exec": {
            "command": [
                sys.executable,
                str(EXAMPLES / "app.py"),
                "--credentials",
                str(appdir / "db.json"),
                "--pid-file",
                str(appdir / "app.pid"),
            ],
            "reload": "signal",
            "signal": "SIGHUP",
        },
        "health": {"listen": f"127.0.0.1:{health_port}"},
        "state_dir": str(state),
        "revoke_on_shutdown": True,  # a demo leaves no lease behind
    }
    path = workdir / "credsidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, health_port


def follow(stream: IO[bytes], source: str, out: queue.Queue[tuple[str, str | None]]) -> None:
    for raw in iter(stream.readline, b""):
        out.put((source, raw.decode("utf-8", "replace").rstrip("\n")))
    out.put((source, None))


class Tally:
    def __init__(self) -> None:
        self.events: collections.Counter[str] = collections.Counter()
        self.users: list[str] = []
        self.ok = self.failed = 0

    def agent(self, line: str) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            self.events[str(json.loads(line).get("event"))] += 1

    def app(self, line: str) -> None:
        if line.startswith("app query ok user="):
            self.ok += 1
            user = line.rpartition("=")[2]
            if not self.users or self.users[-1] != user:
                self.users.append(user)
        elif line.startswith("app query failed"):
            self.failed += 1

    def summary(self) -> str:
        counts = ", ".join(
            f"{n} {name}"
            for name in ("issued", "renewed", "replaced", "revoked", "rendered", "signalled")
            if (n := self.events[name])
        )
        return (
            f"queries ok={self.ok} failed={self.failed}, "
            f"database users used={len(self.users)}; agent: {counts or 'no events'}"
        )


def show(source: str, line: str, tally: Tally) -> None:
    """Count and print one line of the agent's stderr ("err") or its stdout ("out": the app)."""
    if source == "err":
        tally.agent(line)
        shown = agent_line(line)
    else:
        tally.app(line)
        shown = app_line(line)
    if shown:
        print(f"{now()} {shown}", flush=True)


def run_agent(config: Path, duration: float, tally: Tally, started: list[int]) -> int:
    """Run the agent until the duration is over or it exits; print its events. Returns rc."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    proc = subprocess.Popen(
        [*agent_command(), "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=EXAMPLES.parent,
        env=env,
        start_new_session=True,  # its own group: Ctrl-C reaches us only, we stop it in order
    )
    started.append(proc.pid)
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=follow, args=(proc.stdout, "out", lines), daemon=True),
        threading.Thread(target=follow, args=(proc.stderr, "err", lines), daemon=True),
    ]
    for t in readers:
        t.start()
    deadline = time.monotonic() + duration if duration > 0 else None
    try:
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                print(f"{now()} demo   {duration:g}s are over", flush=True)
                return 0
            try:
                source, line = lines.get(timeout=0.2)
            except queue.Empty:
                # checked only when idle, so its last lines are shown first. Its pipes
                # are no sign of life: the app (its child) holds them open too.
                if proc.poll() is not None:
                    rc = proc.returncode
                    print(f"{now()} demo   the agent exited with code {rc}", flush=True)
                    return rc if rc > 0 else 1  # killed by a signal: still a failure
                continue
            if line is not None:
                show(source, line, tally)
    except (Stop, KeyboardInterrupt) as exc:  # the normal way to end an open-ended demo
        print(f"\n{now()} demo   stopping ({exc or 'Ctrl-C'})", flush=True)
        return 0
    finally:
        # no more signals while we clean up: a second Ctrl-C must not strand a cluster
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not stop_group(proc, timeout=20):
            print(f"{now()} demo   the agent did not stop within 20s: killed it", flush=True)
        # the app runs in a session of its own; if the agent died first it is orphaned.
        # Only our children mention our temp dir on their command line.
        if orphans := mentioning(str(config.parent)):
            print(f"{now()} demo   stopping orphaned processes {orphans}", flush=True)
            terminate(orphans, timeout=10)
        for t in readers:
            t.join(5)
        # the agent's last words (shutdown, revocations) after we asked it to stop
        while not lines.empty():
            source, line = lines.get_nowait()
            if line is not None:
                show(source, line, tally)


@contextlib.contextmanager
def servers(started: list[int]) -> Iterator[tuple[OpenBaoServer, PostgresCluster]]:
    bao, pg = OpenBaoServer(), PostgresCluster()
    try:
        print(f"{now()} demo   starting OpenBao and PostgreSQL", flush=True)
        bao.start()
        started.append(bao.proc.pid if bao.proc else 0)
        pg.start()
        started.append(pg.proc.pid if pg.proc else 0)
        configure_database_engine(bao, pg, ttl="6s", max_ttl="20s")
        yield bao, pg
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pg.remove()
        bao.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=float(os.environ.get("DURATION") or 0),
        help="seconds to run; 0 = until Ctrl-C (default: $DURATION or 0)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="credsidecar-demo-", dir=shm if shm.is_dir() else None))
    tally, rc, started = Tally(), 0, list[int]()
    try:
        with servers(started) as (bao, pg):
            config, health = write_config(workdir, bao, pg)
            print(
                f"{now()} demo   OpenBao {bao.address}, PostgreSQL 127.0.0.1:{pg.port}, "
                f"lease TTL 6s / max 20s; probes http://127.0.0.1:{health}/readyz, "
                f"status: credsidecar status -c {config}",
                flush=True,
            )
            how = f"for {args.duration:g}s" if args.duration > 0 else "until Ctrl-C"
            print(f"{now()} demo   running credsidecar {how} (config {config})", flush=True)
            rc = run_agent(config, args.duration, tally, started)
    except (Stop, KeyboardInterrupt) as exc:
        print(f"\n{now()} demo   stopping ({exc or 'Ctrl-C'})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"{now()} demo   {tally.summary()}", flush=True)
        left = sessions_alive(p for p in started if p) + mentioning(str(workdir))
        if left or workdir.exists():
            print(f"{now()} demo   WARNING: left behind: pids {left}, {workdir}", flush=True)
            rc = rc or 1
        else:
            print(f"{now()} demo   stopped; nothing left running, {workdir} removed", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
