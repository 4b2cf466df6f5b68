"""The proxy vs PgBouncer vs PostgreSQL direct, with pgbench, on one throwaway cluster.

Rows: direct, PgBouncer (session, transaction), a bare uvloop byte relay (the floor
for any Python proxy, ``benchmarks/relay.py``), credsidecar proxy (session,
transaction; ``python -m proxy`` under uvloop), in both builds side by side: compiled
with mypyc (when the install is) and pure Python (``CREDSIDECAR_PURE_PYTHON=1``).
Workloads: ``pgbench -S`` and TPC-B at 1 and 16 clients, each also with ``-C`` (a new
connection per transaction). Each row runs the targets in turn, ``--rounds`` times, and
prints the median TPS and latency, the TPS range, the ratios to PgBouncer (same pool
mode; session for the relay) and to direct, and the CPU time (user + system, from
/proc) each target process spent per transaction, and its ratio to PgBouncer's; each
ratio is the median of the ratios within a round (see :func:`paired`).
Then instructions per transaction (valgrind's callgrind, repeatable where time is
not) for PgBouncer, the relay and both proxy builds, ``-S``, TPC-B and ``-S -C`` (what
a login costs, in both pool modes), with the proxy's top functions; then a
rotation soak: pgbench -S through the proxy while the role's
password changes every 5 s (``ALTER ROLE`` + rewritten credentials file); it must end
with 0 failed transactions.

Run with ``make bench`` or ``python benchmarks/proxy.py --seconds 10 --soak 60``;
``--compare DIR`` adds the proxy of another checkout (``git worktree add DIR main``) to
the same interleaved rounds, to see what a change costs.
PgBouncer and valgrind come from the Debian packages (``apt-get install -y pgbouncer
valgrind``); each is skipped with a note when missing. PgBouncer refuses to run as
root, so when we are root it runs as the ``postgres`` user.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the dev servers the tests start

from devservers import PostgresCluster, free_port, pg_bindir  # noqa: E402

USER = "bench"
DB = "bench"
POOL_SIZE = 20  # server connections per pool, PgBouncer's and the proxy's
PURE_ENV = "CREDSIDECAR_PURE_PYTHON"  # proxy/build.py: the pure-Python build


@dataclass
class Result:
    tps: float
    latency_ms: float
    failed: int
    transactions: int = 0
    cpu_us: float | None = None  # the target process's user + system time per transaction


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system time of process ``pid`` (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def run_pgbench(
    port: int, password: str, args: list[str], check: bool = False, host: str = "127.0.0.1"
) -> subprocess.CompletedProcess[str]:
    """pgbench ``args`` as the benchmark user against the benchmark database at ``port``
    (``host``: an address, or a unix socket's directory)."""
    return subprocess.run(
        [str(pg_bindir() / "pgbench"), "-h", host, "-p", str(port), "-U", USER, *args, DB],
        env={**os.environ, "PGPASSWORD": password},
        capture_output=True,
        text=True,
        check=check,
    )


def pgbench(
    port: int,
    password: str,
    args: list[str],
    seconds: int,
    clients: int,
    count: int = 0,
    host: str = "127.0.0.1",
) -> Result:
    """``seconds`` of load, or ``count`` transactions per client when given."""
    threads = min(clients, 2)
    load = ["-n", "-c", str(clients), "-j", str(threads)]
    load += ["-t", str(count)] if count else ["-T", str(seconds)]
    out = run_pgbench(port, password, load + args, host=host)
    text = out.stdout + out.stderr
    tps = re.search(r"tps = ([\d.]+)", text)
    lat = re.search(r"latency average = ([\d.]+) ms", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    done = re.search(r"number of transactions actually processed: (\d+)", text)
    if out.returncode != 0 or tps is None or lat is None or done is None:
        raise RuntimeError(f"pgbench failed on port {port}: {text[-1500:]}")
    return Result(
        float(tps.group(1)),
        float(lat.group(1)),
        int(failed.group(1)) if failed else 0,
        int(done.group(1)),
    )


class Target:
    """A process under test, listening on 127.0.0.1:``port``; stopped with SIGTERM."""

    # the user the process runs as (PgBouncer as root: postgres); ptrace, and so
    # callgrind_control, works only from the same user
    as_user: dict[str, Any] = {}
    host = "127.0.0.1"  # what pgbench's -h names: a unix socket's directory for unix rows

    def __init__(self, argv: list[str], port: int, wait: float = 30, **popen: Any) -> None:
        self.port = port
        self.wait = wait  # under valgrind everything takes longer
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.DEVNULL)
        self.proc = subprocess.Popen(argv, **popen)
        wait_port(port, wait)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(self.wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


class PgBouncer(Target):
    def __init__(
        self,
        workdir: Path,
        pg: PostgresCluster,
        password: str,
        mode: str,
        label: str = "",
        prefix: tuple[str, ...] = (),
        unix: bool = False,
    ) -> None:
        port = free_port()
        self.dir = workdir / f"pgbouncer-{label or mode}"
        self.dir.mkdir()
        if unix:  # the socket .s.PGSQL.<port> in its own directory (TCP still: readiness)
            self.host = str(self.dir)
        (self.dir / "userlist.txt").write_text(f'"{USER}" "{password}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{DB} = host=127.0.0.1 port={pg.port} dbname={DB}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
            f"unix_socket_dir = {self.dir if unix else ''}\n"
            f"auth_type = trust\nauth_file = {self.dir / 'userlist.txt'}\n"
            f"pool_mode = {mode}\ndefault_pool_size = {POOL_SIZE}\nmax_client_conn = 1000\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
        )
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self.as_user = kwargs
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        argv = [*prefix, "pgbouncer", str(self.dir / "pgbouncer.ini")]
        super().__init__(argv, port, wait=120 if prefix else 30, **kwargs)


class Proxy(Target):
    """``python -m proxy``; ``pure``: the pure-Python build (``CREDSIDECAR_PURE_PYTHON=1``)."""

    def __init__(
        self,
        workdir: Path,
        pg: PostgresCluster,
        password: str,
        mode: str,
        label: str = "",
        root: Path = ROOT,
        pure: bool = False,
        prefix: tuple[str, ...] = (),
        unix: bool = False,
    ) -> None:
        port = free_port()
        self.dir = workdir / f"proxy-{label or mode}"
        self.dir.mkdir()
        self.creds = self.dir / "db.json"
        self.write_credentials(password)
        # unix: also listen_unix, the socket .s.PGSQL.<port> in this directory
        unix_socket = {"listen_unix": str(self.dir)} if unix else {}
        if unix:
            self.host = str(self.dir)
        config = {
            "proxy": {
                "listen": f"127.0.0.1:{port}",
                **unix_socket,
                "upstream": {"host": "127.0.0.1", "port": pg.port, "sslmode": "disable"},
                "credentials": {"file": str(self.creds)},
                "pool_mode": mode,
                "pool_size": POOL_SIZE,
                "drain_timeout": "10s",
            }
        }
        (self.dir / "proxy.yaml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(self.dir / "proxy.log", "wb")  # noqa: SIM115 - closed in stop()
        argv = [*prefix, sys.executable, "-m", "proxy", "-c", str(self.dir / "proxy.yaml")]
        argv += ["--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
        if pure:
            env[PURE_ENV] = "1"
        # ``-m`` imports the proxy package of ``cwd``: another checkout runs its own code
        super().__init__(
            argv,
            port,
            wait=120 if prefix else 30,
            cwd=root,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def write_credentials(self, password: str) -> None:
        tmp = self.creds.with_suffix(".tmp")
        tmp.write_text(json.dumps({"username": USER, "password": password}))
        os.replace(tmp, self.creds)

    def stop(self) -> None:
        super().stop()
        self.log.close()


class Relay(Target):
    """``benchmarks/relay.py``: the cheapest thing a Python proxy could do (see there)."""

    def __init__(self, pg: PostgresCluster, prefix: tuple[str, ...] = ()) -> None:
        port = free_port()
        relay = str(ROOT / "benchmarks" / "relay.py")
        argv = [*prefix, sys.executable, relay, str(port), str(pg.port)]
        super().__init__(argv, port, wait=120 if prefix else 30)


WORKLOADS = [
    ("-S", ["-S"], 1),
    ("-S", ["-S"], 16),
    ("tpcb", [], 1),
    ("tpcb", [], 16),
    ("-S -C", ["-S", "-C"], 1),
    ("-S -C", ["-S", "-C"], 16),
    ("tpcb -C", ["-C"], 1),
    ("tpcb -C", ["-C"], 16),
]


def soak(
    pg: PostgresCluster, workdir: Path, password: str, seconds: int, workload: list[str]
) -> str:
    """pgbench through the proxy while ALTER ROLE + the credentials file rotate every 5 s."""
    name = "select-only" if workload else "tpcb"
    proxy = Proxy(workdir, pg, password, "transaction", f"soak-{name}")
    stop = threading.Event()
    rotations = [0]

    def rotate() -> None:
        while not stop.wait(5):
            new = "pw-" + secrets.token_hex(12)
            pg.psql(f"ALTER ROLE {USER} PASSWORD '{new}'")
            proxy.write_credentials(new)
            rotations[0] += 1

    thread = threading.Thread(target=rotate, daemon=True)
    thread.start()
    try:
        result = pgbench(proxy.port, "x", workload, seconds, 16)
    finally:
        stop.set()
        thread.join()
        proxy.stop()
        pg.psql(f"ALTER ROLE {USER} PASSWORD '{password}'")  # for whatever runs next
    return (
        f"rotation soak: pgbench {name}, 16 clients, {seconds}s, {rotations[0]} password "
        f"rotations: {result.tps:.0f} tps, {result.failed} failed transactions"
    )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def paired(
    runs: list[Result], peers: list[Result], value: Callable[[Result], float | None]
) -> float | None:
    """The median over rounds of a run's value over its peer's in the same round. This
    machine's speed drifts from one round to the next (a shared VM: the same target
    varies by 20% or more); a ratio within a round cancels the drift, a ratio of the
    two medians does not."""
    ratios = []
    for run, peer in zip(runs, peers, strict=True):
        mine, theirs = value(run), value(peer)
        if mine and theirs:
            ratios.append(mine / theirs)
    return median(ratios) if ratios else None


def tps_of(result: Result) -> float:
    return result.tps


def cpu_of(result: Result) -> float | None:
    return result.cpu_us


def matrix(
    targets: dict[str, Any],
    password: str,
    seconds: int,
    scale: int,
    rows: list[tuple[str, list[str], int]],
    rounds: int,
) -> None:
    """Every row: the targets one after another, ``rounds`` times; medians are printed.

    Interleaving the rounds spreads whatever else the machine does over all targets
    alike, and the median keeps one disturbed run from deciding a ratio.
    """
    runs: dict[tuple[str, str, int], list[Result]] = {}
    for workload, wargs, clients in rows:
        for _ in range(rounds):
            for name, target in targets.items():
                port = target if isinstance(target, int) else target.port
                pid = None if isinstance(target, int) else target.pid
                host = "127.0.0.1" if isinstance(target, int) else target.host
                before = cpu_seconds(pid) if pid else 0.0
                result = pgbench(port, password, wargs, seconds, clients, host=host)
                if pid and result.transactions:
                    spent = cpu_seconds(pid) - before
                    result.cpu_us = spent * 1e6 / result.transactions
                runs.setdefault((name, workload, clients), []).append(result)
    results = {}
    for key, rs in runs.items():
        cpus = [r.cpu_us for r in rs if r.cpu_us is not None]
        results[key] = Result(
            median([r.tps for r in rs]),
            median([r.latency_ms for r in rs]),
            sum(r.failed for r in rs),
            cpu_us=median(cpus) if cpus else None,
        )
    print(
        f"\nPostgreSQL {pg_bindir().parent.name}, {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"pgbench scale {scale}, {seconds}s per run, median of {rounds} interleaved rounds\n"
        "cpu us/tx: user + system time of the target process per transaction "
        "(direct: PostgreSQL's backends, not measured)\n"
        "/bouncer, /direct, cpu/bncr: the median of the ratios within each round\n"
    )
    print(
        f"{'target':<28}{'workload':<10}{'clients':>8}{'tps':>10}{'tps range':>14}"
        f"{'lat ms':>9}{'/bouncer':>10}{'/direct':>9}{'cpu us/tx':>11}{'cpu/bncr':>10}"
    )
    for workload, _, clients in rows:
        for name in targets:
            r = results[(name, workload, clients)]
            tps = [x.tps for x in runs[(name, workload, clients)]]
            spread = f"{min(tps):.0f}-{max(tps):.0f}"
            mine = runs[(name, workload, clients)]
            ratios = cpu = ""
            bouncer = None
            if name.startswith(("proxy", "relay")):
                words = name.split()  # "proxy [pure|unix] <mode> [@base]"; relay: session
                mode = "transaction" if "transaction" in words else "session"
                peer = f"pgbouncer unix {mode}" if "unix" in words else f"pgbouncer {mode}"
                bouncer = runs.get((peer, workload, clients))
                to_bouncer = paired(mine, bouncer, tps_of) if bouncer else None
                to_direct = paired(mine, runs[("direct", workload, clients)], tps_of)
                ratios = f"{to_bouncer:>10.2f}" if to_bouncer else f"{'-':>10}"
                ratios += f"{to_direct:>9.2f}" if to_direct else f"{'-':>9}"
            else:
                ratios = " " * 19
            if r.cpu_us is not None:
                cpu = f"{r.cpu_us:>11.1f}"
                cpu_ratio = paired(mine, bouncer, cpu_of) if bouncer else None
                if cpu_ratio:
                    cpu += f"{cpu_ratio:>10.2f}"
            print(
                f"{name:<28}{workload:<10}{clients:>8}{r.tps:>10.0f}{spread:>14}"
                f"{r.latency_ms:>9.3f}{ratios}{cpu}"
            )
        print()
    if ("direct", "-S", 1) in results:
        direct = runs[("direct", "-S", 1)]
        for name in targets:
            if name != "direct":
                # paired by round, as the ratios are
                gaps = zip(runs[(name, "-S", 1)], direct, strict=True)
                added = median([(run.latency_ms - peer.latency_ms) * 1000 for run, peer in gaps])
                print(f"added latency at 1 client (-S), {name}: {added:.0f} us")
    builds = [(f"proxy {m}", f"proxy pure {m}") for m in ("session", "transaction")]
    pairs = [(c, p) for c, p in builds if c in targets and p in targets]
    if pairs:
        print("\ncompiled / pure Python, same row: tps ratio, cpu per transaction ratio")
        for workload, _, clients in rows:
            cells = []
            for compiled, pure in pairs:
                c, p = runs[(compiled, workload, clients)], runs[(pure, workload, clients)]
                tps, cpu = paired(c, p, tps_of), paired(c, p, cpu_of)
                tps_text = f"{tps:.2f}" if tps else "-"
                cpu_text = f"{cpu:.2f}" if cpu else "-"
                cells.append(f"{compiled.split()[-1]} {tps_text} tps, {cpu_text} cpu")
            print(f"  {workload:<8} {clients:>2} clients: " + "; ".join(cells))


def callgrind_costs(path: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """Total, self cost per function and per object file, from a ``--compress-strings=no``
    dump: a cost line belongs to the current ``fn=``, except the one after ``calls=``
    (that is the callee's inclusive cost)."""
    total = 0
    by_fn: dict[str, int] = {}
    by_ob: dict[str, int] = {}
    ob = fn = "?"
    after_call = False
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("ob="):
            ob = Path(line[3:]).name
        elif line.startswith("fn="):
            fn = line[3:]
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
                continue
            fields = line.split()
            cost = int(fields[1]) if len(fields) > 1 else 0  # a bare position costs nothing
            total += cost
            by_fn[f"{fn} [{ob}]"] = by_fn.get(f"{fn} [{ob}]", 0) + cost
            by_ob[ob] = by_ob.get(ob, 0) + cost
    return total, by_fn, by_ob


CALLGRIND_WORKLOADS = [
    # (label, pgbench arguments, share of --callgrind transactions, pool mode): a login
    # costs ~20x a transaction, and valgrind runs everything ~50x slower; in session
    # pooling a login also costs the reset query (DISCARD ALL) and the settings again;
    # a TPC-B transaction is 7 statements, each a round trip through the proxy
    ("-S", ["-S"], 1.0, "transaction"),
    ("tpcb", [], 0.2, "transaction"),
    ("-S -C", ["-S", "-C"], 0.2, "transaction"),
    ("-S -C", ["-S", "-C"], 0.2, "session"),
]


def instructions(
    pg: PostgresCluster, workdir: Path, password: str, transactions: int, top: int, both: bool
) -> None:
    """Instructions per ``pgbench -S`` and TPC-B transaction (transaction pooling) under
    callgrind, and per ``-S -C`` one (a login, a transaction, a goodbye) in both pool
    modes. The relay (the floor: uvloop and the interpreter, no protocol work) is
    counted in the rows without ``-C``; with it, its cost is PostgreSQL's logins.

    Each target starts under valgrind; after a warm-up, ``callgrind_control --dump``
    zeroes the counters, the transactions run (4 clients), and a second dump holds
    exactly their instructions: start-up and import costs are not counted.
    """
    if not shutil.which("valgrind"):
        print("note: valgrind not installed (apt-get install -y valgrind); instructions skipped")
        return
    clients = 4
    hold = workdir / "hold-a-connection.sql"
    hold.write_text("SELECT pg_sleep(0.2);\n")
    hold.chmod(0o644)  # pgbench runs as postgres when root
    made: list[tuple[str, Any]] = []
    if shutil.which("pgbouncer"):
        made.append(("pgbouncer", "pgbouncer"))
    made.append(("relay", "relay"))
    made.append(("proxy", False))
    if both:
        made.append(("proxy pure", True))
    for workload, wargs, share, mode in CALLGRIND_WORKLOADS:
        per_client = max(int(transactions * share) // clients, 1)
        print(
            f"\ninstructions (callgrind Ir) per pgbench {workload} transaction, {mode} "
            f"pooling, {clients} clients x {per_client} transactions, after a warm-up"
        )
        for base, kind in made:
            if kind == "relay" and "-C" in wargs:
                continue
            name = base if kind == "relay" else f"{base} {mode}"
            label = "cg-" + name.replace(" ", "-") + workload.replace(" ", "").replace("-", "_")
            cgdir = workdir / label
            cgdir.mkdir()
            if os.geteuid() == 0:  # PgBouncer runs as postgres and writes its profile here
                pw = pwd.getpwnam("postgres")
                os.chown(cgdir, pw.pw_uid, pw.pw_gid)
            prefix = (
                "valgrind",
                "--tool=callgrind",
                "--compress-strings=no",  # each dump file names its own functions
                f"--callgrind-out-file={cgdir}/callgrind.out",
            )
            target: Target
            if kind == "pgbouncer":
                target = PgBouncer(workdir, pg, password, mode, label, prefix)
            elif kind == "relay":
                target = Relay(pg, prefix)
            else:
                target = Proxy(workdir, pg, password, mode, label, pure=bool(kind), prefix=prefix)
            try:
                # warm-up: first as many clients as the pool has server connections,
                # each holding one for a while, so that the pool is full and no server
                # login (SCRAM: millions of instructions) falls into the counted
                # transactions (short transactions reuse a few connections, and the
                # counted ones then sometimes needed one more); then the workload
                pgbench(target.port, password, ["-f", str(hold)], 0, POOL_SIZE, count=2)
                pgbench(target.port, password, wargs, 0, POOL_SIZE, count=25)
                control = ["callgrind_control", "--dump", str(target.pid)]
                dump = {"check": True, "capture_output": True, "timeout": 120, **target.as_user}
                subprocess.run(control, **dump)  # .1
                result = pgbench(target.port, password, wargs, 0, clients, count=per_client)
                subprocess.run(control, **dump)  # .2
            finally:
                target.stop()
            measured = cgdir / "callgrind.out.2"  # what the counted transactions cost
            total, by_fn, by_ob = callgrind_costs(measured)
            print(f"  {name:<24} {total / result.transactions:>10,.0f} Ir/transaction")
            if top and kind != "pgbouncer":
                tops = sorted(by_ob.items(), key=lambda kv: -kv[1])[:5]
                share_of = ", ".join(f"{ob} {cost / total:.0%}" for ob, cost in tops)
                print(f"      by object: {share_of}")
                if kind == "relay":
                    continue  # the floor's functions are the event loop's, not ours
                for where, cost in sorted(by_fn.items(), key=lambda kv: -kv[1])[:top]:
                    print(f"      {cost / result.transactions:>8,.0f}  {where[:100]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", 10)))
    parser.add_argument("--soak", type=int, default=60, help="rotation soak seconds (0: skip)")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--skip-matrix", action="store_true", help="only the rotation soak")
    parser.add_argument(
        "--only", default="", help='comma-separated "workload:clients" rows, e.g. "-S:16"'
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs per row")
    parser.add_argument(
        "--compare",
        type=Path,
        help="another checkout (e.g. a git worktree of main): its proxy runs in the same "
        'rounds as rows "proxy <mode> @base"',
    )
    parser.add_argument(
        "--builds",
        choices=["both", "installed"],
        default="both",
        help="the proxy compiled and in pure Python side by side, or the installed build only",
    )
    parser.add_argument(
        "--callgrind",
        type=int,
        default=2000,
        help="transactions counted under callgrind per target (0: skip)",
    )
    parser.add_argument("--top", type=int, default=12, help="top functions by instructions")
    args = parser.parse_args()
    describe = "from proxy import build; print(build.describe())"
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    installed = subprocess.run(
        [sys.executable, "-c", describe], env=env, cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(f"proxy build: {installed}")
    both = args.builds == "both" and installed.startswith("compiled")
    if args.builds == "both" and not both:
        print("note: the install is not compiled; the pure-Python rows would repeat it")

    workdir = Path(tempfile.mkdtemp(prefix="proxybench-"))
    workdir.chmod(0o755)  # PgBouncer runs as postgres and reads its files in here
    pg = PostgresCluster(settings={"max_connections": "400"})
    pg.start()
    password = "pw-" + secrets.token_hex(12)
    targets: dict[str, Any] = {}
    try:
        pg.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{password}'")
        pg.psql(f"CREATE DATABASE {DB} OWNER {USER}")
        run_pgbench(pg.port, password, ["-i", "-q", "-s", str(args.scale)], check=True)
        targets["direct"] = pg.port
        if shutil.which("pgbouncer"):
            for mode in ("session", "transaction"):
                targets[f"pgbouncer {mode}"] = PgBouncer(workdir, pg, password, mode)
            # through unix sockets, both: transaction mode, the one most deployments use
            targets["pgbouncer unix transaction"] = PgBouncer(
                workdir, pg, password, "transaction", "unix", unix=True
            )
        else:
            print("note: pgbouncer not installed (apt-get install -y pgbouncer); skipped")
        targets["relay (floor)"] = Relay(pg)
        for mode in ("session", "transaction"):
            targets[f"proxy {mode}"] = Proxy(workdir, pg, password, mode)
            if both:
                targets[f"proxy pure {mode}"] = Proxy(
                    workdir, pg, password, mode, f"pure-{mode}", pure=True
                )
            if args.compare:
                targets[f"proxy {mode} @base"] = Proxy(
                    workdir, pg, password, mode, f"{mode}-base", args.compare.resolve()
                )
        if "pgbouncer unix transaction" in targets:
            targets["proxy unix transaction"] = Proxy(
                workdir, pg, password, "transaction", "unix", unix=True
            )

        if not args.skip_matrix:
            rows = WORKLOADS
            if args.only:
                wanted = set(args.only.split(","))
                rows = [w for w in WORKLOADS if f"{w[0]}:{w[2]}" in wanted]
            matrix(targets, password, args.seconds, args.scale, rows, args.rounds)
        for target in targets.values():
            if not isinstance(target, int):
                target.stop()
        targets.clear()
        if args.callgrind:
            instructions(pg, workdir, password, args.callgrind, args.top, both)
        if args.soak:
            for workload in (["-S"], []):
                print(soak(pg, workdir, password, args.soak, workload))
    finally:
        for target in targets.values():
            if not isinstance(target, int):
                with contextlib.suppress(Exception):
                    target.stop()
        pg.remove()
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
