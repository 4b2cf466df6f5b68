"""An injection request -> the JSONPatch (RFC 6902) that the AdmissionReview returns.

The sidecar is a native sidecar (an init container with ``restartPolicy: Always`` and a
startupProbe on ``/readyz``): the kubelet starts the app containers only once every
credential is rendered, and stops the sidecar after them. ``init-only`` makes it a plain
init container running ``run --once`` (Jobs that must complete).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.injector import pod as podspec
from agent.injector.agentconfig import agent_config, encode
from agent.injector.request import (
    CONFIG_ENV,
    CONFIG_MOUNT,
    CONFIG_VOLUME,
    CONTAINER_NAME,
    FILES_VOLUME,
    STATE_MOUNT,
    STATE_VOLUME,
    TLS_VOLUME,
    TOKEN_MOUNT,
    TOKEN_VOLUME,
    InjectionRequest,
)
from agent.injector.settings import InjectorSettings

Op = dict[str, Any]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _append(
    ops: list[Op], parent: Mapping[str, Any], path: str, key: str, items: list[Any]
) -> None:
    """Append ``items`` to the list ``parent[key]`` (created when absent)."""
    if not items:
        return
    if not isinstance(parent.get(key), list):
        ops.append({"op": "add", "path": f"{path}/{key}", "value": items})
        return
    ops.extend({"op": "add", "path": f"{path}/{key}/-", "value": item} for item in items)


def volumes(request: InjectionRequest, settings: InjectorSettings) -> list[dict[str, Any]]:
    token: dict[str, Any] = {"path": "token", "expirationSeconds": settings.token_expiration}
    if request.token_audience is not None:
        token["audience"] = request.token_audience
    out: list[dict[str, Any]] = [
        {
            "name": FILES_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": settings.files_size_limit},
        },
        {
            "name": STATE_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": settings.state_size_limit},
        },
        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": token}]}},
    ]
    if request.tls_secret is not None:
        out.append({"name": TLS_VOLUME, "secret": {"secretName": request.tls_secret}})
    if request.config_map is not None:
        out.append({"name": CONFIG_VOLUME, "configMap": {"name": request.config_map}})
    return out


def sidecar(request: InjectionRequest, settings: InjectorSettings) -> dict[str, Any]:
    """The credsidecar container (native sidecar, or plain init container for init-only)."""
    mounts: list[dict[str, Any]] = [
        {"name": FILES_VOLUME, "mountPath": request.files_mount},
        {"name": STATE_VOLUME, "mountPath": STATE_MOUNT},
        {"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": True},
    ]
    if request.tls_secret is not None:
        mounts.append({"name": TLS_VOLUME, "mountPath": request.tls_mount, "readOnly": True})
    env: list[dict[str, str]] = []
    if request.config_map is not None:
        mounts.append({"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT, "readOnly": True})
        args = ["run", "-c", f"{CONFIG_MOUNT}/{request.config_key}"]
    else:
        env.append({"name": CONFIG_ENV, "value": encode(agent_config(request))})
        args = ["run", "--config-env", CONFIG_ENV]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args + (["--once"] if request.mode == "init-only" else []),
        "resources": request.resources.spec(),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": request.run_as_user,
            "runAsGroup": request.run_as_group,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    if env:
        container["env"] = env
    if request.mode == "sidecar":
        port = request.health_port
        container |= {
            "restartPolicy": "Always",
            "ports": [{"name": "cs-health", "containerPort": port, "protocol": "TCP"}],
            # the app containers start only once this passes: credentials are rendered
            "startupProbe": _probe("/readyz", port, period=1, failures=300),
            "readinessProbe": _probe("/readyz", port, period=10, failures=3),
            "livenessProbe": _probe("/healthz", port, period=10, failures=3),
        }
    return container


def _probe(path: str, port: int, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def pod_patch(
    pod: Mapping[str, Any], request: InjectionRequest, settings: InjectorSettings
) -> list[Op]:
    spec = podspec.spec(pod)
    ops: list[Op] = []
    container = sidecar(request, settings)
    inits = spec.get("initContainers")
    if not isinstance(inits, list) or not inits:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
    else:
        where = "0" if request.init_first else "-"
        ops.append({"op": "add", "path": f"/spec/initContainers/{where}", "value": container})
    _append(ops, spec, "/spec", "volumes", volumes(request, settings))

    served = set(request.containers or ())
    mount = {"name": FILES_VOLUME, "mountPath": request.files_mount, "readOnly": True}
    env = []
    if request.proxy is not None:
        env = [
            {"name": "PGHOST", "value": "127.0.0.1"},
            {"name": "PGPORT", "value": str(request.proxy.listen_port)},
        ]
    for index, app in enumerate(podspec.containers(pod)):
        if app.get("name") not in served:
            continue
        path = f"/spec/containers/{index}"
        _append(ops, app, path, "volumeMounts", [mount])
        _append(ops, app, path, "env", env)
    if request.share_process_namespace:
        ops.append({"op": "add", "path": "/spec/shareProcessNamespace", "value": True})

    marks = {f"{settings.annotation_prefix}/status": "injected"}
    if request.origin == "vault":
        # a Vault Agent Injector that still runs in the cluster then leaves the pod alone
        marks["vault.hashicorp.com/agent-inject-status"] = "injected"
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else {}
    assert isinstance(metadata, Mapping)
    if not isinstance(metadata.get("annotations"), Mapping):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": marks})
    else:
        for key, value in marks.items():
            ops.append(
                {"op": "add", "path": f"/metadata/annotations/{_escape(key)}", "value": value}
            )
    return ops
