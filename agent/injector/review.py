"""One AdmissionReview in, one answer out. Pure: no I/O, no clock, no shared state.

A malformed review (not JSON, not ``admission.k8s.io/v1``, no ``uid``, no pod) is an
HTTP 400 with the reason. A well-formed one always gets a 200 AdmissionReview: the pod
unchanged, patched, or denied with every problem under its annotation name (or, with
``on_invalid: warn``, allowed unchanged with those problems as warnings).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.injector import pod as podspec
from agent.injector.agentconfig import agent_config, config_problems
from agent.injector.annotations import already_injected, native_request, parse_bool
from agent.injector.patch import pod_patch
from agent.injector.settings import InjectorSettings
from agent.injector.vaultcompat import vault_injected, vault_request, wants_injection
from agent.logs import event
from proxy.configkit import Problems

API_VERSION = "admission.k8s.io/v1"


class MalformedReview(ValueError):
    """The body is not an AdmissionReview this webhook can answer (HTTP 400)."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    patch: list[dict[str, Any]] | None = None
    message: str | None = None
    warnings: tuple[str, ...] = ()
    outcome: str = "skipped"  # skipped | patched | denied | warned | failed


def _parse(body: bytes) -> tuple[str, Mapping[str, Any] | None, Mapping[str, Any]]:
    """(uid, the pod or None when the request is not about creating a pod, the request)."""
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedReview(f"the body is not JSON: {exc}") from None
    if not isinstance(review, dict):
        raise MalformedReview("the body is not a JSON object")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise MalformedReview(f"not an AdmissionReview of {API_VERSION}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("request is missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("request.uid is missing")
    kind = request.get("kind")
    is_pod = isinstance(kind, dict) and (kind.get("group"), kind.get("kind")) == ("", "Pod")
    if not is_pod or request.get("operation") != "CREATE" or request.get("subResource"):
        return uid, None, request
    pod = request.get("object")
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        raise MalformedReview("request.object is not a pod")
    if not isinstance(pod["spec"].get("containers"), list):
        raise MalformedReview("request.object.spec.containers is not a list")
    return uid, pod, request


def pod_name(pod: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else {}
    assert isinstance(metadata, Mapping)
    name = metadata.get("name") or f"{metadata.get('generateName') or ''}*"
    namespace = request.get("namespace") or metadata.get("namespace") or "default"
    return f"{namespace}/{name}"


def decide(pod: Mapping[str, Any], settings: InjectorSettings) -> Decision:
    """What to do with one pod being created."""
    prefix = settings.annotation_prefix
    annotations = podspec.pod_annotations(pod)
    native = f"{prefix}/inject" in annotations
    vault = settings.vault_compat and wants_injection(annotations)
    if not (native or vault) or already_injected(pod, prefix):
        return Decision(allowed=True)
    if not native and vault_injected(annotations):
        return Decision(allowed=True)  # Vault Agent Injector got there first
    problems, warnings = Problems(), list[str]()
    if native:
        try:
            if not parse_bool(annotations[f"{prefix}/inject"]):
                return Decision(allowed=True)
        except ValueError as exc:
            problems.add(f"{prefix}/inject", str(exc))
        if vault:
            problems.add(f"{prefix}/inject", "also annotated for Vault Agent: choose one")
        request = native_request(pod, settings, problems, warnings)
    else:
        request = vault_request(pod, settings, problems, warnings)
    if not problems and request.config_map is None:
        for problem in config_problems(agent_config(request)):
            problems.add(f"{prefix}/inject", f"the generated config is invalid: {problem}")
    if problems:
        if settings.on_invalid == "warn":
            return Decision(True, warnings=(*warnings, *problems.items), outcome="warned")
        return Decision(False, message="; ".join(problems.items), outcome="denied")
    return Decision(
        True, pod_patch(pod, request, settings), warnings=tuple(warnings), outcome="patched"
    )


def review(body: bytes, settings: InjectorSettings) -> bytes:
    """The AdmissionReview answer to ``body``. Raises MalformedReview (HTTP 400)."""
    uid, pod, request = _parse(body)
    if pod is None:
        decision = Decision(allowed=True)
        where = str(request.get("name") or "")
    else:
        where = pod_name(pod, request)
        try:
            decision = decide(pod, settings)
        except Exception as exc:  # a bug must deny this pod, never crash the webhook
            event("injector_failed", logging.ERROR, pod=where, error=type(exc).__name__)
            decision = Decision(
                False, message=f"internal error ({type(exc).__name__})", outcome="failed"
            )
    response: dict[str, Any] = {"uid": uid, "allowed": decision.allowed}
    if decision.patch is not None:
        patch = json.dumps(decision.patch, separators=(",", ":")).encode()
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(patch).decode()
    if decision.message is not None:
        message = f"credsidecar injector refused pod {where}: {decision.message}"
        response["status"] = {"code": 400, "reason": "BadRequest", "message": message}
    if decision.warnings:
        response["warnings"] = list(decision.warnings)
    if decision.outcome != "skipped":
        event("admission", pod=where, uid=uid, outcome=decision.outcome)
    answer = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
    return json.dumps(answer, separators=(",", ":")).encode()
