"""Reading the pod the annotations sit on: its containers, users, ports and volumes.

The pod object comes from the API server, but a webhook trusts no input: every
accessor tolerates missing or wrongly typed fields and answers "not set".
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.configkit import Problems


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def pod_annotations(pod: Mapping[str, Any]) -> dict[str, str]:
    raw = _mapping(_mapping(pod.get("metadata")).get("annotations"))
    return {str(k): v if isinstance(v, str) else str(v) for k, v in raw.items()}


def spec(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(pod.get("spec"))


def containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return _list(spec(pod).get("containers"))


def init_containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return _list(spec(pod).get("initContainers"))


def volume_names(pod: Mapping[str, Any]) -> set[str]:
    return {str(v.get("name")) for v in _list(spec(pod).get("volumes"))}


def declared_ports(pod: Mapping[str, Any]) -> Iterator[tuple[str, int]]:
    for container in containers(pod) + init_containers(pod):
        for port in _list(container.get("ports")):
            number = port.get("containerPort")
            if isinstance(number, int):
                yield str(container.get("name")), number


def _pod_security(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(spec(pod).get("securityContext"))


def fs_group(pod: Mapping[str, Any]) -> int | None:
    value = _pod_security(pod).get("fsGroup")
    return value if isinstance(value, int) and value > 0 else None


def _effective(pod: Mapping[str, Any], container: Mapping[str, Any], key: str) -> int | None:
    value = _mapping(container.get("securityContext")).get(key)
    if value is None:
        value = _pod_security(pod).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def select_containers(
    pod: Mapping[str, Any], names: tuple[str, ...] | None, problems: Problems, annotation: str
) -> list[Mapping[str, Any]]:
    """The app containers to serve: all, or those named (each must exist)."""
    every = containers(pod)
    if names is None:
        return every
    known = {str(c.get("name")) for c in every}
    for name in names:
        if name not in known:
            problems.add(annotation, f'"{name}" is not a container of this pod')
    return [c for c in every if c.get("name") in names]


@dataclass(frozen=True)
class Identity:
    """Who the sidecar runs as, and whether that is the application's own uid."""

    uid: int
    gid: int
    shared: bool  # the same uid as every served container: 0600 files, signals allowed
    file_gid: int | None  # group of rendered files when the uid is not shared (fsGroup)

    @property
    def default_perms(self) -> int:
        if self.shared:
            return 0o600
        return 0o640 if self.file_gid is not None else 0o644


def identity(
    pod: Mapping[str, Any],
    targets: list[Mapping[str, Any]],
    uid: int | None,
    gid: int | None,
    default_uid: int,
    default_gid: int,
) -> Identity:
    """The sidecar's uid/gid: as asked, else the served containers' common non-root uid
    (so it may write 0600 files they can read, and signal them), else the defaults."""
    uids = {_effective(pod, c, "runAsUser") for c in targets}
    common = uids.pop() if len(uids) == 1 else None
    if common == 0:
        common = None  # the sidecar never runs as root
    gids = {_effective(pod, c, "runAsGroup") for c in targets}
    common_gid = gids.pop() if len(gids) == 1 else None
    run_uid = uid if uid is not None else common if common is not None else default_uid
    shared = common is not None and run_uid == common
    run_gid = gid if gid is not None else common_gid if shared and common_gid else default_gid
    return Identity(run_uid, run_gid, shared, None if shared else fs_group(pod))


def command_regex(targets: list[Mapping[str, Any]]) -> str | None:
    """A regex matching the served containers' processes by their ``command`` (what
    /proc/<pid>/cmdline starts with); None when no served container declares one."""
    forms = []
    for container in targets:
        command = container.get("command")
        if isinstance(command, list) and command and all(isinstance(c, str) for c in command):
            forms.append(re.escape(" ".join(command)))
    if not forms:
        return None
    return "^(" + "|".join(forms) + r")(\s|$)"
