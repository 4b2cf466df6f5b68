"""YAML -> frozen, validated config objects.

Validation collects every problem before failing, and each problem names its key
path and the bad value, e.g. ``templates[1].perms: "0999" is not an octal mode``.
Secret values that appear in the config (a token, a secret_id) are never echoed.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from agent.awsconfig import AwsConfig, parse_aws
from agent.childenv import EnvPolicy, parse_env, parse_sensitive, parse_values
from agent.commands import DEFAULT_MAX_OUTPUT
from agent.errors import ConfigError
from agent.rotate.config import RotateConfig, parse_rotate
from proxy.config import ProxyConfig, parse_proxy_config

# the one reader kit, shared with the proxy's config (proxy cannot import agent)
from proxy.configkit import (
    Problems,
    Section,
    as_bool,
    as_command,
    as_fraction,
    as_int,
    as_mapping,
    as_positive_int,
    as_str,
    choice,
    parse_duration,
    parse_listen,
    parse_mode,
    show_value,
)

SecretKind = Literal[
    "database", "kv", "database-static", "pki", "file", "command", "aws-secretsmanager"
]
AuthMethod = Literal["token", "approle", "kubernetes", "jwt"]
ExecReload = Literal["signal", "restart", "none"]
LogLevel = Literal["debug", "info", "warning", "error"]
SECRET_KINDS: tuple[SecretKind, ...] = get_args(SecretKind)
AUTH_METHODS: tuple[AuthMethod, ...] = get_args(AuthMethod)
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
EXEC_TARGET = "exec"  # the supervised child, as a template's notify list names it
K8S_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
DEFAULT_MAX_SIZE = 4 * 1024 * 1024  # a template's output, in bytes
# an exec.env_template value, in bytes: Linux refuses one NAME=value past 128 KiB
ENV_MAX_SIZE = 100 * 1024
# letters, digits, _, - and . (a template reaches any of them as secrets["db-admin"]);
# never starting with . or -, so a name is never a hidden or relative file name
SECRET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# names of the lease ledger's own files beside the secrets' <name>.json (agent/ledger.py)
RESERVED_SECRET_NAMES = frozenset({"retired-leases"})


def secret_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a secret, or None when it can."""
    if not SECRET_NAME.fullmatch(name):
        return "name must be letters, digits, _, - and . (not starting with . or -)"
    if name in RESERVED_SECRET_NAMES:
        return "name is reserved (a file of the lease ledger)"
    return None


def parse_signal(value: object) -> signal.Signals:
    name = str(value).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"{show_value(value)} is not a signal name") from None


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class AuthConfig:
    method: AuthMethod = "token"
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    role_id: str | None = None
    role_id_file: Path | None = None
    secret_id: str | None = field(default=None, repr=False)
    secret_id_file: Path | None = None
    role: str | None = None
    jwt_file: Path | None = None
    mount: str | None = None  # auth mount path; defaults to the method name


@dataclass(frozen=True)
class VaultConfig:
    address: str
    auth: AuthConfig
    namespace: str | None = None
    ca_cert: Path | None = None
    tls_skip_verify: bool = False
    timeout: float = 10.0
    retry_initial: float = 0.5
    retry_max: float = 30.0


@dataclass(frozen=True)
class SecretConfig:
    name: str
    kind: SecretKind
    path: str
    refresh: float | None = None  # kv/database-static/file poll; None = kind default
    params: Mapping[str, Any] = field(default_factory=dict)
    revoke_grace: float = 30.0  # database: revoke the replaced lease this long after the switch
    renew_fraction: float = 2 / 3  # renew / re-issue at this fraction of the lifetime
    command: tuple[str, ...] | None = None  # command: argv (no shell) printing a JSON object
    timeout: float = 30.0  # command: how long one run may take
    env: EnvPolicy = field(default_factory=EnvPolicy)  # command: what the command inherits
    max_output: int = DEFAULT_MAX_OUTPUT  # command: bytes of stdout it may print
    version_stage: str = "AWSCURRENT"  # aws-secretsmanager: which version to read
    aws: AwsConfig | None = None  # aws-secretsmanager: region, endpoint_url (path: secret id)


@dataclass(frozen=True)
class TemplateConfig:
    destination: Path
    contents: str | None = None
    source: Path | None = None
    perms: int = 0o600
    uid: int | None = None
    gid: int | None = None
    allow_disk: bool = False
    error_on_missing_key: bool = True
    max_size: int = DEFAULT_MAX_SIZE  # bytes of output; a render past it fails, the file stays
    notify: tuple[str, ...] | None = (
        None  # targets its changes trigger (exec: the child); None: all
    )

    @property
    def name(self) -> str:
        return str(self.destination)


@dataclass(frozen=True)
class Wait:
    min: float = 0.2
    max: float = 2.0


@dataclass(frozen=True)
class NotifyConfig:
    name: str
    signal: signal.Signals = signal.SIGHUP
    pid_file: Path | None = None
    pid: int | None = None
    process: str | None = None  # regex on the target's command line
    command: tuple[str, ...] | None = None
    wait: Wait = field(default_factory=Wait)
    timeout: float = 30.0  # for command
    env: EnvPolicy = field(default_factory=EnvPolicy)  # for command


@dataclass(frozen=True)
class EnvTemplateConfig:
    """One variable of ``exec.env_template``: a template whose output is its value."""

    variable: str
    contents: str
    source: None = None
    error_on_missing_key: bool = True
    max_size: int = ENV_MAX_SIZE
    notify: tuple[str, ...] = (EXEC_TARGET,)  # a changed value restarts the child

    @property
    def name(self) -> str:
        return f"exec.env_template.{self.variable}"


@dataclass(frozen=True)
class ExecConfig:
    command: tuple[str, ...]
    reload: ExecReload = "signal"
    signal: signal.Signals = signal.SIGHUP
    env: EnvPolicy = field(default_factory=EnvPolicy)
    wait: Wait = field(default_factory=Wait)
    kill_timeout: float = 30.0
    env_template: tuple[EnvTemplateConfig, ...] = ()  # templated variables; a change restarts


@dataclass(frozen=True)
class HealthConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080


ADMIN_SOCKET = "admin.sock"


@dataclass(frozen=True)
class AdminApiConfig:
    """The admin API (``/status``, refresh, rotate): owner-only, never on the probe port.

    A unix socket (``socket``, default ``<state_dir>/admin.sock``, 0600) and/or TCP
    (``listen``), where every request must carry ``Authorization: Bearer`` with the
    token in ``token_file``.
    """

    socket: Path | None
    listen_host: str | None = None
    listen_port: int | None = None
    token_file: Path | None = None


@dataclass(frozen=True)
class Config:
    vault: VaultConfig | None
    secrets: Mapping[str, SecretConfig]
    templates: tuple[TemplateConfig, ...]
    notify: Mapping[str, NotifyConfig]
    exec: ExecConfig | None
    health: HealthConfig | None
    state_dir: Path
    log_level: LogLevel = "info"
    revoke_on_shutdown: bool = False
    proxy: ProxyConfig | None = None
    source_path: Path | None = None
    rotate: Mapping[str, RotateConfig] = field(default_factory=dict)
    admin: AdminApiConfig | None = None  # None: no admin API at all (admin: {socket: false})

    @property
    def base_dir(self) -> Path:
        """Relative paths in the config are relative to the config file's directory."""
        return self.source_path.parent if self.source_path else Path.cwd()

    def needs_vault(self) -> bool:
        return needs_vault(self.secrets, self.rotate)


# kinds whose values come from somewhere other than Vault
_NOT_VAULT = ("file", "command", "aws-secretsmanager")


def needs_vault(secrets: Mapping[str, SecretConfig], rotate: Mapping[str, RotateConfig]) -> bool:
    """A Vault login is needed for a Vault secret or a rotation stored in KV v2."""
    return any(s.kind not in _NOT_VAULT for s in secrets.values()) or any(
        r.store_kind == "vault_kv" for r in rotate.values()
    )


# --------------------------------------------------------------------------- reading


def _wait(problems: Problems, path: str, raw: object) -> Wait:
    if isinstance(raw, str | int | float) and not isinstance(raw, bool):
        try:
            d = parse_duration(raw)
        except ValueError as exc:
            problems.add(path, str(exc))
            return Wait()
        return Wait(min=d, max=max(d, d * 4))
    s = Section(problems, path, raw, ("min", "max"))
    w = Wait(min=s.get("min", parse_duration, Wait.min), max=s.get("max", parse_duration, Wait.max))
    if w.max < w.min:
        problems.add(path + ".max", f"{w.max:g}s is shorter than min {w.min:g}s")
    return w


def _log_level(value: object) -> LogLevel:
    return choice(LOG_LEVELS)(as_str(value).lower())


def _auth(problems: Problems, raw: object, env: Mapping[str, str], base: Path) -> AuthConfig:
    s = Section(
        problems,
        "vault.auth",
        raw,
        (
            "method",
            "token",
            "token_file",
            "role_id",
            "role_id_file",
            "secret_id",
            "secret_id_file",
            "role",
            "jwt_file",
            "mount",
        ),
    )

    def path(value: object) -> Path:
        return base / as_str(value)

    method: AuthMethod = s.get("method", choice(AUTH_METHODS), "token")
    auth = AuthConfig(
        method=method,
        token=s.get("token", as_str, None, secret=True),
        token_file=s.get("token_file", path, None),
        role_id=s.get("role_id", as_str, None),
        role_id_file=s.get("role_id_file", path, None),
        secret_id=s.get("secret_id", as_str, None, secret=True),
        secret_id_file=s.get("secret_id_file", path, None),
        role=s.get("role", as_str, None),
        jwt_file=s.get("jwt_file", path, None),
        mount=s.get("mount", as_str, None),
    )
    if method == "token" and not (auth.token or auth.token_file):
        token = env.get("VAULT_TOKEN")
        if token:
            auth = AuthConfig(method="token", token=token, mount=auth.mount)
        else:
            problems.add("vault.auth", "method token needs token_file (or VAULT_TOKEN)")
    if method == "approle":
        if not (auth.role_id or auth.role_id_file):
            problems.add("vault.auth.role_id", "is required for approle (or role_id_file)")
        if not (auth.secret_id or auth.secret_id_file):
            problems.add("vault.auth.secret_id_file", "is required for approle (or secret_id)")
    if method in ("kubernetes", "jwt"):
        if not auth.role:
            problems.add("vault.auth.role", f"is required for {method}")
        if method == "jwt" and not auth.jwt_file:
            problems.add("vault.auth.jwt_file", "is required for jwt")
        if method == "kubernetes" and not auth.jwt_file:
            auth = AuthConfig(**{**auth.__dict__, "jwt_file": Path(K8S_TOKEN_PATH)})
    return auth


def _vault(problems: Problems, raw: object, env: Mapping[str, str], base: Path) -> VaultConfig:
    s = Section(
        problems,
        "vault",
        raw,
        ("address", "auth", "namespace", "ca_cert", "tls_skip_verify", "timeout", "retry"),
    )
    address = s.get("address", as_str, env.get("VAULT_ADDR", ""))
    if not address:
        problems.add("vault.address", "is required (or set VAULT_ADDR)")
    elif not re.match(r"^https?://", address):
        problems.add("vault.address", f"{show_value(address)} is not an http:// or https:// URL")
    ca = s.get("ca_cert", as_str, env.get("VAULT_CACERT") or None)
    skip_env = env.get("VAULT_SKIP_VERIFY", "").lower() in ("1", "true", "yes")
    retry = Section(problems, "vault.retry", s.raw.get("retry"), ("initial", "max"))
    return VaultConfig(
        address=address.rstrip("/"),
        auth=_auth(problems, s.raw.get("auth"), env, base),
        namespace=s.get("namespace", as_str, env.get("VAULT_NAMESPACE") or None),
        ca_cert=(base / ca) if ca else None,
        tls_skip_verify=s.get("tls_skip_verify", as_bool, skip_env),
        timeout=s.get("timeout", parse_duration, 10.0),
        retry_initial=retry.get("initial", parse_duration, 0.5),
        retry_max=retry.get("max", parse_duration, 30.0),
    )


_SECRET_KEYS = ("kind", "path", "refresh", "params", "revoke_grace", "renew_fraction")
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "command": ("kind", "command", "refresh", "timeout", "env", "max_output"),
    "aws-secretsmanager": (
        "kind",
        "secret_id",
        "version_stage",
        "refresh",
        "region",
        "endpoint_url",
    ),
}


def _secret(
    problems: Problems, name: str, raw: object, base: Path, sensitive: tuple[str, ...]
) -> SecretConfig:
    path = f"secrets.{name}"
    kind: SecretKind = Section(problems, path, raw).required("kind", choice(SECRET_KINDS), "file")
    s = Section(problems, path, raw, _KIND_KEYS.get(kind, _SECRET_KEYS))
    if kind == "command":
        timeout = s.get("timeout", parse_duration, 30.0)
        if timeout <= 0:
            problems.add(f"{path}.timeout", "must be longer than 0s")
        return SecretConfig(
            name=name,
            kind=kind,
            path="",
            command=s.required("command", as_command, None, why="for kind command"),
            refresh=s.get("refresh", parse_duration, None),
            timeout=timeout,
            env=parse_env(problems, f"{path}.env", s.raw.get("env"), sensitive),
            max_output=s.get("max_output", as_positive_int, DEFAULT_MAX_OUTPUT),
        )
    if kind == "aws-secretsmanager":
        return SecretConfig(
            name=name,
            kind=kind,
            path=s.required("secret_id", as_str, "", why="(a secret name or ARN)"),
            version_stage=s.get("version_stage", as_str, "AWSCURRENT"),
            refresh=s.get("refresh", parse_duration, None),
            aws=parse_aws(s),
        )
    where = s.required("path", as_str, "")
    if kind == "file" and where:
        where = str(base / where)
    params: Mapping[str, Any] = s.get("params", as_mapping, {})
    if kind == "pki" and "common_name" not in params:
        problems.add(f"{path}.params.common_name", "is required for a pki secret")
    return SecretConfig(
        name=name,
        kind=kind,
        path=where,
        refresh=s.get("refresh", parse_duration, None),
        params=params,
        revoke_grace=s.get("revoke_grace", parse_duration, 30.0),
        renew_fraction=s.get("renew_fraction", as_fraction, 2 / 3),
    )


_TEMPLATE_KEYS = (
    "destination",
    "contents",
    "source",
    "perms",
    "uid",
    "gid",
    "allow_disk",
    "error_on_missing_key",
    "max_size",
    "notify",
)


def _target_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{show_value(value)} is not a list of notifier names")
    return tuple(value)


def _template(problems: Problems, index: int, raw: object, base: Path) -> TemplateConfig:
    path = f"templates[{index}]"
    s = Section(problems, path, raw, _TEMPLATE_KEYS)
    contents = s.get("contents", as_str, None)
    source = s.get("source", lambda v: base / as_str(v), None)
    if (contents is None) == (source is None):
        problems.add(path, "needs exactly one of contents or source")
    if source is not None and not source.is_file():
        problems.add(f"{path}.source", f"{show_value(str(source))} does not exist")
    return TemplateConfig(
        destination=base / s.required("destination", as_str, "."),
        contents=contents,
        source=source,
        perms=s.get("perms", parse_mode, 0o600),
        uid=s.get("uid", as_int, None),
        gid=s.get("gid", as_int, None),
        allow_disk=s.get("allow_disk", as_bool, False),
        error_on_missing_key=s.get("error_on_missing_key", as_bool, True),
        max_size=s.get("max_size", as_positive_int, DEFAULT_MAX_SIZE),
        notify=s.get("notify", _target_names, None),
    )


def _check_targets(
    problems: Problems,
    templates: list[TemplateConfig],
    notifiers: Mapping[str, NotifyConfig],
    has_exec: bool,
) -> None:
    """Every name in a template's ``notify`` list is a notifier, or ``exec`` for the child."""
    known = sorted(notifiers) + ([EXEC_TARGET] if has_exec else [])
    listed = ", ".join(known) if known else "none configured"
    for i, template in enumerate(templates):
        for j, name in enumerate(template.notify or ()):
            where = f"templates[{i}].notify[{j}]"
            if name == EXEC_TARGET and has_exec and name in notifiers:
                problems.add(
                    where, f"{show_value(name)} names both notify.{name} and the exec child"
                )
            elif name not in known:
                problems.add(where, f"{show_value(name)} is not a notify target (known: {listed})")


_NOTIFY_KEYS = ("signal", "pid_file", "pid", "process", "command", "wait", "timeout", "env")


def _notify(
    problems: Problems, name: str, raw: object, base: Path, sensitive: tuple[str, ...]
) -> NotifyConfig:
    path = f"notify.{name}"
    s = Section(problems, path, raw, _NOTIFY_KEYS)

    def regex(value: object) -> str:
        text = as_str(value)
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"{show_value(text)} is not a regular expression: {exc}") from None
        return text

    cfg = NotifyConfig(
        name=name,
        signal=s.get("signal", parse_signal, signal.SIGHUP),
        pid_file=s.get("pid_file", lambda v: base / as_str(v), None),
        pid=s.get("pid", as_int, None),
        process=s.get("process", regex, None),
        command=s.get("command", as_command, None),
        wait=_wait(problems, f"{path}.wait", s.raw.get("wait")),
        timeout=s.get("timeout", parse_duration, 30.0),
        env=parse_env(problems, f"{path}.env", s.raw.get("env"), sensitive),
    )
    if s.has("env") and cfg.command is None:
        problems.add(f"{path}.env", "applies to a command target only")
    targets = [k for k in ("pid_file", "pid", "process", "command") if s.raw.get(k) is not None]
    if len(targets) != 1:
        problems.add(path, "needs exactly one of pid_file, pid, process or command")
    return cfg


_EXEC_KEYS = ("command", "reload", "signal", "env", "env_template", "wait", "kill_timeout")


def _exec(problems: Problems, raw: object, sensitive: tuple[str, ...]) -> ExecConfig:
    s = Section(problems, "exec", raw, _EXEC_KEYS)
    reload: ExecReload = s.get("reload", choice(get_args(ExecReload)), "signal")
    env = parse_env(problems, "exec.env", s.raw.get("env"), sensitive, legacy=True)
    templated = {}
    if s.has("env_template"):
        raw_templates = s.raw["env_template"]
        if isinstance(raw_templates, Mapping):
            templated = parse_values(problems, "exec.env_template", raw_templates)
        else:
            problems.add("exec.env_template", "must be a mapping NAME: TEMPLATE")
    for name in sorted(templated.keys() & env.set.keys()):
        problems.add(f"exec.env_template.{name}", "is also set in exec.env: name it once")
    return ExecConfig(
        command=s.required("command", as_command, ("true",)),
        reload=reload,
        signal=s.get("signal", parse_signal, signal.SIGHUP),
        env=env,
        wait=_wait(problems, "exec.wait", s.raw.get("wait")),
        kill_timeout=s.get("kill_timeout", parse_duration, 30.0),
        env_template=tuple(EnvTemplateConfig(n, t) for n, t in templated.items()),
    )


_TOP_KEYS = (
    "vault",
    "secrets",
    "templates",
    "notify",
    "exec",
    "health",
    "state_dir",
    "log_level",
    "revoke_on_shutdown",
    "proxy",
    "rotate",
    "admin",
    "sensitive_env",
)

_LOOPBACK = re.compile(r"^(localhost|127(\.\d{1,3}){3}|::1)$")


def _admin(problems: Problems, raw: object, state_dir: Path, base: Path) -> AdminApiConfig | None:
    s = Section(problems, "admin", raw, ("socket", "listen", "token_file"), base_dir=base)
    socket: Path | None = state_dir / ADMIN_SOCKET
    if s.raw.get("socket") is False:
        socket = None
    elif s.has("socket"):
        socket = s.path_value("socket")
    host = port = None
    if s.has("listen"):
        host, port = s.get("listen", parse_listen, ("127.0.0.1", 8081))
    token_file = s.path_value("token_file")
    if host is not None and token_file is None:
        where = "" if _LOOPBACK.match(host) else f" (and {host} is not a loopback address)"
        problems.add(
            "admin.token_file",
            f"is required with admin.listen{where}: every TCP request must carry its bearer token",
        )
    if token_file is not None and host is None:
        problems.add("admin.token_file", "applies to admin.listen (TCP) only")
    if socket is None and host is None:
        return None
    return AdminApiConfig(socket=socket, listen_host=host, listen_port=port, token_file=token_file)


def parse_config(
    raw: object, *, base_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Validate a parsed YAML document. Raises :class:`ConfigError` listing every problem."""
    env = os.environ if env is None else env
    base = base_dir or Path.cwd()
    problems = Problems()
    top = Section(problems, "", raw, _TOP_KEYS)
    sensitive = parse_sensitive(problems, "sensitive_env", top.raw.get("sensitive_env"))

    secrets_raw = top.raw.get("secrets") or {}
    secrets: dict[str, SecretConfig] = {}
    if not isinstance(secrets_raw, Mapping):
        problems.add("secrets", "must be a mapping of name -> secret")
    else:
        for name, sraw in secrets_raw.items():
            problem = secret_name_problem(str(name))
            if problem:
                problems.add(f"secrets.{name}", problem)
            secrets[str(name)] = _secret(problems, str(name), sraw, base, sensitive)

    templates_raw = top.raw.get("templates") or []
    templates: list[TemplateConfig] = []
    if not isinstance(templates_raw, list):
        problems.add("templates", "must be a list")
    else:
        templates = [_template(problems, i, t, base) for i, t in enumerate(templates_raw)]
        seen: set[Path] = set()
        for i, t in enumerate(templates):
            if t.destination in seen:
                problems.add(
                    f"templates[{i}].destination", f"{show_value(str(t.destination))} twice"
                )
            seen.add(t.destination)

    notify_raw = top.raw.get("notify") or {}
    notify: dict[str, NotifyConfig] = {}
    if not isinstance(notify_raw, Mapping):
        problems.add("notify", "must be a mapping of name -> target")
    else:
        notify = {
            str(n): _notify(problems, str(n), r, base, sensitive) for n, r in notify_raw.items()
        }

    rotate = parse_rotate(top.raw.get("rotate"), problems, secrets, base, sensitive)
    vault = None
    if "vault" in top.raw or needs_vault(secrets, rotate):
        vault = _vault(problems, top.raw.get("vault"), env, base)

    health = None
    if top.raw.get("health") is not None:
        hs = Section(problems, "health", top.raw["health"], ("listen",))
        host, port = hs.get("listen", parse_listen, ("127.0.0.1", 8080))
        health = HealthConfig(listen_host=host, listen_port=port)

    level: LogLevel = top.get("log_level", _log_level, "info")

    proxy = None
    if top.has("proxy"):
        proxy = parse_proxy_config(top.raw["proxy"], base, problems)
        secret = proxy.credentials.secret
        if secret is not None and secret not in secrets and secret not in rotate:
            problems.add(
                "proxy.credentials.secret",
                f"{show_value(secret)} is not a secret in secrets or rotate",
            )

    state_dir = base / top.get("state_dir", as_str, "/dev/shm/credsidecar")
    exec_raw = top.raw.get("exec")
    _check_targets(problems, templates, notify, exec_raw is not None)
    config = Config(
        vault=vault,
        secrets=secrets,
        templates=tuple(templates),
        notify=notify,
        exec=_exec(problems, exec_raw, sensitive) if exec_raw is not None else None,
        health=health,
        state_dir=state_dir,
        log_level=level,
        revoke_on_shutdown=top.get("revoke_on_shutdown", as_bool, False),
        proxy=proxy,
        rotate=rotate,
        admin=_admin(problems, top.raw.get("admin"), state_dir, base),
    )
    if problems:
        raise ConfigError(problems.items)
    return config


def parse_config_text(
    text: str, origin: str, base_dir: Path, env: Mapping[str, str] | None = None
) -> Config:
    """Validate a YAML (or JSON) document; ``origin`` names it in errors."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        reason = getattr(exc, "problem", None) or "malformed YAML"
        raise ConfigError([f"{where}: malformed YAML: {reason}"]) from None
    if raw is None:
        raise ConfigError([f"{origin}: the config is empty"])
    return parse_config(raw, base_dir=base_dir, env=env)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read config: {exc.strerror}"]) from None
    config = parse_config_text(text, str(p), p.resolve().parent, env)
    return Config(**{**config.__dict__, "source_path": p.resolve()})
