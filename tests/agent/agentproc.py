"""Run ``credsidecar`` as a real subprocess, as an operator would, and follow its JSON logs."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from devservers import AUDIT, ROOT_TOKEN, OpenBaoServer, PostgresCluster, free_port
from waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


DB_TEMPLATE = (
    '{"username": {{ secrets.db.username | tojson }}, '
    '"password": {{ secrets.db.password | tojson }}}'
)


def agent_config(openbao: OpenBaoServer, shm: Path, path: str, **extra: Any) -> dict[str, Any]:
    """A config with one database secret ``db`` rendered to ``shm/db.json``, token auth."""
    token_file = shm / "token"
    token_file.write_text(ROOT_TOKEN)
    return {
        "vault": {
            "address": openbao.address,
            "auth": {"method": "token", "token_file": str(token_file)},
        },
        "secrets": {"db": {"kind": "database", "path": path}},
        "templates": [{"destination": str(shm / "db.json"), "contents": DB_TEMPLATE}],
        "state_dir": str(shm / "state"),
        **extra,
    }


async def login_with(path: Path, postgres: PostgresCluster) -> str:
    """Log in to PostgreSQL with a rendered credentials file; returns current_user."""
    import asyncpg

    creds = json.loads(path.read_text())
    AUDIT.secret(creds["password"])
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=postgres.port,
        user=creds["username"],
        password=creds["password"],
        database="postgres",
    )
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the agent's admin API), written here, not taken from agent."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.socket_path))


def unix_request(
    path: Path, method: str, url: str, timeout: float = 60.0
) -> tuple[int, dict[str, Any]]:
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, url)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


class AgentProcess:
    """One ``credsidecar run`` process with its config and logs in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        *,
        health: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.extra_env = dict(env or {})
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if health else None
        if health:
            config = {**config, "health": {"listen": f"127.0.0.1:{self.port}"}}
        config.setdefault("state_dir", str(workdir / "state"))
        self.state_dir = Path(config["state_dir"])
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"agent-{len(list(workdir.glob('agent-*.log')))}.log"
        self.out_path = self.log_path.with_suffix(".out")
        AUDIT.log(self.log_path)
        AUDIT.log(self.out_path)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args, "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            env=self._env(),
        )

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
        return {**env, **self.extra_env}

    def start(self) -> AgentProcess:
        with open(self.log_path, "ab") as err, open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(self.config_path)],
                stdout=out,
                stderr=err,
                cwd=REPO,
                env=self._env(),
                start_new_session=True,
            )
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        try:
            lines = self.log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if name is None or record.get("event") == name:
                out.append(record)
        return out

    def wait_event(self, name: str, timeout: float = 30.0, count: int = 1) -> list[dict[str, Any]]:
        def seen() -> list[dict[str, Any]] | None:
            self._check_alive()
            found = self.events(name)
            return found if len(found) >= count else None

        result: list[dict[str, Any]] = wait_for(seen, timeout, f"{count} x event {name!r}")
        return result

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"agent exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
            )

    def http(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"

    def admin(self, url: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
        """One request to the admin API on the agent's unix socket."""
        return unix_request(self.admin_socket, method, url)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            self._check_alive()
            try:
                return self.http("/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, "/readyz to answer 200")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def kill(self) -> None:
        """kill -9 the agent and whatever it started."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def run_once(
    config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``credsidecar run --once`` on ``config`` (written to ``workdir`` as JSON, which is
    YAML), without our Vault settings; its log is kept for the secret audit."""
    path = workdir / "once.yaml"
    path.write_text(json.dumps(config))
    base = os.environ if env is None else env
    out = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--once", "-c", str(path)],
        capture_output=True,
        text=True,
        env={k: v for k, v in base.items() if not k.startswith(("VAULT_", "BAO_"))},
        cwd=REPO,
        timeout=120,
    )
    log = workdir / "once.log"
    log.write_text(out.stderr)
    AUDIT.log(log)
    return out
