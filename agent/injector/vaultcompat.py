"""Vault Agent Injector annotations (``vault.hashicorp.com/*``) -> an InjectionRequest.

Files render to ``/vault/secrets/<file>`` as vault-k8s does, with the templates translated
to Jinja (:mod:`agent.injector.gotemplate`). An annotation this translation does not
carry is a problem under its own name, never silently dropped; the README's table lists
what maps to what.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agent.config import SecretKind, secret_name_problem
from agent.injector import pod as podspec
from agent.injector.annotations import (
    AnnotationReader,
    check_template,
    kind_from_path,
    parse_absolute,
    parse_mode,
    parse_names,
    parse_uid,
    pod_problems,
    resources,
    served,
    too_many_files,
)
from agent.injector.gotemplate import TranslationError, fields_expression, translate
from agent.injector.request import FileRequest, InjectionRequest, SecretRequest
from agent.injector.settings import InjectorSettings, as_dns_subdomain
from proxy.configkit import Problems, as_http_url, as_nonempty_str, choice, show_value

PREFIX = "vault.hashicorp.com/"
DEFAULT_VOLUME_PATH = "/vault/secrets"
# vault-k8s's own default templates (agent-inject/agent/config.go)
MAP_TEMPLATE = (
    '{{ with secret "%s" }}{{ range $k, $v := .Data }}{{ $k }}: {{ $v }}\n{{ end }}{{ end }}'
)
JSON_TEMPLATE = '{{ with secret "%s" }}{{ .Data | toJSON }}\n{{ end }}'
# accepted, with nothing to do: credsidecar is always a native sidecar that renders
# before the application starts, and uses its own image
IGNORED = ("agent-pre-populate", "agent-image")
VAULT_RESOURCES = {
    "cpu_request": "agent-requests-cpu",
    "memory_request": "agent-requests-mem",
    "cpu_limit": "agent-limits-cpu",
    "memory_limit": "agent-limits-mem",
}
_LOG_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning"}
_LOG_LEVELS |= {"warning": "warning", "err": "error", "error": "error"}
_PER_FILE = ("file", "perms", "command")


def go_bool(value: str) -> bool:
    """strconv.ParseBool, which vault-k8s uses for its annotations."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"{show_value(value)} is not a boolean")


def wants_injection(annotations: Mapping[str, str]) -> bool:
    try:
        return go_bool(annotations.get(PREFIX + "agent-inject", "false"))
    except ValueError:
        return True  # a malformed value is reported by vault_request, not ignored


def vault_injected(annotations: Mapping[str, str]) -> bool:
    return annotations.get(PREFIX + "agent-inject-status") == "injected"


def _auth_path(value: str) -> str:
    path = value.strip().strip("/")
    path = path[len("auth/") :] if path.startswith("auth/") else path
    if not path:
        raise ValueError(f"{show_value(value)} is not an auth mount path")
    return path


def _auth_type(value: str) -> str:
    if value != "kubernetes":
        raise ValueError(f"{show_value(value)}: credsidecar's migration supports kubernetes only")
    return value


def _file_path(value: str) -> str:
    path = value.strip().lstrip("/")
    if not path or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"{show_value(value)} is not a file name")
    if "/" in path:
        raise ValueError(
            f"{show_value(value)}: credsidecar renders into the volume's top directory"
        )
    return path


class _Secrets:
    """The secrets the translated templates read, one per distinct path (one lease)."""

    def __init__(self, preferred: Mapping[str, str]) -> None:
        self.preferred = preferred  # path -> the name of the file that declared it
        self.by_path: dict[str, SecretRequest] = {}

    def resolve(self, path: str, params: dict[str, str]) -> tuple[str, SecretKind]:
        path = path.strip("/")
        known = self.by_path.get(path)
        if known is not None:
            if dict(known.params) != params:
                raise TranslationError(f'secret "{path}" read with different arguments')
            return known.name, known.kind
        kind: SecretKind = kind_from_path(path) or "kv"  # anything else: a polled read
        if kind == "pki" and "common_name" not in params:
            raise TranslationError(f'secret "{path}" issues a certificate: add "common_name=..."')
        if kind != "pki" and params:
            raise TranslationError(f'secret "{path}" with arguments (a write) outside pki')
        name = self._name(path)
        self.by_path[path] = SecretRequest(name=name, path=path, kind=kind, params=params)
        return name, kind

    def _name(self, path: str) -> str:
        taken = {s.name for s in self.by_path.values()}
        name = self.preferred.get(path)
        if name is None or name in taken or secret_name_problem(name):
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", path).strip("._-") or "secret"
        base, n = name, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name


def _default_template(path: str, style: str, secrets: _Secrets) -> str:
    """vault-k8s's default template ("map" or "json") for a secret, in Jinja."""
    name, kind = secrets.resolve(path, {})
    if kind == "kv" and re.match(r"[^/]+/data/", path):
        # a KV v2 read's .Data holds data and metadata; credsidecar keeps only the data
        fields = fields_expression(name)
        if style == "json":
            return '{{ {"data": ' + fields + "} | tojson }}\n"
        return (
            "data: map[{% for k, v in " + fields + ".items() %}{{ k }}:{{ v }}"
            "{% if not loop.last %} {% endif %}{% endfor %}]\n"
        )
    go = (JSON_TEMPLATE if style == "json" else MAP_TEMPLATE) % path
    return translate(go, lambda p, params: secrets.resolve(p, params))


def vault_request(
    pod: Mapping[str, Any], settings: InjectorSettings, problems: Problems, warnings: list[str]
) -> InjectionRequest:
    r = AnnotationReader(podspec.pod_annotations(pod), PREFIX, problems)
    r.get("agent-inject", go_bool, True)
    r.get("agent-inject-status", str, "")
    for name in IGNORED:
        r.get(name, str, "")

    preserve_all = r.get("preserve-secret-case", go_bool, False)
    preserve = {
        k: r.get("preserve-secret-case-" + k, go_bool, preserve_all)
        for k in r.starting("preserve-secret-case-")
    }
    declared = r.starting("agent-inject-secret-")
    templates = {
        k: v for k, v in r.starting("agent-inject-template-").items() if not k.startswith("file-")
    }
    for raw_name in r.starting("agent-inject-template-file-"):
        problems.add(
            r.key("agent-inject-template-file-" + raw_name),
            "template files from a volume are not supported (put the template in "
            f"{r.key('agent-inject-template-')}{raw_name})",
        )
    per_file = {kind: r.starting(f"agent-inject-{kind}-") for kind in _PER_FILE}
    missing_key = r.starting("error-on-missing-key-")
    style = r.get("agent-inject-default-template", choice(("map", "json")), "map")
    volume = r.get("secret-volume-path", _volume_path, DEFAULT_VOLUME_PATH)

    raw_names = sorted(set(declared) | set(templates))
    if too_many_files(problems, r.key("agent-inject"), len(raw_names)):
        raw_names = []
    for kind, values in per_file.items():
        for raw_name in values:
            if raw_name not in raw_names:
                problems.add(r.key(f"agent-inject-{kind}-{raw_name}"), f"no secret {raw_name}")
    names = {n: n if preserve.get(n, preserve_all) else n.lower() for n in raw_names}
    preferred: dict[str, str] = {}  # a path's secret takes the first file's name
    for raw_name, path in sorted(declared.items()):
        preferred.setdefault(path.strip().strip("/"), names[raw_name])
    secrets = _Secrets(preferred)
    files, commands = [], []
    for raw_name in raw_names:
        name = names[raw_name]
        key = r.key(
            ("agent-inject-template-" if raw_name in templates else "agent-inject-secret-")
            + raw_name
        )
        try:
            if raw_name in templates:
                template = translate(templates[raw_name], secrets.resolve)
            else:
                template = _default_template(declared[raw_name], style, secrets)
        except TranslationError as exc:
            problems.add(key, f"cannot translate: {exc}")
            continue
        try:
            file_name = _file_path(per_file["file"].get(raw_name, name))
        except ValueError as exc:
            problems.add(r.key("agent-inject-file-" + raw_name), str(exc))
            continue
        perms = None
        if raw_name in per_file["perms"]:
            try:
                perms = parse_mode(per_file["perms"][raw_name])
            except ValueError as exc:
                problems.add(r.key("agent-inject-perms-" + raw_name), str(exc))
        strict = True  # a missing field fails the render instead of writing "<no value>"
        if raw_name in missing_key:
            try:
                strict = go_bool(missing_key[raw_name])
            except ValueError as exc:
                problems.add(r.key("error-on-missing-key-" + raw_name), str(exc))
        file = FileRequest(
            name=name,
            destination=f"{volume}/{file_name}",
            template=template,
            perms=perms,
            error_on_missing_key=strict,
            annotation=key,
        )
        check_template(problems, key, file, {s.name for s in secrets.by_path.values()}, "{name}")
        files.append(file)
        command = per_file["command"].get(raw_name, "").strip()
        if command:
            commands.append((name, command))

    targets = podspec.select_containers(
        pod,
        r.get("agent-inject-containers", parse_names, None),
        problems,
        r.key("agent-inject-containers"),
    )
    uid = r.get("agent-run-as-user", parse_uid, None)
    gid = r.get("agent-run-as-group", parse_uid, None)
    who = podspec.identity(pod, targets, uid, gid, settings.run_as_user, settings.run_as_group)
    if r.get("agent-run-as-same-user", go_bool, False) and not who.shared:
        problems.add(
            r.key("agent-run-as-same-user"),
            "the served containers set no common non-root runAsUser",
        )
    if not who.shared and who.file_gid is None and files:
        warnings.append(
            "vault.hashicorp.com: the application's uid is unknown, so rendered files are "
            "0644 as Vault Agent writes them; set runAsUser (or fsGroup) on the pod for 0600"
        )
    role = r.get("role", as_nonempty_str, None)
    if role is None:
        problems.add(r.key("role"), "is required (the Vault Kubernetes auth role)")
    address = r.get("service", as_http_url, settings.vault_address)
    if address is None:
        problems.add(r.key("service"), "is required: the injector has no vault_address setting")
    if not raw_names:
        hint = f"add {r.key('agent-inject-secret-')}<file>: <path>"
        problems.add(r.key("agent-inject"), f"nothing to render: {hint}")
    r.get("auth-type", _auth_type, "kubernetes")

    request = InjectionRequest(
        origin="vault",
        mode="init-only" if r.get("agent-pre-populate-only", go_bool, False) else "sidecar",
        files_mount=volume,
        vault_address=address,
        role=role,
        auth_mount=r.get("auth-path", _auth_path, settings.auth_mount),
        vault_namespace=r.get("namespace", as_nonempty_str, None) or None,
        tls_secret=r.get("tls-secret", as_dns_subdomain, settings.vault_ca_secret),
        tls_mount="/vault/tls",
        ca_cert=r.get("ca-cert", parse_absolute, None),
        tls_skip_verify=r.get("tls-skip-verify", go_bool, False),
        secrets=tuple(secrets.by_path.values()),
        files=tuple(files),
        commands=tuple(commands),
        resources=resources(r, VAULT_RESOURCES, settings.resources),
        **served(targets, who),
        share_process_namespace=r.get("agent-share-process-namespace", go_bool, False),
        init_first=r.get("agent-init-first", go_bool, False),
        health_port=settings.health_port,
        token_audience=settings.token_audience,
        log_level=r.get("log-level", _log_level, "info"),
    )
    for name in r.unused():
        problems.add(r.key(name), "is not supported by credsidecar's migration")
    pod_problems(pod, request, problems, settings.annotation_prefix)
    return request


def _volume_path(value: str) -> str:
    return parse_absolute(value.rstrip("/"))


def _log_level(value: str) -> str:
    level = _LOG_LEVELS.get(value.lower())
    if level is None:
        raise ValueError(f"{show_value(value)} is not a log level")
    return level
