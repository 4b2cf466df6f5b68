"""The shipped examples: every file parses, refers to real files and config keys, and
the sample app and the compose setup script work against the real servers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import demo
import procs
import pytest
import yaml
from app import FIELDS, read_credentials
from devservers import ROOT_TOKEN, OpenBaoServer, PostgresCluster

from agent.config import Config, load_config, parse_config
from agent.render import Template
from agent.secret import SecretValue

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
COMPOSE = EXAMPLES / "docker-compose.yml"
K8S = EXAMPLES / "k8s"


def yaml_files() -> list[Path]:
    return sorted(p for ext in ("*.yaml", "*.yml") for p in EXAMPLES.rglob(ext))


def documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in documents(p) if "kind" in d]


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in k8s_objects() if o["kind"] == kind and name in (None, o["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {K8S}, found {len(found)}"
    return found[0]


def configmap_config() -> dict[str, Any]:
    text = k8s_object("ConfigMap", "credsidecar-config")["data"]["config.yaml"]
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict)
    return raw


def render_all(config: Config) -> list[bytes]:
    """Render every template of a config with made-up database credentials."""
    fake = SecretValue(
        name="db",
        data={"username": "v-example-user", "password": 'p"w\\x'},
        version="database/creds/app/x",
        lease_id="database/creds/app/x",
        lease_duration=60,
        renewable=True,
    )
    return [Template(t).render({"db": fake}) for t in config.templates]


# --------------------------------------------------------------------------- static checks


def test_every_example_yaml_parses() -> None:
    files = yaml_files()
    assert COMPOSE in files and (EXAMPLES / "configs" / "compose.yaml") in files
    for path in files:
        assert documents(path), f"{path} is empty"


def test_shipped_credsidecar_configs_validate_and_feed_the_app() -> None:
    # every config we ship: the files under configs/ and the one in the k8s ConfigMap
    configs = [load_config(p, env={}) for p in sorted((EXAMPLES / "configs").glob("*.yaml"))]
    configs.append(parse_config(configmap_config(), base_dir=Path("/etc/credsidecar"), env={}))
    assert len(configs) >= 2
    for config in configs:
        # the app's contract: the rendered JSON has every field app.py reads
        assert config.secrets["db"].kind == "database"
        (rendered,) = render_all(config)
        creds = json.loads(rendered)
        assert set(FIELDS) <= set(creds)
        assert creds["password"] == 'p"w\\x'  # quoting survives the template
        # on the volume shared with the app (checked per deployment below)
        assert config.templates[0].destination.parent == Path("/run/credsidecar")


def test_shell_scripts_parse() -> None:
    scripts = sorted(EXAMPLES.rglob("*.sh"))
    assert len(scripts) >= 2
    for script in scripts:
        done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"


def test_compose_refers_to_real_files_and_services() -> None:
    (compose,) = documents(COMPOSE)
    services = compose["services"]
    assert {"openbao", "postgres", "setup", "credsidecar", "app"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (EXAMPLES / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: unknown volume {source}"
    build = services["credsidecar"]["build"]
    assert (EXAMPLES / build["context"] / build["dockerfile"]).is_file()

    # the config credsidecar is told to load is the one we validate above
    cmd = services["credsidecar"]["command"]
    assert cmd[:2] == ["run", "-c"]
    host_dir, container_dir = next(
        m.split(":")[:2] for m in services["credsidecar"]["volumes"] if m.startswith("./configs")
    )
    config_path = EXAMPLES / host_dir / Path(cmd[2]).relative_to(container_dir)
    assert config_path == EXAMPLES / "configs" / "compose.yaml"

    # app and sidecar: shared pid namespace, same uid, same in-memory credentials volume
    app = services["app"]
    assert app["pid"] == "service:credsidecar"
    assert app["user"].split(":")[0] == "65532"
    assert_app_env_matches(app["environment"], load_config(config_path, env={}))
    shared = {m.split(":")[0] for m in app["volumes"]} & {
        m.split(":")[0] for m in services["credsidecar"]["volumes"]
    }
    assert shared == {"credentials"}
    for volume in compose["volumes"].values():
        assert volume["driver_opts"]["type"] == "tmpfs"


def assert_app_env_matches(env: dict[str, str], config: Config) -> None:
    """The app reads the file credsidecar renders and writes the pid file it signals."""
    (target,) = config.notify.values()
    assert Path(env["APP_PID_FILE"]) == target.pid_file
    assert Path(env["APP_CREDENTIALS"]) == config.templates[0].destination


def test_kubernetes_pod_is_a_native_sidecar() -> None:
    deployment = k8s_object("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "credsidecar"]
    assert sidecar["restartPolicy"] == "Always"
    probe = sidecar["startupProbe"]["httpGet"]
    assert probe["path"] == "/readyz"
    port_names = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert probe["port"] in port_names
    # the probe hits the port the config listens on
    assert configmap_config()["health"]["listen"].endswith(f":{port_names[probe['port']]}")
    assert sidecar["args"] == ["run", "-c", "/etc/credsidecar/config.yaml"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    creds = volumes["credentials"]["emptyDir"]
    assert creds["medium"] == "Memory" and creds["sizeLimit"]
    for container in [sidecar, *pod["containers"]]:
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes, f"{container['name']}: unknown volume"
    (app,) = pod["containers"]
    assert {m["name"] for m in app["volumeMounts"]} >= {"credentials"}
    config = parse_config(configmap_config(), base_dir=Path("/etc/credsidecar"), env={})
    assert_app_env_matches({e["name"]: e["value"] for e in app["env"]}, config)
    # same uid in both containers (pod-wide), or the sidecar may not signal the app
    for container in (sidecar, app):
        assert "runAsUser" not in container.get("securityContext", {})

    # referenced objects exist: service account, config maps (manifest or generator)
    k8s_object("ServiceAccount", pod["serviceAccountName"])
    kustomization = documents(K8S / "kustomization.yaml")[0]
    generated = {g["name"] for g in kustomization.get("configMapGenerator", [])}
    for volume in volumes.values():
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            assert name in generated or k8s_object("ConfigMap", name)
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()
    for generator in kustomization.get("configMapGenerator", []):
        for file in generator["files"]:
            assert (K8S / file).is_file()
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_kubernetes_exposes_only_probes_and_metrics() -> None:
    """The pod network reaches probes and metrics only; the admin API stays in the sidecar."""
    from agent.http import build_app

    pod = k8s_object("Deployment")["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "credsidecar"]
    assert [p["name"] for p in sidecar["ports"]] == ["health"]
    for container in pod["containers"]:
        assert not container.get("ports"), f"{container['name']} exposes ports"
    raw = configmap_config()
    config = parse_config(raw, base_dir=Path("/etc/credsidecar"), env={})
    # what listens on the pod network serves GET probes and metrics, nothing else
    app = build_app(object())  # type: ignore[arg-type]  # listing routes calls nothing
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    assert routes == {
        (method, path) for path in ("/healthz", "/readyz", "/metrics") for method in ("GET", "HEAD")
    }
    assert config.health is not None
    assert config.health.listen_port == sidecar["ports"][0]["containerPort"]
    # the admin API: the default unix socket in state_dir, no TCP listener
    assert "admin" not in raw and config.admin is not None
    assert config.admin.listen_host is None
    assert config.admin.socket == config.state_dir / "admin.sock"
    # state_dir is a directory the agent creates on the sidecar's own memory volume
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    (mount,) = [p for p in mounts if config.state_dir.is_relative_to(p)]
    assert config.state_dir != Path(mount), "an emptyDir root is world-writable: use a subdir"
    volume = mounts[mount]
    assert {v["name"]: v for v in pod["volumes"]}[volume]["emptyDir"]["medium"] == "Memory"
    for container in pod["containers"]:
        assert volume not in {m["name"] for m in container["volumeMounts"]}


def test_dockerfile_is_non_root_and_runs_credsidecar() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sum(line.startswith("FROM ") for line in lines) >= 2  # multi-stage
    (user,) = [line for line in lines if line.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert 'ENTRYPOINT ["credsidecar"]' in lines
    assert 'CMD ["run", "-c", "/etc/credsidecar/config.yaml"]' in lines
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}: missing"
    ignore = (ROOT / ".dockerignore").read_text()
    assert "!agent/" in ignore and "!proxy/" in ignore


# --------------------------------------------------------------------------- the sample app


class Lines:
    """A child's stdout, line by line, with a wait-until helper."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))

    def join(self) -> None:
        self._thread.join(10)

    def wait_for(self, match: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            if match(line):
                return line
        raise AssertionError(f"no matching line within {timeout}s; saw: {self.seen[-10:]}")


@contextlib.contextmanager
def run_app(*args: str) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """examples/app.py as a child; killed and reaped whatever the test does."""
    with subprocess.Popen(
        [sys.executable, str(EXAMPLES / "app.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        out = Lines(proc.stdout)
        try:
            yield proc, out
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            out.join()


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # what credsidecar does: the app never reads half a file


@pytest.fixture
def roles(postgres: PostgresCluster) -> Iterator[dict[str, str]]:
    """Three login roles with random passwords, dropped afterwards."""
    tag = secrets.token_hex(3)
    made = {f"ex_app_{tag}_{n}": secrets.token_urlsafe(18) for n in "abc"}
    for user, password in made.items():
        postgres.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
    yield made
    for user in made:
        postgres.psql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{user}'"
        )
        postgres.psql(f"DROP ROLE IF EXISTS {user}")


def test_app_queries_switches_on_sighup_and_recovers(
    postgres: PostgresCluster, roles: dict[str, str], tmp_path: Path
) -> None:
    (a, pa), (b, pb), (c, pc) = roles.items()
    creds, pid_file = tmp_path / "db.json", tmp_path / "app.pid"

    def login(user: str, password: str) -> dict[str, Any]:
        return {
            "username": user,
            "password": password,
            "host": "127.0.0.1",
            "port": postgres.port,
            "database": "postgres",
        }

    write_json(creds, login(a, pa))
    assert read_credentials(creds)["username"] == a
    with run_app("--credentials", str(creds), "--pid-file", str(pid_file), "--interval", "0.2") as (
        proc,
        out,
    ):
        out.wait_for(lambda line: line == f"app query ok user={a}")
        assert int(pid_file.read_text()) == proc.pid

        # the main path: new credentials, then SIGHUP
        write_json(creds, login(b, pb))
        proc.send_signal(signal.SIGHUP)
        out.wait_for(lambda line: line == f"app query ok user={b}")

        # the robust path: no signal, the old login is cut off; the app re-reads the file
        write_json(creds, login(c, pc))
        postgres.psql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{b}'"
        )
        out.wait_for(lambda line: line == f"app query ok user={c}")

        proc.send_signal(signal.SIGTERM)
        out.wait_for(lambda line: line == "app stopped")
        assert proc.wait(30) == 0
    assert not pid_file.exists()
    failures = [line for line in out.seen if "failed" in line]
    assert all(f"user={b}" in line for line in failures), failures  # only the cut-off login
    output = "\n".join(out.seen)
    for password in roles.values():
        assert password not in output


def test_app_waits_for_the_credentials_file(tmp_path: Path) -> None:
    with run_app("--credentials", str(tmp_path / "none.json")) as (proc, out):
        out.wait_for(lambda line: line.startswith("app waiting for credentials"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


# --------------------------------------------------------------------------- compose setup script


def test_compose_setup_script_grants_only_the_app_role(
    openbao: OpenBaoServer, postgres: PostgresCluster, tmp_path: Path
) -> None:
    """Runs examples/compose/setup.sh against the test servers, then logs in as credsidecar
    would with the AppRole ids it left behind."""
    import hvac
    from hvac.exceptions import Forbidden

    tag = secrets.token_hex(3)
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "BAO_ADDR": openbao.address,
        "BAO_TOKEN": ROOT_TOKEN,
        "POSTGRES_PASSWORD": postgres.password,
        "PG_HOST": "127.0.0.1",
        "PG_PORT": str(postgres.port),
        "PG_DATABASE": "postgres",
        "DB_MOUNT": f"ex-db-{tag}",
        "AUTH_MOUNT": f"ex-approle-{tag}",
        "BOOTSTRAP_DIR": str(tmp_path),
    }
    done = subprocess.run(
        ["sh", str(EXAMPLES / "compose" / "setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    assert postgres.password not in done.stdout + done.stderr
    assert (tmp_path / "secret-id").stat().st_mode & 0o077 == 0

    client = hvac.Client(url=openbao.address)
    client.auth.approle.login(
        role_id=(tmp_path / "role-id").read_text().strip(),
        secret_id=(tmp_path / "secret-id").read_text().strip(),
        mount_point=env["AUTH_MOUNT"],
    )
    creds = client.secrets.database.generate_credentials("app", mount_point=env["DB_MOUNT"])
    assert creds["data"]["username"]
    client.sys.renew_lease(creds["lease_id"])
    client.sys.revoke_lease(creds["lease_id"])
    with pytest.raises(Forbidden):
        client.secrets.kv.v2.read_secret_version("anything", raise_on_deleted_version=True)


# --------------------------------------------------------------------------- demo and benchmark


def test_demo_config_validates_and_feeds_the_app(
    openbao: OpenBaoServer, postgres: PostgresCluster, tmp_path: Path
) -> None:
    path, health_port = demo.write_config(tmp_path, openbao, postgres)
    config = load_config(path, env={})
    assert config.health is not None and config.health.listen_port == health_port
    assert config.exec is not None and Path(config.exec.command[1]) == EXAMPLES / "app.py"
    (rendered,) = render_all(config)
    creds = json.loads(rendered)
    assert set(FIELDS) <= set(creds) and creds["port"] == postgres.port
    token_file = config.vault.auth.token_file if config.vault else None
    assert token_file is not None and token_file.stat().st_mode & 0o077 == 0


def test_demo_event_lines_are_readable_and_hide_noise() -> None:
    issued = {"event": "issued", "level": "info", "secret": "db", "ttl": 6.0,
              "version": "database/creds/app/AbCdEfGhIjKlMnOpQrStUvWx"}  # fmt: skip
    line = demo.agent_line(json.dumps(issued))
    assert line is not None
    assert line.split()[:3] == ["agent", "issued", "secret=db"]
    assert "version=…OpQrStUvWx" in line and "database/creds" not in line
    assert demo.agent_line(json.dumps({"event": "listening", "level": "info"})) is None
    warning = demo.agent_line(json.dumps({"event": "anything", "level": "warning"}))
    assert warning is not None and "anything" in warning
    assert demo.app_line("app query ok user=u1") == "app    query ok user=u1"


def load_benchmark() -> Any:
    # "agent" is our package's name: load the benchmark script under another one
    spec = importlib.util.spec_from_file_location("bench_agent", ROOT / "benchmarks" / "agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_benchmark_credsidecar_config_validates(tmp_path: Path) -> None:
    bench = load_benchmark()
    contender = bench.setup_credsidecar(tmp_path, "http://127.0.0.1:8200", tmp_path / "token")
    config = load_config(Path(contender.command[-1]), env={})
    (secret,) = config.secrets.values()
    assert (secret.kind, secret.refresh) == ("kv", 1.0)
    assert config.templates[0].destination == contender.output


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def agent_pid(workdir: Path) -> int:
    """The demo's agent: the one process with our temp dir and ``run -c`` in its argv."""
    (pid,) = [
        p
        for p in procs.mentioning(str(workdir))
        if b"\0run\0-c\0" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    return pid


@pytest.mark.slow
@pytest.mark.timeout(300)  # starts its own servers: generous on a loaded machine
@pytest.mark.parametrize("ending", ["ctrl-c", "agent killed"])
@pytest.mark.servers
def test_demo_runs_and_leaves_nothing_behind(ending: str) -> None:
    with subprocess.Popen(
        [sys.executable, str(EXAMPLES / "demo.py"), "--duration", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as proc:
        assert proc.stdout is not None
        out = Lines(proc.stdout)
        try:
            header = out.wait_for(lambda line: "OpenBao http://" in line, timeout=90)
            started = out.wait_for(lambda line: "running credsidecar" in line)
            workdir = Path(started.split("(config ")[1].rstrip(")")).parent
            out.wait_for(lambda line: " agent  issued " in line, timeout=60)
            out.wait_for(lambda line: " app    query ok user=v-" in line, timeout=60)
            if ending == "ctrl-c":
                proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground
                expected_rc = 0
            else:
                os.kill(agent_pid(workdir), signal.SIGKILL)  # the app is orphaned
                out.wait_for(lambda line: "the agent exited with code -9" in line)
                expected_rc = 1
            out.wait_for(lambda line: "nothing left running" in line, timeout=90)
            assert proc.wait(30) == expected_rc
        finally:
            if proc.poll() is None:  # the test failed: let the demo clean up after itself
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            out.join()
    bao_port = int(header.split("OpenBao http://127.0.0.1:")[1].split(",")[0])
    pg_port = int(header.split("PostgreSQL 127.0.0.1:")[1].split(",")[0])
    assert not workdir.exists()
    assert not port_open(bao_port) and not port_open(pg_port)
    assert procs.mentioning(str(workdir)) == []
