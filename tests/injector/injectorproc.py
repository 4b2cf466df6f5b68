"""A running ``credsidecar injector`` and the API server's side of the conversation
(shared by the injector tests and ``benchmarks/injector.py``).

No Kubernetes API server runs here, so the tests talk to the webhook the way one does:
a pod manifest wrapped in an AdmissionReview, POSTed over HTTPS (verifying the
webhook's certificate against the test CA); the answer's JSONPatch applied with
``jsonpatch``; the patched pod validated against the 1.29 OpenAPI schema.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import yaml
from devservers import AUDIT, free_port, make_test_pki

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.29.0"  # the oldest Kubernetes with native sidecars


def validate(obj: dict[str, Any]) -> None:
    """Raises when ``obj`` does not validate (strict: no unknown fields) against 1.29."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def pod_of(document: dict[str, Any]) -> dict[str, Any]:
    """The pod a manifest creates: itself, or the template of a Deployment/Job/..."""
    if document["kind"] == "Pod":
        return document
    template = document["spec"]["template"]
    metadata = dict(template.get("metadata") or {})
    metadata.setdefault("namespace", document["metadata"].get("namespace", "default"))
    metadata.setdefault("generateName", document["metadata"]["name"] + "-")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def review_body(pod: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": False,
        },
    }


@dataclass
class Admission:
    """The webhook's answer to one pod, and the pod as the API server would store it."""

    request: dict[str, Any]
    response: dict[str, Any]
    patch: list[dict[str, Any]] = field(default_factory=list)
    pod: dict[str, Any] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return bool(self.response["allowed"])

    @property
    def message(self) -> str:
        return str(self.response.get("status", {}).get("message", ""))

    def sidecar(self) -> dict[str, Any]:
        (found,) = [
            c for c in self.pod["spec"].get("initContainers", []) if c["name"] == "credsidecar"
        ]
        return found

    def config(self) -> dict[str, Any]:
        (env,) = [e for e in self.sidecar()["env"] if e["name"] == "CREDSIDECAR_CONFIG"]
        config: dict[str, Any] = yaml.safe_load(env["value"])
        return config


class InjectorProcess:
    """``credsidecar injector`` as a subprocess on 127.0.0.1 with the test CA's certificate."""

    def __init__(self, workdir: Path, **settings: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.pki = make_test_pki(workdir / "pki", "localhost")
        self.port = free_port()
        self.settings_path = workdir / "injector.yaml"
        self.settings_path.write_text(yaml.safe_dump(settings))
        self.log_path = workdir / "injector.log"
        AUDIT.log(self.log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.context = ssl.create_default_context(cafile=str(self.pki["ca"]))

    def start(self) -> InjectorProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent",
                    "injector",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--tls-cert",
                    str(self.pki["cert"]),
                    "--tls-key",
                    str(self.pki["key"]),
                    "-c",
                    str(self.settings_path),
                ],
                stdout=log,
                stderr=log,
                cwd=REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"injector exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the injector did not answer /healthz within 60s")
            time.sleep(0.05)

    def connection(self, context: ssl.SSLContext | None = None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "localhost", self.port, context=context or self.context, timeout=30
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request(
                method, path, body=body, headers={"Content-Type": "application/json", **headers}
            )
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def admit(self, pod: dict[str, Any], operation: str = "CREATE") -> Admission:
        review = review_body(pod, operation)
        status, body = self.request("POST", "/mutate", json.dumps(review).encode())
        assert status == 200, body
        answer = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
        response = answer["response"]
        assert response["uid"] == review["request"]["uid"]
        admission = Admission(review["request"], response, pod=pod)
        if "patch" in response:
            assert response["patchType"] == "JSONPatch"
            admission.patch = json.loads(base64.b64decode(response["patch"]))
            admission.pod = jsonpatch.apply_patch(pod, admission.patch)
        return admission

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


EXAMPLES = REPO / "examples" / "k8s" / "injector"
VAULT_DOCS = Path(__file__).parent / "vault-docs"


def manifests(directory: Path) -> list[tuple[str, dict[str, Any], str]]:
    """(file name, the pod it creates, the ``# expect:`` line or "") of every manifest."""
    out = []
    for path in sorted(directory.glob("*.yaml")):
        text = path.read_text()
        expect = next(
            (
                ln[len("# expect:") :].strip()
                for ln in text.splitlines()
                if ln.startswith("# expect:")
            ),
            "",
        )
        for document in yaml.safe_load_all(text):
            if document and document.get("kind") in ("Pod", "Deployment", "Job", "StatefulSet"):
                out.append((path.name, pod_of(document), expect))
    return out
