"""Bring an InferenceService's children to the spec and read their state back.

Used by the create/update/resume handlers and by the timer, so it is idempotent: a child
that is missing is created, one that drifted (in the fields we set) is re-applied, one that
matches is left alone. Every failure is a ``ReconcileError``. kopf decorators live in handlers.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from inferstack_operator import builders, builders_autoscaling, drift, names, reasons, spec, status
from inferstack_operator.config import OperatorSettings
from inferstack_operator.credentials import RedisAuth
from inferstack_operator.kube import ApiError, KubeClient
from inferstack_operator.reasons import ReconcileError

Live = dict[str, Any]


@dataclass
class Observed:
    """The live workloads (component -> object or None) and the pods of those not yet ready."""

    children: dict[str, Live | None] = field(default_factory=dict)
    pods: dict[str, list[Live]] = field(default_factory=dict)


@dataclass
class Outcome:
    resolved: spec.Resolved
    observed: Observed
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    # the Autoscaling condition (status, reason, message); None when no tier is autoscaled
    autoscaling: tuple[bool, str, str] | None = None
    # children that need the user (immutable fields changed): (reason, message)
    problem: tuple[str, str] | None = None
    # user settings the operator overrides, for the status message
    notes: list[str] = field(default_factory=list)


def resolve_body(body: Mapping[str, Any], settings: OperatorSettings) -> spec.Resolved:
    """The InferenceService's spec, resolved. Raises ``SpecError``."""
    meta = body.get("metadata") or {}
    r = spec.resolve(meta["name"], meta["namespace"], body.get("spec"), settings.cluster_domain)
    spec.check_images(r, settings.allowed_images)
    return r


async def redis_auth(kube: KubeClient, r: spec.Resolved, owner_uid: str | None) -> RedisAuth:
    """The passwords in our live Secret, so they stay put across resyncs; new ones when it is
    missing (first create, or deleted to rotate them) or is not ours."""
    live = await kube.get("Secret", r.namespace, names.auth_secret_name(r.name))
    found = RedisAuth.from_secret(live) if live is not None and _controlled_by(live, owner_uid) else None
    return found or RedisAuth.generate()


def _describe(manifest: Mapping[str, Any]) -> str:
    return f"{manifest['kind']} {manifest['metadata']['name']}"


def _controlled_by(child: Mapping[str, Any], owner_uid: str | None) -> bool:
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("controller") and ref.get("uid") == owner_uid for ref in refs)


def api_failure(e: ApiError) -> ReconcileError:
    # 400/422: the API server refused a child built from this spec (e.g. a bad affinity);
    # retrying will not help until the spec changes.
    if e.status in (400, 422):
        return ReconcileError(reasons.APPLY_FAILED, f"the API server refused a child object: {e.message}",
                              permanent=True)
    return ReconcileError(reasons.API_ERROR, str(e), delay=30 if e.status == 403 else 10)


async def check_claims(kube: KubeClient, r: spec.Resolved) -> None:
    """The model/labels claims must exist, or the worker pods would hang in Pending."""
    for claim in r.claims:
        if await kube.get("PersistentVolumeClaim", r.namespace, claim) is None:
            raise ReconcileError(
                reasons.WAITING_FOR_VOLUME,
                f"PersistentVolumeClaim {claim!r} (from spec.model) does not exist in namespace "
                f"{r.namespace!r}; create it with the model files, or fix the pvc:// location", delay=30)


SCALE_FROM_ZERO_TIMEOUT_S = 120


def autoscaling_condition(r: spec.Resolved, served: set[str]) -> tuple[bool, str, str] | None:
    if r.worker_autoscaling is None and r.web_autoscaling is None:
        return None
    parts = []
    if r.web_autoscaling:
        a = r.web_autoscaling
        parts.append(f"a HorizontalPodAutoscaler keeps web between {a.min_replicas} and {a.max_replicas} pods "
                     f"at {a.target_cpu_percent}% CPU")
    if r.worker_autoscaling and builders_autoscaling.KEDA_API not in served:
        fixed = builders_autoscaling.without_keda(r).worker_replicas
        return False, reasons.KEDA_NOT_INSTALLED, (
            f"spec.worker.autoscaling needs KEDA ({builders_autoscaling.KEDA_API} is not served by this cluster): "
            f"workers run at a fixed {fixed} until KEDA is installed" + "".join(f"; {p}" for p in parts))
    if r.worker_autoscaling:
        a2 = r.worker_autoscaling
        parts.insert(0, f"KEDA keeps workers between {a2.min_replicas} and {a2.max_replicas} pods, one per "
                        f"{a2.target_queue_length} queued requests")
        if a2.min_replicas == 0 and r.request_timeout_s < SCALE_FROM_ZERO_TIMEOUT_S:
            # A worker's start (pull, model load, warm-up) takes ~30 s on CPU: the first request would time out.
            parts.append(f"note: spec.web.requestTimeoutSeconds ({r.request_timeout_s}) is short for a request that "
                         f"waits for a worker to start from zero; {SCALE_FROM_ZERO_TIMEOUT_S} or more is safer")
    return True, reasons.AUTOSCALING_ACTIVE, "; ".join(parts)


async def _prune(body: kopf.Body, kube: KubeClient, outcome: Outcome, settings: OperatorSettings,
                 served: set[str]) -> None:
    """Delete children of ours that the spec no longer wants (e.g. autoscaling turned off)."""
    r = outcome.resolved
    for kind, name in builders.unwanted_children(r, settings, served):
        live = await kube.get(kind, r.namespace, name)
        meta = (live or {}).get("metadata") or {}
        if live is not None and not meta.get("deletionTimestamp") and _controlled_by(live, body.metadata.uid):
            await kube.delete(kind, r.namespace, name)
            outcome.deleted.append(f"{kind} {name}")


async def _apply_children(body: kopf.Body, kube: KubeClient, outcome: Outcome, settings: OperatorSettings) -> None:
    r = outcome.resolved
    served = {api for api in sorted(builders.required_apis()) if await kube.served(api)}
    outcome.autoscaling = autoscaling_condition(r, served)
    wanted = builders.build_children(r, settings, served)
    # Names are already final (strict=True keeps them); adopt adds the ownerReference.
    kopf.adopt([m for _, m in wanted], owner=body, strict=True)
    problems: list[str] = []
    for child, manifest in wanted:
        drift.stamp(manifest)
        what = _describe(manifest)
        live = await kube.get(manifest["kind"], r.namespace, manifest["metadata"]["name"])
        if live is None:
            live = await kube.apply(manifest)
            outcome.created.append(what)
        elif (live.get("metadata") or {}).get("deletionTimestamp"):
            raise ReconcileError(reasons.CHILD_TERMINATING,
                                 f"{what} is being deleted; it will be recreated once gone", delay=5)
        elif not _controlled_by(live, body.metadata.uid):
            raise ReconcileError(reasons.CHILD_CONFLICT,
                                 f"{what} already exists and is not controlled by this InferenceService; "
                                 f"delete or rename it, or rename the InferenceService", permanent=True)
        else:
            stuck = drift.immutable_drift(manifest, live)
            if stuck:
                problems.append(f"{what}: {', '.join(stuck)} cannot change in place (e.g. spec.redis.storage); "
                                f"delete the {manifest['kind']} to have it recreated with the new spec")
            elif drift.drifted_paths(manifest, live):
                live = await kube.apply(manifest)
                outcome.updated.append(what)
        if child.component:
            outcome.observed.children[child.component] = live
    if problems:
        outcome.problem = (reasons.IMMUTABLE_FIELD_CHANGED, "; ".join(problems))
    await _prune(body, kube, outcome, settings, served)


async def reconcile(body: kopf.Body, kube: KubeClient, settings: OperatorSettings) -> Outcome:
    """Create missing and re-apply drifted children. Raises ``ReconcileError`` only."""
    r = resolve_body(body, settings)
    outcome = Outcome(resolved=r, observed=Observed(), notes=builders.ignored_settings(r, settings))
    try:
        await check_claims(kube, r)
        outcome.resolved = r = dataclasses.replace(r, redis_auth=await redis_auth(kube, r, body.metadata.uid))
        await _apply_children(body, kube, outcome, settings)
        outcome.observed.pods = await read_pods(kube, r, outcome.observed.children)
    except ApiError as e:
        raise api_failure(e) from e
    return outcome


async def read_pods(kube: KubeClient, r: spec.Resolved, children: Mapping[str, Live | None]
                    ) -> dict[str, list[Live]]:
    """Pods of the workloads that have fewer ready pods than wanted (why they wait goes to status)."""
    pods: dict[str, list[Live]] = {}
    for component, wanted in status.desired_replicas(r, children).items():
        if children.get(component) is not None and status.ready_replicas(children.get(component)) < wanted:
            pods[component] = await kube.list_objects("Pod", r.namespace, names.label_selector(r.name, component))
    return pods


async def observe(kube: KubeClient, r: spec.Resolved) -> Observed:
    """The live web/worker Deployments, Redis StatefulSet, and pods of those not ready."""
    children = {
        names.WEB: await kube.get("Deployment", r.namespace, names.web_name(r.name)),
        names.WORKER: await kube.get("Deployment", r.namespace, names.worker_name(r.name)),
        names.REDIS: await kube.get("StatefulSet", r.namespace, names.redis_name(r.name)),
    }
    return Observed(children=children, pods=await read_pods(kube, r, children))
