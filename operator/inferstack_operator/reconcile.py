"""Bring an InferenceService's children to the spec and read their state back.

Used by the create/update/resume handlers and by the timer, so it is idempotent: a child
that is missing is created, one that drifted (in the fields we set) is re-applied, one that
matches is left alone. kopf decorators live in handlers.py only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from inferstack_operator import builders
from inferstack_operator.config import OperatorSettings
from inferstack_operator.kube import ApiError, KubeClient



class NotYet(Exception):
    """The spec is fine, but something it needs is not there yet (retry later)."""

    def __init__(self, reason: str, message: str, delay: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.delay = delay


class Blocked(Exception):
    """A child the operator must not touch (e.g. owned by someone else); needs the user."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Outcome:
    resolved: builders.Resolved
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    # component ("web", "worker", "redis") -> the live child after reconciling
    children: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    # children that need the user (immutable fields changed): (reason, message)
    problem: tuple[str, str] | None = None


def _describe(manifest: Mapping[str, Any]) -> str:
    return f"{manifest['kind']} {manifest['metadata']['name']}"


def _controlled_by(child: Mapping[str, Any], owner_uid: str | None) -> bool:
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("controller") and ref.get("uid") == owner_uid for ref in refs)


def _component(manifest: Mapping[str, Any]) -> str | None:
    kind = manifest["kind"]
    if kind in ("Deployment", "StatefulSet"):
        return manifest["metadata"]["labels"].get("app.kubernetes.io/component")
    return None


async def check_claims(kube: KubeClient, namespace: str, resolved: builders.Resolved) -> None:
    """The model/labels claims must exist, or the worker pods would hang in Pending."""
    for claim in resolved.claims:
        if await kube.get("PersistentVolumeClaim", namespace, claim) is None:
            raise NotYet("WaitingForVolume",
                         f"PersistentVolumeClaim {claim!r} (from spec.model) does not exist in namespace "
                         f"{namespace!r}; create it with the model files, or fix the pvc:// location", delay=30)


def desired_children(body: kopf.Body, settings: OperatorSettings) -> tuple[builders.Resolved, list[dict[str, Any]]]:
    """Manifests for every child, owned by ``body``. Raises ``builders.SpecError``."""
    name, namespace = body.metadata.name, body.metadata.namespace
    assert name is not None and namespace is not None
    resolved = builders.resolve(name, body.get("spec"))
    manifests = builders.build_children(name, namespace, body.get("spec"), settings)
    # Names are already final (strict=True keeps them); adopt adds the ownerReference.
    kopf.adopt(manifests, owner=body, strict=True)
    return resolved, manifests


async def reconcile(body: kopf.Body, kube: KubeClient, settings: OperatorSettings) -> Outcome:
    """Create missing and re-apply drifted children. Raises SpecError, NotYet, Blocked."""
    namespace = body.metadata.namespace
    assert namespace is not None
    resolved, manifests = desired_children(body, settings)
    await check_claims(kube, namespace, resolved)
    outcome = Outcome(resolved=resolved)
    problems: list[str] = []
    for manifest in manifests:
        what = _describe(manifest)
        live = await kube.get(manifest["kind"], namespace, manifest["metadata"]["name"])
        if live is None:
            try:
                live = await kube.create(manifest)
            except ApiError as e:
                if e.status == 409:  # created meanwhile (a timer and a handler racing): look again later
                    raise NotYet("Conflict", f"{what} appeared while being created; retrying", delay=2) from e
                raise
            outcome.created.append(what)
        elif (live.get("metadata") or {}).get("deletionTimestamp"):
            raise NotYet("ChildTerminating", f"{what} is being deleted; it will be recreated once gone", delay=5)
        elif not _controlled_by(live, body.metadata.uid):
            raise Blocked("ChildConflict",
                          f"{what} already exists and is not controlled by this InferenceService; "
                          f"delete or rename it, or rename the InferenceService")
        else:
            stuck = builders.immutable_drift(manifest, live)
            if stuck:
                problems.append(f"{what}: {', '.join(stuck)} cannot change in place (e.g. spec.redis.storage); "
                                f"delete the {manifest['kind']} to have it recreated with the new spec")
            elif builders.drifted_paths(manifest, live):
                live = await kube.apply(manifest)
                outcome.updated.append(what)
        component = _component(manifest)
        if component:
            outcome.children[component] = live
    if problems:
        outcome.problem = ("ImmutableFieldChanged", "; ".join(problems))
    return outcome


async def read_children(kube: KubeClient, name: str, namespace: str) -> dict[str, dict[str, Any] | None]:
    """The live web/worker Deployments and Redis StatefulSet (None where missing)."""
    return {
        "web": await kube.get("Deployment", namespace, builders.web_name(name)),
        "worker": await kube.get("Deployment", namespace, builders.worker_name(name)),
        "redis": await kube.get("StatefulSet", namespace, builders.redis_name(name)),
    }
