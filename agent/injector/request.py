"""The typed injection request: what a pod's annotations ask for, already validated.

Both annotation sets (``credsidecar.io/*`` and Vault Agent Injector's) translate into
this one shape; the agent config and the pod patch are computed from it alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.config import SecretKind
from agent.injector.settings import Resources

Mode = Literal["sidecar", "init-only"]
Origin = Literal["credsidecar", "vault"]

CONTAINER_NAME = "credsidecar"
FILES_VOLUME = "credsidecar-files"
STATE_VOLUME = "credsidecar-state"
TOKEN_VOLUME = "credsidecar-token"
TLS_VOLUME = "credsidecar-tls"
CONFIG_VOLUME = "credsidecar-config"
STATE_MOUNT = "/var/lib/credsidecar"
# the agent creates its state_dir itself (0700, ours): a directory inside the emptyDir,
# whose own mount point is world-writable
STATE_DIR = STATE_MOUNT + "/agent"
TOKEN_MOUNT = "/var/run/secrets/credsidecar"
TOKEN_PATH = TOKEN_MOUNT + "/token"
CONFIG_MOUNT = "/etc/credsidecar"
CONFIG_ENV = "CREDSIDECAR_CONFIG"
NATIVE_FILES_MOUNT = "/run/credsidecar"


@dataclass(frozen=True)
class SecretRequest:
    name: str  # the secret's name in the agent config
    path: str
    kind: SecretKind
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FileRequest:
    """One rendered file: a Jinja template over the agent's ``secrets``."""

    name: str  # as the annotation named it (error messages)
    destination: str  # absolute path inside the pod
    template: str
    perms: int | None = None  # None: the request's default_perms
    error_on_missing_key: bool = True
    annotation: str = ""  # the annotation the template came from (error messages)


@dataclass(frozen=True)
class ProxyRequest:
    secret: str
    upstream_host: str
    upstream_port: int
    listen_port: int = 6432
    sslmode: str = "prefer"


@dataclass(frozen=True)
class InjectionRequest:
    origin: Origin
    mode: Mode
    files_mount: str  # where the rendered-files volume is mounted
    vault_address: str | None = None
    role: str | None = None
    auth_mount: str = "kubernetes"
    vault_namespace: str | None = None
    tls_secret: str | None = None  # a Secret mounted into the sidecar (Vault's CA)
    tls_mount: str = "/etc/credsidecar-tls"  # beside, not inside, a config volume
    ca_cert: str | None = None
    tls_skip_verify: bool = False
    secrets: tuple[SecretRequest, ...] = ()
    files: tuple[FileRequest, ...] = ()
    commands: tuple[tuple[str, str], ...] = ()  # (file name, shell command) after renders
    notify_signal: str | None = None
    notify_process: str | None = None  # regex over the app's command line
    proxy: ProxyRequest | None = None
    config_map: str | None = None  # a full agent config instead of generating one
    config_key: str = "config.yaml"
    containers: tuple[str, ...] | None = None  # app containers to mount into; None = all
    resources: Resources = field(default_factory=Resources)
    run_as_user: int = 65532
    run_as_group: int = 65532
    default_perms: int = 0o600
    file_gid: int | None = None  # group of rendered files (the pod's fsGroup) if not shared
    share_process_namespace: bool = False
    init_first: bool = False
    health_port: int = 8099
    token_audience: str | None = None
    log_level: str = "info"
