"""The injector's settings: flags, or a small YAML file read with the shared config kit.

Flags win over the file. Every problem names its key path and the bad value, the same
way the agent's config reports them (``injector.on_invalid: "x" is not one of ...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from agent import __version__
from agent.errors import ConfigError
from proxy.configkit import (
    Problems,
    Section,
    as_bool,
    as_http_url,
    as_int,
    as_nonempty_str,
    as_port,
    as_positive_int,
    choice,
    parse_duration,
    parse_listen,
    show_value,
)

OnInvalid = Literal["deny", "warn"]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]
ON_INVALID: tuple[OnInvalid, ...] = get_args(OnInvalid)
PULL_POLICIES: tuple[PullPolicy, ...] = get_args(PullPolicy)

# a Kubernetes resource quantity: 10m, 0.5, 48Mi, 1G, 1e3
_QUANTITY = re.compile(r"[+]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[mkMGTPE]|[eE][+-]?\d+)?")
# a DNS-1123 label: the names of Kubernetes objects this injector refers to
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def as_quantity(value: object) -> str:
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _QUANTITY.fullmatch(text):
        raise ValueError(f"{show_value(value)} is not a Kubernetes quantity (like 10m, 64Mi)")
    return text


def as_dns_label(value: object) -> str:
    text = as_nonempty_str(value)
    if not _DNS_LABEL.fullmatch(text):
        raise ValueError(f"{show_value(value)} is not a lowercase DNS label")
    return text


def as_dns_subdomain(value: object) -> str:
    text = as_nonempty_str(value)
    if not _DNS_SUBDOMAIN.fullmatch(text):
        raise ValueError(f"{show_value(value)} is not a lowercase DNS name")
    return text


@dataclass(frozen=True)
class Resources:
    """Requests and limits of the injected container; None leaves one unset."""

    cpu_request: str | None = "10m"
    memory_request: str | None = "48Mi"
    cpu_limit: str | None = None
    memory_limit: str | None = "96Mi"

    def spec(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for kind, cpu, memory in (
            ("requests", self.cpu_request, self.memory_request),
            ("limits", self.cpu_limit, self.memory_limit),
        ):
            values = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
            if values:
                out[kind] = values
        return out


@dataclass(frozen=True)
class InjectorSettings:
    tls_cert: Path
    tls_key: Path
    listen: tuple[str, int] = ("0.0.0.0", 8443)
    image: str = f"ghcr.io/example/credsidecar:{__version__}"
    image_pull_policy: PullPolicy = "IfNotPresent"
    vault_address: str | None = None  # the default for pods that do not name one
    vault_ca_secret: str | None = None  # a Secret with Vault's CA (key ca.crt), for every pod
    auth_mount: str = "kubernetes"
    annotation_prefix: str = "credsidecar.io"
    vault_compat: bool = True  # inject credsidecar into pods annotated for Vault Agent
    on_invalid: OnInvalid = "deny"  # or allow the pod unchanged, with warnings
    resources: Resources = field(default_factory=Resources)
    run_as_user: int = 65532
    run_as_group: int = 65532
    health_port: int = 8099
    files_size_limit: str = "1Mi"
    state_size_limit: str = "1Mi"
    token_audience: str | None = None  # None: the API server's own audience
    token_expiration: int = 3600
    max_body: int = 4 * 1024 * 1024  # bytes of one AdmissionReview
    request_timeout: float = 10.0  # to receive one whole request; also the idle timeout
    max_connections: int = 256


_TOP = (
    "listen",
    "tls_cert",
    "tls_key",
    "image",
    "image_pull_policy",
    "vault_address",
    "vault_ca_secret",
    "auth_mount",
    "annotation_prefix",
    "vault_compat",
    "on_invalid",
    "resources",
    "run_as_user",
    "run_as_group",
    "health_port",
    "files_size_limit",
    "state_size_limit",
    "token_audience",
    "token_expiration",
    "max_body",
    "request_timeout",
    "max_connections",
)


def _uid(value: object) -> int:
    number = as_int(value)
    if number < 1:
        raise ValueError(f"{number} is root or negative: the sidecar runs as a non-root uid")
    return number


def _resources(problems: Problems, raw: object) -> Resources:
    s = Section(problems, "injector.resources", raw, ("requests", "limits"))
    requests = s.sub("requests", ("cpu", "memory"))
    limits = s.sub("limits", ("cpu", "memory"))
    default = Resources()
    return Resources(
        cpu_request=requests.get("cpu", as_quantity, default.cpu_request),
        memory_request=requests.get("memory", as_quantity, default.memory_request),
        cpu_limit=limits.get("cpu", as_quantity, default.cpu_limit),
        memory_limit=limits.get("memory", as_quantity, default.memory_limit),
    )


def parse_settings(raw: object, overrides: Mapping[str, Any] | None = None) -> InjectorSettings:
    """Validate the settings mapping (``overrides`` are the flags given). Raises
    :class:`ConfigError` listing every problem, each under ``injector.<key>``."""
    merged: dict[str, Any] = dict(raw) if isinstance(raw, Mapping) else {}
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError([f"injector: must be a mapping, got {type(raw).__name__}"])
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    problems = Problems()
    s = Section(problems, "injector", merged, _TOP)
    prefix = s.get("annotation_prefix", as_dns_subdomain, "credsidecar.io")
    settings = InjectorSettings(
        tls_cert=Path(s.required("tls_cert", as_nonempty_str, "")),
        tls_key=Path(s.required("tls_key", as_nonempty_str, "")),
        listen=s.get("listen", parse_listen, ("0.0.0.0", 8443)),
        image=s.get("image", as_nonempty_str, InjectorSettings.image),
        image_pull_policy=s.get("image_pull_policy", choice(PULL_POLICIES), "IfNotPresent"),
        vault_address=s.get("vault_address", as_http_url, None),
        vault_ca_secret=s.get("vault_ca_secret", as_dns_subdomain, None),
        auth_mount=s.get("auth_mount", as_nonempty_str, "kubernetes").strip("/"),
        annotation_prefix=prefix,
        vault_compat=s.get("vault_compat", as_bool, True),
        on_invalid=s.get("on_invalid", choice(ON_INVALID), "deny"),
        resources=_resources(problems, merged.get("resources")),
        run_as_user=s.get("run_as_user", _uid, 65532),
        run_as_group=s.get("run_as_group", _uid, 65532),
        health_port=s.get("health_port", as_port, 8099),
        files_size_limit=s.get("files_size_limit", as_quantity, "1Mi"),
        state_size_limit=s.get("state_size_limit", as_quantity, "1Mi"),
        token_audience=s.get("token_audience", as_nonempty_str, None),
        token_expiration=s.get("token_expiration", _token_expiration, 3600),
        max_body=s.get("max_body", as_positive_int, 4 * 1024 * 1024),
        request_timeout=s.get("request_timeout", _positive_duration, 10.0),
        max_connections=s.get("max_connections", as_positive_int, 256),
    )
    if problems:
        raise ConfigError(problems.items)
    return settings


def _token_expiration(value: object) -> int:
    seconds = as_int(value)
    if seconds < 600:  # the API server refuses projected tokens shorter than 10 minutes
        raise ValueError(f"{seconds} is shorter than 600 seconds")
    return seconds


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{show_value(value)} must be longer than 0")
    return seconds


def load_settings(path: Path | None, overrides: Mapping[str, Any]) -> InjectorSettings:
    """Settings from an optional YAML file (``injector:`` keys at the top) plus flags."""
    raw: object = None
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read settings: {exc.strerror}"]) from None
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or "malformed YAML"
            raise ConfigError([f"{path}: malformed YAML: {reason}"]) from None
    return parse_settings(raw, overrides)
