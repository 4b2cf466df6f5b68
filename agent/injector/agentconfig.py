"""An injection request -> the sidecar's agent config (the mapping ``credsidecar run`` reads).

The config reaches the sidecar in an environment variable (``run --config-env``), so no
ConfigMap has to exist before the pod. It holds no secret: the sidecar logs in with the
pod's projected service-account token, which only its own container mounts. Probes stay
on ``health`` (``/healthz``, ``/readyz``, ``/metrics``: safe on the pod network); the
admin socket lives in ``state_dir``, a directory the agent creates inside its volume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.injector.request import STATE_DIR, TOKEN_PATH, InjectionRequest


def agent_config(request: InjectionRequest) -> dict[str, Any]:
    vault: dict[str, Any] = {
        "address": request.vault_address,
        "auth": {
            "method": "kubernetes",
            "role": request.role,
            "mount": request.auth_mount,
            "jwt_file": TOKEN_PATH,
        },
    }
    if request.vault_namespace:
        vault["namespace"] = request.vault_namespace
    ca_cert = request.ca_cert
    if ca_cert is None and request.tls_secret is not None:
        ca_cert = f"{request.tls_mount}/ca.crt"
    if ca_cert is not None:
        vault["ca_cert"] = ca_cert
    if request.tls_skip_verify:
        vault["tls_skip_verify"] = True

    secrets: dict[str, Any] = {}
    for secret in request.secrets:
        item: dict[str, Any] = {"kind": secret.kind, "path": secret.path}
        if secret.params:
            item["params"] = dict(secret.params)
        secrets[secret.name] = item

    notify: dict[str, Any] = {}
    if request.notify_signal is not None:
        notify["app"] = {"signal": request.notify_signal, "process": request.notify_process}
    commands = dict(request.commands)
    for name, command in request.commands:
        # Vault Agent runs a template's command through the shell, in its own container
        notify[f"command-{name}"] = {"command": ["/bin/sh", "-c", command]}

    templates = []
    for file in request.files:
        perms = file.perms if file.perms is not None else request.default_perms
        template: dict[str, Any] = {
            "destination": file.destination,
            "contents": file.template,
            "perms": f"{perms:04o}",
        }
        if request.file_gid is not None:
            template["gid"] = request.file_gid
        if not file.error_on_missing_key:
            template["error_on_missing_key"] = False
        if commands:  # a file's command runs after that file changes only, as in Vault Agent
            own = [f"command-{file.name}"] if file.name in commands else []
            template["notify"] = (["app"] if "app" in notify else []) + own
        templates.append(template)

    config: dict[str, Any] = {
        "vault": vault,
        "secrets": secrets,
        "templates": templates,
        "state_dir": STATE_DIR,
        "log_level": request.log_level,
    }
    if notify:
        config["notify"] = notify
    if request.mode == "sidecar":
        config["health"] = {"listen": f"0.0.0.0:{request.health_port}"}
    if request.proxy is not None:
        proxy = request.proxy
        config["proxy"] = {
            "listen": f"127.0.0.1:{proxy.listen_port}",
            "upstream": {
                "host": proxy.upstream_host,
                "port": proxy.upstream_port,
                "sslmode": proxy.sslmode,
            },
            "credentials": {"secret": proxy.secret},
        }
    return config


def config_problems(config: dict[str, Any]) -> list[str]:
    """The agent's own validation of a generated config (an empty list when it is valid)."""
    from agent.config import parse_config
    from agent.errors import ConfigError

    try:
        parse_config(config, base_dir=Path("/"), env={})
    except ConfigError as exc:
        return exc.problems
    return []


def encode(config: dict[str, Any]) -> str:
    """The config as the sidecar reads it from its environment: compact JSON (YAML too)."""
    return json.dumps(config, separators=(",", ":"), sort_keys=True)
