"""``deploy/``: what ``kubectl kustomize`` renders (the cert-manager install and the
overlay without it), every object validated against Kubernetes 1.29, and the pieces
referring to each other by the right names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from injectorproc import REPO, validate

from agent.cli import _parser
from agent.injector.settings import parse_settings

DEPLOY = REPO / "deploy"
CERT_MANAGER = "cert-manager.io/v1"


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: .ci/run installs Debian's kubernetes-client"
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {o["kind"]: o for o in objects}


def check_cert_manager(obj: dict[str, Any]) -> None:
    """No OpenAPI schema ships for cert-manager's CRDs here: the fields we rely on."""
    assert obj["apiVersion"] == CERT_MANAGER
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    if obj["kind"] == "Issuer":
        assert obj["spec"] == {"selfSigned": {}}
    else:
        spec = obj["spec"]
        assert set(spec) <= {
            "secretName", "issuerRef", "commonName", "dnsNames", "duration", "renewBefore",
            "privateKey", "usages",
        }  # fmt: skip
        assert spec["secretName"] and spec["issuerRef"]["kind"] == "Issuer"


@pytest.mark.parametrize("variant", ["cert-manager", "without-cert-manager"])
def test_the_install_renders_and_every_object_validates(variant: str) -> None:
    directory = DEPLOY if variant == "cert-manager" else DEPLOY / "without-cert-manager"
    objects = render(directory)
    for obj in objects:
        if obj["apiVersion"] == CERT_MANAGER:
            check_cert_manager(obj)
        else:
            validate(obj)
    kinds = by_kind(objects)
    expected = {"Namespace", "ServiceAccount", "ConfigMap", "Deployment"}
    expected |= {"PodDisruptionBudget", "Service", "MutatingWebhookConfiguration"}
    if variant == "cert-manager":
        expected |= {"Issuer", "Certificate"}
    assert set(kinds) == expected

    namespace = kinds["Namespace"]["metadata"]["name"]
    deployment, service = kinds["Deployment"], kinds["Service"]
    for obj in objects:
        if obj["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            assert obj["metadata"]["namespace"] == namespace, obj["kind"]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"], get["scheme"]) == ("/healthz", "https", "HTTPS")
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container["ports"][0]["name"]

    # the container's arguments are the CLI's, and its settings file validates
    args = _parser().parse_args(container["args"])
    assert args.command == "injector" and args.listen.endswith(
        f":{container['ports'][0]['containerPort']}"
    )
    settings_text = kinds["ConfigMap"]["data"]["settings.yaml"]
    parse_settings(
        yaml.safe_load(settings_text), {"tls_cert": args.tls_cert, "tls_key": args.tls_key}
    )
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts[str(Path(args.tls_cert).parent)]]["secret"]["secretName"]
    assert (
        volumes[mounts[str(Path(args.config).parent)]]["configMap"]["name"]
        == kinds["ConfigMap"]["metadata"]["name"]
    )

    hook = kinds["MutatingWebhookConfiguration"]
    (webhook,) = hook["webhooks"]
    target = webhook["clientConfig"]["service"]
    assert (target["namespace"], target["name"], target["port"], target["path"]) == (
        namespace, service["metadata"]["name"], port["port"], "/mutate"
    )  # fmt: skip
    assert webhook["failurePolicy"] == "Fail" and 1 <= webhook["timeoutSeconds"] <= 10
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["namespaceSelector"]["matchLabels"] == {"credsidecar.io/injection": "enabled"}
    (exclude,) = webhook["objectSelector"]["matchExpressions"]
    assert exclude["operator"] == "NotIn" and labels[exclude["key"]] in exclude["values"]
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    tls_secret = volumes[mounts[str(Path(args.tls_cert).parent)]]["secret"]["secretName"]
    annotations = hook["metadata"].get("annotations", {})
    if variant == "cert-manager":
        certificate = kinds["Certificate"]
        assert (
            annotations["cert-manager.io/inject-ca-from"]
            == f"{namespace}/{certificate['metadata']['name']}"
        )
        assert certificate["spec"]["secretName"] == tls_secret
        assert certificate["spec"]["issuerRef"]["name"] == kinds["Issuer"]["metadata"]["name"]
        assert f"{service['metadata']['name']}.{namespace}.svc" in certificate["spec"]["dnsNames"]
    else:
        assert "cert-manager.io/inject-ca-from" not in annotations
