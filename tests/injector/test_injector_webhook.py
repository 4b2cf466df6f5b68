"""The webhook over HTTPS, as the API server calls it: real pod manifests (the injector
examples and the Vault documentation's pods) in, JSONPatches out, patched pods that
validate against Kubernetes 1.29; denials that list every problem; malformed reviews,
oversized and slow requests that get a 4xx (or a closed connection), never a crash."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from devservers import make_test_pki
from injectorproc import (
    EXAMPLES,
    VAULT_DOCS,
    Admission,
    InjectorProcess,
    manifests,
    review_body,
    validate,
)

EXAMPLE_PODS = manifests(EXAMPLES)
DOC_PODS = manifests(VAULT_DOCS)


def assert_native_sidecar(admission: Admission) -> None:
    """The shape the issue asks for, on the pod as the API server would store it."""
    pod = admission.pod
    validate(pod)
    sidecar = admission.sidecar()
    assert sidecar["restartPolicy"] == "Always"
    probe = sidecar["startupProbe"]["httpGet"]
    assert probe["path"] == "/readyz"
    listen = admission.config()["health"]["listen"]
    assert listen == f"0.0.0.0:{probe['port']}"  # the probe reaches the agent's health port
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] > 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["args"] == ["run", "--config-env", "CREDSIDECAR_CONFIG"]
    assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]["memory"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for name in ("credsidecar-files", "credsidecar-state"):
        assert volumes[name]["emptyDir"]["medium"] == "Memory"
        assert volumes[name]["emptyDir"]["sizeLimit"]
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    config = admission.config()
    for template in config["templates"]:
        assert str(Path(template["destination"]).parent) == mounts["credsidecar-files"]
    assert config["state_dir"].startswith(mounts["credsidecar-state"] + "/")
    assert config["vault"]["auth"]["jwt_file"].startswith(mounts["credsidecar-token"] + "/")
    for app in pod["spec"]["containers"]:
        (files,) = [m for m in app["volumeMounts"] if m["name"] == "credsidecar-files"]
        assert files == {
            "name": "credsidecar-files",
            "mountPath": mounts["credsidecar-files"],
            "readOnly": True,
        }
    assert pod["metadata"]["annotations"]["credsidecar.io/status"] == "injected"


@pytest.mark.parametrize(("name", "pod", "expect"), EXAMPLE_PODS, ids=[p[0] for p in EXAMPLE_PODS])
def test_example_pods_are_injected_and_validate(
    injector: InjectorProcess, name: str, pod: dict[str, Any], expect: str
) -> None:
    validate(pod)  # the manifest itself is a valid pod
    admission = injector.admit(pod)
    assert admission.allowed and admission.patch, admission.response
    if name == "job.yaml":
        validate(admission.pod)
        (sidecar,) = admission.pod["spec"]["initContainers"]
        assert "restartPolicy" not in sidecar and "startupProbe" not in sidecar
        assert sidecar["args"][-1] == "--once"
        assert "health" not in admission.config()
    else:
        assert_native_sidecar(admission)
    if name == "app.yaml":
        assert admission.pod["spec"]["shareProcessNamespace"] is True
        notify = admission.config()["notify"]["app"]
        assert notify == {"signal": "SIGHUP", "process": r"^(python\ /app/app\.py)(\s|$)"}
        assert admission.sidecar()["securityContext"]["runAsUser"] == 65532
        assert {t["perms"] for t in admission.config()["templates"]} == {"0600"}
    else:
        assert "shareProcessNamespace" not in admission.pod["spec"]
    if name == "proxy.yaml":
        (app,) = admission.pod["spec"]["containers"]
        env = {e["name"]: e["value"] for e in app["env"]}
        assert env == {"PGHOST": "127.0.0.1", "PGPORT": "6432"}
        assert admission.config()["proxy"]["listen"] == "127.0.0.1:6432"
    # idempotent: the injected pod comes back (reinvocation) and is left alone
    again = injector.admit(admission.pod)
    assert again.allowed and not again.patch


@pytest.mark.parametrize(("name", "pod", "expect"), DOC_PODS, ids=[p[0] for p in DOC_PODS])
def test_vault_documentation_pods(
    injector: InjectorProcess, name: str, pod: dict[str, Any], expect: str
) -> None:
    admission = injector.admit(pod)
    verdict, *names = expect.split()
    if verdict == "deny":
        assert not admission.allowed and not admission.patch
        for annotation in names:
            assert annotation in admission.message, admission.message
        return
    assert admission.allowed and admission.patch, admission.message
    assert_native_sidecar(admission)
    files = {Path(t["destination"]).name for t in admission.config()["templates"]}
    declared = {
        k.removeprefix("vault.hashicorp.com/agent-inject-secret-")
        for k in pod["metadata"]["annotations"]
        if k.startswith("vault.hashicorp.com/agent-inject-secret-")
    }
    assert files == declared
    for template in admission.config()["templates"]:
        assert template["destination"].startswith("/vault/secrets/")
    annotations = admission.pod["metadata"]["annotations"]
    assert annotations["vault.hashicorp.com/agent-inject-status"] == "injected"
    assert injector.admit(admission.pod).patch == []


def bad_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "bad",
            "namespace": "shop",
            "annotations": {
                "credsidecar.io/inject": "true",
                "credsidecar.io/secret-db": "kv1/app",  # kind unknown
                "credsidecar.io/secret-tls": "pki/issue/web",  # needs common_name
                "credsidecar.io/template-out": "{{ secrets.missing.x }}",
                "credsidecar.io/template-broken": "{{ secrets.db.x ",
                "credsidecar.io/memory-limit": "lots",
                "credsidecar.io/notify": "SIGNOPE",
                "credsidecar.io/frobnicate": "yes",
                "credsidecar.io/containers": "app,ghost",
                "credsidecar.io/proxy": "db",
            },
        },
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }


EVERY_PROBLEM = [
    "credsidecar.io/proxy: needs credsidecar.io/proxy-upstream: host:port",
    'credsidecar.io/secret-db: cannot tell the kind from the path "kv1/app"',
    "credsidecar.io/secret-tls: a pki secret needs credsidecar.io/secret-tls-params",
    'credsidecar.io/template-out: uses secrets["missing"]',
    "credsidecar.io/template-broken: template /run/credsidecar/broken line 1: syntax error",
    'credsidecar.io/memory-limit: "lots" is not a Kubernetes quantity',
    'credsidecar.io/notify: "SIGNOPE" is not a signal name',
    "credsidecar.io/frobnicate: unknown annotation",
    'credsidecar.io/containers: "ghost" is not a container of this pod',
]


def test_invalid_annotations_are_denied_with_every_problem(injector: InjectorProcess) -> None:
    admission = injector.admit(bad_pod())
    assert not admission.allowed and not admission.patch
    assert admission.response["status"]["code"] == 400
    assert admission.message.startswith("credsidecar injector refused pod shop/bad: ")
    for problem in EVERY_PROBLEM:
        assert problem in admission.message, f"{problem!r} missing from {admission.message}"


def test_the_warn_setting_allows_unchanged_and_warns(start_injector: Any, openbao: Any) -> None:
    lenient = start_injector(on_invalid="warn", vault_address=openbao.address)
    admission = lenient.admit(bad_pod())
    assert admission.allowed and "patch" not in admission.response
    warnings = "\n".join(admission.response["warnings"])
    for problem in EVERY_PROBLEM:
        assert problem in warnings


def test_pods_not_asking_are_left_alone(injector: InjectorProcess) -> None:
    plain = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "image": "a"}]},
    }
    assert injector.admit(plain).patch == [] and "patch" not in injector.admit(plain).response
    off = copy.deepcopy(plain)
    off["metadata"]["annotations"] = {"credsidecar.io/inject": "false", "credsidecar.io/role": "x"}
    assert "patch" not in injector.admit(off).response
    _, pod, _ = EXAMPLE_PODS[0]
    for operation in ("UPDATE", "DELETE"):
        assert "patch" not in injector.admit(pod, operation).response


def test_vault_migration_can_be_turned_off(start_injector: Any, openbao: Any) -> None:
    off = start_injector(vault_compat=False, vault_address=openbao.address)
    (_, pod, _) = next(p for p in DOC_PODS if p[0] == "environment.yaml")
    admission = off.admit(pod)
    assert admission.allowed and "patch" not in admission.response


def test_a_template_the_migration_cannot_translate_names_the_construct(
    injector: InjectorProcess,
) -> None:
    a = '{{ with secret "secret/data/a" }}'
    cases = {
        a + "{{ if .Data.data.x }}y{{ end }}{{ end }}": "{{ if }}",
        a + "{{ .Data.metadata.version }}{{ end }}": "KV v2 metadata",
        a + '{{ printf "%q" .Data.data.x }}{{ end }}': "printf verb %q",
        a + "{{ .Data.data.x | sha256Hex }}{{ end }}": "the function sha256Hex",
        a + "{{ $x := .Data.data.x }}{{ end }}": "variable declarations",
        "{{ .Data.password }}": "outside a {{ with secret ... }} block",
        a + "no end": "{{ with }} without {{ end }}",
        '{{ with pkiCert "secret/data/a" }}{{ .Cert }}{{ end }}': "is not a <mount>/issue/",
    }
    for template, construct in cases.items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "t",
                "annotations": {
                    "vault.hashicorp.com/agent-inject": "true",
                    "vault.hashicorp.com/role": "r",
                    "vault.hashicorp.com/agent-inject-secret-f": "secret/data/a",
                    "vault.hashicorp.com/agent-inject-template-f": template,
                },
            },
            "spec": {"containers": [{"name": "a", "image": "a"}]},
        }
        admission = injector.admit(pod)
        assert not admission.allowed, template
        expected = "vault.hashicorp.com/agent-inject-template-f: cannot translate: "
        assert expected in admission.message and construct in admission.message, admission.message


# --------------------------------------------------------------------------- hostile input


def raw_exchange(injector: InjectorProcess, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes over TLS; return everything the server answers until it closes."""
    tcp = socket.create_connection(("127.0.0.1", injector.port), timeout=timeout)
    with tcp, injector.context.wrap_socket(tcp, server_hostname="localhost") as tls:
        tls.sendall(data)
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_malformed_reviews_get_400_with_a_reason(injector: InjectorProcess) -> None:
    good = review_body(EXAMPLE_PODS[0][1])
    no_uid = copy.deepcopy(good)
    del no_uid["request"]["uid"]
    not_a_pod = copy.deepcopy(good)
    not_a_pod["request"]["object"] = ["not", "a", "pod"]
    no_containers = copy.deepcopy(good)
    no_containers["request"]["object"]["spec"] = {"containers": "app"}
    cases: dict[bytes, str] = {
        b"{not json": "the body is not JSON",
        b"\xff\xfe": "the body is not JSON",
        b"[]": "not a JSON object",
        json.dumps(
            {**good, "apiVersion": "admission.k8s.io/v1beta1"}
        ).encode(): "not an AdmissionReview",
        json.dumps({**good, "request": None}).encode(): "request is missing",
        json.dumps(no_uid).encode(): "request.uid is missing",
        json.dumps(not_a_pod).encode(): "request.object is not a pod",
        json.dumps(no_containers).encode(): "containers is not a list",
    }
    for body, reason in cases.items():
        status, answer = injector.request("POST", "/mutate", body)
        assert status == 400, (body, answer)
        assert reason in json.loads(answer)["error"]
    assert injector.request("GET", "/mutate")[0] == 405
    assert injector.request("GET", "/nothing")[0] == 404
    assert injector.alive()


def test_a_body_over_the_limit_is_refused(start_injector: Any, openbao: Any) -> None:
    small = start_injector(max_body=64 * 1024, vault_address=openbao.address)
    pod = copy.deepcopy(EXAMPLE_PODS[0][1])
    pod["metadata"]["annotations"]["padding"] = "x" * (128 * 1024)
    status, answer = small.request("POST", "/mutate", json.dumps(review_body(pod)).encode())
    assert status == 413 and b"body over 65536 bytes" in answer
    assert small.admit(EXAMPLE_PODS[0][1]).allowed  # and the next request is served


def test_slow_clients_are_cut_off_and_others_served(start_injector: Any, openbao: Any) -> None:
    quick = start_injector(request_timeout="1s", vault_address=openbao.address)
    started = time.monotonic()
    # headers that never end, then a body that never comes: the server closes both
    answer = raw_exchange(quick, b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-")
    assert answer == b""
    body_pending = b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    answer = raw_exchange(quick, body_pending)
    assert answer.startswith(b"HTTP/1.1 408") or answer == b"", answer
    assert time.monotonic() - started < 25  # cut off, not waited on forever
    # a TCP client that never starts TLS is dropped as well
    with socket.create_connection(("127.0.0.1", quick.port), timeout=30) as idle:
        assert idle.recv(1) == b""
    assert quick.admit(EXAMPLE_PODS[0][1]).allowed


def test_connections_beyond_the_limit_are_closed(start_injector: Any, openbao: Any) -> None:
    narrow = start_injector(max_connections=2, vault_address=openbao.address)
    held = [narrow.connection() for _ in range(2)]
    try:
        for conn in held:
            conn.request("GET", "/healthz")
            assert conn.getresponse().read()
        with pytest.raises((ConnectionError, ssl.SSLError, *http_errors())):
            extra = narrow.connection()
            extra.request("GET", "/healthz")
            extra.getresponse().read()
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert narrow.request("GET", "/healthz")[0] == 200
            break
        except (ConnectionError, ssl.SSLError, *http_errors()):
            assert time.monotonic() < deadline, "connections stayed refused"
            time.sleep(0.05)


def http_errors() -> tuple[type[Exception], ...]:
    import http.client

    return (http.client.RemoteDisconnected, http.client.BadStatusLine)


# --------------------------------------------------------------------------- TLS rotation


def served_certificate(injector: InjectorProcess) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tcp = socket.create_connection(("127.0.0.1", injector.port), timeout=30)
    with tcp, context.wrap_socket(tcp, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_rotated_tls_files_are_served_without_a_restart(
    start_injector: Any, openbao: Any, tmp_path: Path
) -> None:
    process = start_injector(vault_address=openbao.address)
    before = served_certificate(process)
    fresh = make_test_pki(tmp_path / "rotated", "localhost")
    # a half-done rotation (new certificate, old key) keeps the old pair in service
    shutil.copy(fresh["cert"], process.pki["cert"])
    assert served_certificate(process) == before
    assert process.request("GET", "/healthz")[0] == 200
    shutil.copy(fresh["key"], process.pki["key"])
    after = served_certificate(process)
    assert after != before
    process.context = ssl.create_default_context(cafile=str(fresh["ca"]))
    assert process.admit(EXAMPLE_PODS[0][1]).allowed  # verified against the new CA
    assert process.alive()


def pod_with(annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "shop", "annotations": annotations},
        "spec": {
            "serviceAccountName": "shop",
            "containers": [{"name": "app", "image": "app:1"}],
            **spec,
        },
    }


def test_config_map_mode_resources_placement_and_vault_ca(injector: InjectorProcess) -> None:
    setup = {"name": "setup", "image": "busybox", "command": ["true"]}
    admission = injector.admit(
        pod_with(
            {
                "credsidecar.io/inject": "true",
                "credsidecar.io/config": "shop-credsidecar",
                "credsidecar.io/cpu-limit": "250m",
                "credsidecar.io/memory-request": "32Mi",
                "credsidecar.io/init-first": "true",
                "credsidecar.io/tls-secret": "vault-ca",
            },
            initContainers=[setup],
        )
    )
    assert admission.allowed, admission.message
    validate(admission.pod)
    first, second = admission.pod["spec"]["initContainers"]
    assert (first["name"], second) == ("credsidecar", setup)  # init-first: before setup
    assert first["args"] == ["run", "-c", "/etc/credsidecar/config.yaml"] and "env" not in first
    assert first["resources"] == {
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"cpu": "250m", "memory": "96Mi"},
    }
    volumes = {v["name"]: v for v in admission.pod["spec"]["volumes"]}
    assert volumes["credsidecar-config"]["configMap"] == {"name": "shop-credsidecar"}
    assert volumes["credsidecar-tls"]["secret"] == {"secretName": "vault-ca"}
    mounts = {m["name"]: m["mountPath"] for m in first["volumeMounts"]}
    assert mounts["credsidecar-config"] == "/etc/credsidecar"
    assert mounts["credsidecar-tls"] == "/etc/credsidecar-tls"

    clash = injector.admit(
        pod_with(
            {
                "credsidecar.io/inject": "true",
                "credsidecar.io/config": "shop-credsidecar",
                "credsidecar.io/secret-db": "database/creds/app",
            }
        )
    )
    assert not clash.allowed
    assert (
        "credsidecar.io/secret-db: cannot be combined with credsidecar.io/config" in clash.message
    )


def test_vault_file_perms_command_and_pre_populate_only(injector: InjectorProcess) -> None:
    prefix = "vault.hashicorp.com/"
    admission = injector.admit(
        pod_with(
            {
                prefix + "agent-inject": "true",
                prefix + "role": "shop",
                prefix + "agent-pre-populate-only": "true",
                prefix + "agent-inject-secret-DB": "database/creds/app",
                prefix + "agent-inject-file-DB": "db.env",
                prefix + "agent-inject-perms-DB": "0640",
                prefix + "agent-inject-command-DB": "pkill -HUP app || true",
                prefix + "agent-inject-secret-Api": "secret/data/api",
                prefix + "preserve-secret-case-Api": "true",
                prefix + "secret-volume-path": "/etc/secrets",
            },
            securityContext={"runAsUser": 1000, "fsGroup": 2000},
        )
    )
    assert admission.allowed, admission.message
    validate(admission.pod)
    (sidecar,) = admission.pod["spec"]["initContainers"]
    assert sidecar["args"][-1] == "--once" and "restartPolicy" not in sidecar
    assert sidecar["securityContext"]["runAsUser"] == 1000  # the app's own uid
    config = admission.config()
    files = {t["destination"]: t["perms"] for t in config["templates"]}
    assert files == {"/etc/secrets/db.env": "0640", "/etc/secrets/Api": "0600"}
    assert config["notify"] == {
        "command-db": {"command": ["/bin/sh", "-c", "pkill -HUP app || true"]}
    }
    # each file triggers only its own command (the api file has none)
    notifies = {t["destination"]: t["notify"] for t in config["templates"]}
    assert notifies == {"/etc/secrets/db.env": ["command-db"], "/etc/secrets/Api": []}
    assert {s["kind"] for s in config["secrets"].values()} == {"database", "kv"}


def test_a_pod_asking_for_too_many_files_is_denied_before_any_compiling(
    injector: InjectorProcess,
) -> None:
    annotations = {"credsidecar.io/inject": "true"}
    for n in range(101):
        annotations[f"credsidecar.io/template-f{n}"] = "{{ secrets.db.password }}"
    admission = injector.admit(pod_with(annotations))
    assert not admission.allowed
    assert "credsidecar.io/inject: 101 files asked for; at most 100 per pod" in admission.message
    assert "template-f" not in admission.message  # nothing was compiled
