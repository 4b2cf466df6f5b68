"""``credsidecar.io/*`` annotations -> an :class:`InjectionRequest`.

Every problem is recorded under the full annotation name, so a denied pod's message
lists them all at once: ``credsidecar.io/secret-db: cannot tell the kind from the path
"kv1/app" (add credsidecar.io/secret-db-kind)``. :class:`AnnotationReader` is shared
with the Vault Agent Injector translation.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.config import LOG_LEVELS, SECRET_KINDS, SecretKind, parse_signal, secret_name_problem
from agent.injector import pod as podspec
from agent.injector.request import (
    CONFIG_VOLUME,
    CONTAINER_NAME,
    FILES_VOLUME,
    NATIVE_FILES_MOUNT,
    STATE_VOLUME,
    TLS_VOLUME,
    TOKEN_VOLUME,
    FileRequest,
    InjectionRequest,
    ProxyRequest,
    SecretRequest,
)
from agent.injector.settings import (
    InjectorSettings,
    Resources,
    as_dns_subdomain,
    as_quantity,
)
from proxy.config import SSLMODES
from proxy.configkit import Problems, as_http_url, as_nonempty_str, as_port, choice, show_value

T = TypeVar("T")
OUR_VOLUMES = (FILES_VOLUME, STATE_VOLUME, TOKEN_VOLUME, TLS_VOLUME, CONFIG_VOLUME)


class AnnotationReader:
    """The annotations under one prefix, read with converters; records which were used
    so that the rest can be reported as unknown."""

    def __init__(self, annotations: Mapping[str, str], prefix: str, problems: Problems) -> None:
        self.prefix, self.problems = prefix, problems
        self.raw = {k[len(prefix) :]: v for k, v in annotations.items() if k.startswith(prefix)}
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str, convert: Callable[[str], T], default: T) -> T:
        if name not in self.raw:
            return default
        self.used.add(name)
        try:
            return convert(self.raw[name])
        except (ValueError, TypeError) as exc:
            self.problems.add(self.key(name), str(exc))
            return default

    def starting(self, stem: str) -> dict[str, str]:
        """``{rest: value}`` of every annotation ``<prefix><stem><rest>``, marked used."""
        found = {k[len(stem) :]: v for k, v in self.raw.items() if k.startswith(stem)}
        self.used.update(stem + k for k in found)
        return found

    def unused(self) -> list[str]:
        return sorted(set(self.raw) - self.used)


# --------------------------------------------------------------------------- converters
# annotation values are always strings


def parse_bool(value: str) -> bool:
    if value not in ("true", "false"):
        raise ValueError(f'{show_value(value)} is not "true" or "false"')
    return value == "true"


def parse_int(value: str) -> int:
    if not re.fullmatch(r"\d{1,9}", value.strip()):
        raise ValueError(f"{show_value(value)} is not a number")
    return int(value)


def parse_port(value: str) -> int:
    return as_port(parse_int(value))


def parse_uid(value: str) -> int:
    number = parse_int(value)
    if number == 0:
        raise ValueError("0 is root: the sidecar runs as a non-root uid")
    return number


def parse_names(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise ValueError(f"{show_value(value)} names no container")
    return names


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{show_value(value)} is not host:port")
    return host.strip("[]"), int(port)


def parse_params(value: str) -> dict[str, str]:
    """``common_name=app.internal ttl=1h`` -> a mapping (Vault CLI style)."""
    params = {}
    for word in value.split():
        key, sep, item = word.partition("=")
        if not sep or not key:
            raise ValueError(f"{show_value(word)} is not key=value")
        params[key] = item
    return params


def parse_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{show_value(value)} is not a regular expression: {exc}") from None
    return value


def parse_absolute(value: str) -> str:
    if not value.startswith("/") or "/../" in value + "/":
        raise ValueError(f"{show_value(value)} is not an absolute path")
    return value


def parse_signal_name(value: str) -> str:
    return parse_signal(value).name


def parse_mode(value: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", value.strip()):
        raise ValueError(f"{show_value(value)} is not an octal mode like 0640")
    return int(value, 8)


def kind_from_path(path: str) -> SecretKind | None:
    """``<mount>/creds/`` dynamic database, ``<mount>/static-creds/``, ``<mount>/data/``
    KV v2, ``<mount>/issue/`` PKI; None when the path says nothing."""
    parts = path.strip("/").split("/")
    kinds: dict[str, SecretKind] = {
        "creds": "database",
        "static-creds": "database-static",
        "data": "kv",
        "issue": "pki",
    }
    for part in parts[1:-1]:
        if part in kinds:
            return kinds[part]
    return None


# --------------------------------------------------------------------------- the pod


def pod_problems(
    pod: Mapping[str, Any], request: InjectionRequest, problems: Problems, prefix: str
) -> None:
    """What in the pod conflicts with the injection (ports, volume names, pid namespace),
    recorded under the annotation that asked for it (``prefix`` is the one used)."""
    taken = podspec.volume_names(pod) & set(OUR_VOLUMES)
    for name in sorted(taken):
        problems.add(f"{prefix}/inject", f'the pod already has a volume named "{name}"')
    ports = {request.health_port: "health-port"}
    if request.proxy is not None:
        ports[request.proxy.listen_port] = "proxy-port"
    for owner, number in podspec.declared_ports(pod):
        if number in ports and request.mode == "sidecar":
            problems.add(
                f"{prefix}/{ports[number]}",
                f"port {number} is already a port of container {owner} "
                f"(choose another with {prefix}/{ports[number]})",
            )
    served = [c for c in podspec.containers(pod) if c.get("name") in (request.containers or ())]
    for container in served:
        cname = container.get("name")
        mounts = container.get("volumeMounts")
        for mount in mounts if isinstance(mounts, list) else []:
            if isinstance(mount, Mapping) and mount.get("mountPath") == request.files_mount:
                problems.add(
                    f"{prefix}/inject",
                    f"container {cname} already mounts something at {request.files_mount}",
                )
        env = container.get("env")
        names = (
            {e.get("name") for e in env if isinstance(e, Mapping)}
            if isinstance(env, list)
            else set()
        )
        for variable in ("PGHOST", "PGPORT"):
            if request.proxy is not None and variable in names:
                problems.add(f"{prefix}/proxy", f"container {cname} already sets {variable}")
    share = podspec.spec(pod).get("shareProcessNamespace")
    if request.share_process_namespace and share is False:
        problems.add(
            f"{prefix}/notify", "signals need shareProcessNamespace, which the pod sets to false"
        )


def already_injected(pod: Mapping[str, Any], prefix: str) -> bool:
    status = podspec.pod_annotations(pod).get(f"{prefix}/status")
    names = {c.get("name") for c in podspec.containers(pod) + podspec.init_containers(pod)}
    return status == "injected" or CONTAINER_NAME in names


# --------------------------------------------------------------------------- native


def _secrets(r: AnnotationReader) -> tuple[list[SecretRequest], dict[str, str]]:
    """The ``secret-<name>`` annotations (with ``-kind``/``-params``) -> requests, and each
    secret's annotation name."""
    raw = r.starting("secret-")
    attributes = ("-kind", "-params")
    names = [k for k in raw if not any(k.endswith(a) and k[: -len(a)] in raw for a in attributes)]
    secrets, keys = [], {}
    for name in sorted(names):
        key = r.key("secret-" + name)
        keys[name] = key
        problem = secret_name_problem(name)
        if problem:
            r.problems.add(key, problem)
            continue
        path = raw[name].strip().strip("/")
        if not path:
            r.problems.add(key, "names no path")
            continue
        kind: SecretKind | None = kind_from_path(path)
        if name + "-kind" in raw:
            try:
                kind = choice(SECRET_KINDS)(raw[name + "-kind"].strip())
            except ValueError as exc:
                r.problems.add(r.key(f"secret-{name}-kind"), str(exc))
                continue
        if kind is None:
            r.problems.add(
                key,
                f"cannot tell the kind from the path {show_value(path)} "
                f"(add {r.key(f'secret-{name}-kind')}: one of {', '.join(SECRET_KINDS)})",
            )
            continue
        params: dict[str, str] = {}
        if name + "-params" in raw:
            try:
                params = parse_params(raw[name + "-params"])
            except ValueError as exc:
                r.problems.add(r.key(f"secret-{name}-params"), str(exc))
        if kind == "pki" and "common_name" not in params:
            r.problems.add(
                key, f"a pki secret needs {r.key(f'secret-{name}-params')}: common_name=..."
            )
        secrets.append(SecretRequest(name=name, path=path, kind=kind, params=params))
    return secrets, keys


def default_template(secret: str) -> str:
    """The secret's fields as one line of JSON (keys sorted), without lease metadata."""
    from agent.injector.gotemplate import fields_expression

    return "{{ " + fields_expression(secret) + " | tojson }}\n"


# each template is compiled at admission, on the one event loop: a pod may not ask for an
# unbounded number of them (a pod of one opted-in namespace must not stall every other)
MAX_FILES = 100


def too_many_files(problems: Problems, annotation: str, count: int) -> bool:
    if count <= MAX_FILES:
        return False
    problems.add(annotation, f"{count} files asked for; at most {MAX_FILES} per pod")
    return True


def check_template(
    problems: Problems, annotation: str, file: FileRequest, declared: set[str], hint: str
) -> None:
    """The template compiles and uses only declared secrets."""
    error, names = (
        _compiled(file.destination, file.template)
        if len(file.template) <= _CACHED_TEMPLATE_SIZE
        else _compiled.__wrapped__(file.destination, file.template)
    )
    if error is not None:
        problems.add(annotation, error)
        return
    for name in sorted(names - declared):
        problems.add(annotation, f'uses secrets["{name}"], which {hint.format(name=name)}')


# the pods of one Deployment carry the same templates: compile each once (bounded: only
# templates up to 8 KiB, at most 256 of them, are kept)
_CACHED_TEMPLATE_SIZE = 8192


@functools.lru_cache(maxsize=256)
def _compiled(destination: str, text: str) -> tuple[str | None, frozenset[str]]:
    """(the compile error or None, the secrets the template names)."""
    from agent.config import TemplateConfig
    from agent.errors import RenderError
    from agent.render import Template

    try:
        template = Template(TemplateConfig(destination=Path(destination), contents=text))
    except RenderError as exc:
        return str(exc), frozenset()
    return None, frozenset(template.secret_names())


def served(targets: list[Mapping[str, Any]], who: podspec.Identity) -> dict[str, Any]:
    """The request's fields that follow from the served containers and their user."""
    return {
        "containers": tuple(str(c.get("name")) for c in targets),
        "run_as_user": who.uid,
        "run_as_group": who.gid,
        "default_perms": who.default_perms,
        "file_gid": who.file_gid,
    }


def resources(r: AnnotationReader, names: Mapping[str, str], default: Resources) -> Resources:
    """Requests/limits from the annotations ``names`` maps (field -> annotation)."""
    return Resources(
        **{
            field: r.get(annotation, as_quantity, getattr(default, field))
            for field, annotation in names.items()
        }
    )


NATIVE_RESOURCES = {
    "cpu_request": "cpu-request",
    "memory_request": "memory-request",
    "cpu_limit": "cpu-limit",
    "memory_limit": "memory-limit",
}
_CONFIG_EXCLUSIVE = ("role", "proxy", "notify", "notify-process")


def native_request(
    pod: Mapping[str, Any], settings: InjectorSettings, problems: Problems, warnings: list[str]
) -> InjectionRequest:
    prefix = settings.annotation_prefix
    r = AnnotationReader(podspec.pod_annotations(pod), prefix + "/", problems)
    r.get("inject", parse_bool, True)
    r.get("status", str, "")
    config_map = r.get("config", as_dns_subdomain, None)
    config_key = r.get("config-key", as_nonempty_str, "config.yaml")
    targets = podspec.select_containers(
        pod, r.get("containers", parse_names, None), problems, r.key("containers")
    )
    secrets, secret_keys = _secrets(r)
    declared = {s.name for s in secrets}
    templates = r.starting("template-")
    perms = {name: r.get("perms-" + name, parse_mode, None) for name in r.starting("perms-")}
    for name in perms:
        if name not in templates and name not in declared:
            problems.add(
                r.key("perms-" + name), f"no file {name} (template-{name} or secret-{name})"
            )

    files = []
    names = sorted(declared | set(templates))
    if too_many_files(problems, r.key("inject"), len(names)):
        names = []
    for name in names:
        key = r.key("template-" + name) if name in templates else secret_keys[name]
        if name in templates and secret_name_problem(name):
            problems.add(key, f"{secret_name_problem(name)} (it is the file name)")
            continue
        file = FileRequest(
            name=name,
            destination=f"{NATIVE_FILES_MOUNT}/{name}",
            template=templates.get(name) or default_template(name),
            perms=perms.get(name),
            annotation=key,
        )
        if name in templates:
            hint = f"no {r.key('secret-')}{{name}} declares"
            check_template(problems, key, file, declared, hint)
        files.append(file)

    notify = r.get("notify", parse_signal_name, None)
    notify_process = r.get("notify-process", parse_regex, None)
    if notify is None and notify_process is not None:
        problems.add(r.key("notify-process"), f"needs {r.key('notify')} (the signal)")

    proxy = None
    proxy_secret = r.get("proxy", as_nonempty_str, None)
    upstream = r.get("proxy-upstream", parse_host_port, None)
    if proxy_secret is not None:
        if proxy_secret not in declared:
            problems.add(r.key("proxy"), f"{show_value(proxy_secret)} is not a declared secret")
        if upstream is None and not r.has("proxy-upstream"):
            problems.add(r.key("proxy"), f"needs {r.key('proxy-upstream')}: host:port")
        sslmode = r.get("proxy-sslmode", choice(SSLMODES), "prefer")
        if upstream is not None:
            proxy = ProxyRequest(
                secret=proxy_secret,
                upstream_host=upstream[0],
                upstream_port=upstream[1],
                listen_port=r.get("proxy-port", parse_port, 6432),
                sslmode=sslmode,
            )
    else:
        for name in ("proxy-upstream", "proxy-port", "proxy-sslmode"):
            if r.has(name):
                r.used.add(name)
                problems.add(r.key(name), f"needs {r.key('proxy')}: <secret>")

    role = r.get("role", as_nonempty_str, None)
    address = r.get("vault-address", as_http_url, settings.vault_address)
    if config_map is not None:
        clash = (
            [n for n in _CONFIG_EXCLUSIVE if r.has(n)]
            + [f"secret-{n}" for n in secret_keys]
            + [f"template-{n}" for n in templates]
        )
        for name in clash:
            problems.add(r.key(name), f"cannot be combined with {r.key('config')}")
    else:
        if role is None:  # a role per service account is the common binding
            account = podspec.spec(pod).get("serviceAccountName")
            role = account if isinstance(account, str) and account else "default"
        if address is None:
            problems.add(
                r.key("vault-address"),
                "is required: the injector has no vault_address setting",
            )
        if not files:
            problems.add(
                r.key("inject"), f"nothing to render: add {r.key('secret-')}<name>: <path>"
            )

    uid = r.get("run-as-user", parse_uid, None)
    gid = r.get("run-as-group", parse_uid, None)
    who = podspec.identity(pod, targets, uid, gid, settings.run_as_user, settings.run_as_group)
    if notify is not None:
        if not who.shared:
            problems.add(
                r.key("notify"),
                "a signal needs the sidecar to run as the application's uid: set runAsUser "
                "on the pod or the served containers",
            )
        if notify_process is None:
            notify_process = podspec.command_regex(targets)
            if notify_process is None:
                problems.add(
                    r.key("notify"),
                    "no served container declares its command: name the process with "
                    f"{r.key('notify-process')}: <regex>",
                )
    if not who.shared and who.file_gid is None and files:
        warnings.append(
            f"{prefix}: the application's uid is unknown, so rendered files are 0644; "
            "set runAsUser (or fsGroup) on the pod for 0600"
        )
    init_only = r.get("init-only", parse_bool, False)
    if init_only and (notify is not None or proxy is not None):
        problems.add(r.key("init-only"), "cannot notify or proxy: nothing runs after the start")

    request = InjectionRequest(
        origin="credsidecar",
        mode="init-only" if init_only else "sidecar",
        files_mount=NATIVE_FILES_MOUNT,
        vault_address=address,
        role=role,
        auth_mount=r.get("auth-mount", as_nonempty_str, settings.auth_mount).strip("/"),
        vault_namespace=r.get("vault-namespace", as_nonempty_str, None),
        tls_secret=r.get("tls-secret", as_dns_subdomain, settings.vault_ca_secret),
        ca_cert=r.get("ca-cert", parse_absolute, None),
        tls_skip_verify=r.get("tls-skip-verify", parse_bool, False),
        secrets=tuple(secrets),
        files=tuple(files),
        notify_signal=notify,
        notify_process=notify_process,
        proxy=proxy,
        config_map=config_map,
        config_key=config_key,
        resources=resources(r, NATIVE_RESOURCES, settings.resources),
        **served(targets, who),
        share_process_namespace=notify is not None,
        init_first=r.get("init-first", parse_bool, False),
        health_port=r.get("health-port", parse_port, settings.health_port),
        token_audience=r.get("token-audience", as_nonempty_str, settings.token_audience),
        log_level=r.get("log-level", choice(LOG_LEVELS), "info"),
    )
    for name in r.unused():
        problems.add(r.key(name), "unknown annotation")
    pod_problems(pod, request, problems, prefix)
    return request
