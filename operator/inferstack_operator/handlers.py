"""kopf handlers of the inferstack operator (the only module with kopf decorators).

Run locally with ``kopf run -m inferstack_operator.handlers --standalone -A`` against the
current kubeconfig, or in-cluster with ``inferstack-operator``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from inferstack_operator import builders, reasons, reconcile, status
from inferstack_operator.config import (
    EPHEMERAL_LABEL,
    GROUP,
    KIND,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PLURAL,
    VERSION,
    OperatorSettings,
)
from inferstack_operator.kube import ApiError, KubeClient
from inferstack_operator.reasons import ReconcileError

logger = logging.getLogger("inferstack_operator")

# Read at import: the timer interval is fixed when the decorator registers it.
SETTINGS = OperatorSettings.from_env()


def _kube(memo: Any) -> KubeClient:
    kube: KubeClient = memo.kube
    return kube


def _lock(memo: Any, uid: str | None) -> asyncio.Lock:
    # One lock per InferenceService shared by its handlers, timer and child events, so that
    # two of them never create the same child or write status out of order.
    locks: dict[str | None, asyncio.Lock] = memo.locks
    return locks.setdefault(uid, asyncio.Lock())


def _ready_condition(current: Mapping[str, Any] | None) -> Mapping[str, Any]:
    for cond in (current or {}).get("conditions") or []:
        if cond.get("type") == status.READY:
            return dict(cond)
    return {}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our own annotation prefix and finalizer name instead of kopf's defaults; progress in
    # annotations keeps status for users.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    # Re-list now and then even if a watch silently stalls.
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # A resync running when its resource is deleted must not hold the finalizer for kopf's default
    # minute: kopf re-checks a timer it could not stop at once after this many seconds.
    settings.background.cancellation_polling = 2
    # Serving named namespaces needs nothing cluster-scoped: no CRD or namespace scanning (kopf
    # then serves exactly those namespaces and the resources discovered at start).
    settings.scanning.disabled = bool(SETTINGS.watch_namespaces)
    if "kube" not in memo:
        memo.kube = KubeClient()
    memo.locks = {}
    logger.info("inferstack operator settings: %s", SETTINGS)


@kopf.on.login()
def login(memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> kopf.ConnectionInfo | None:
    # In-cluster first, then kubeconfig via the official client (auth plugins, exec), then
    # kopf's minimal kubeconfig reader. Our own client reuses whatever kopf logs in with.
    info = kopf.login_with_service_account(logger=logger, **kwargs)
    if info is None:
        try:
            info = kopf.login_via_client(logger=logger, **kwargs)
        except ImportError:
            info = None
    if info is None:
        info = kopf.login_with_kubeconfig(logger=logger, **kwargs)
    if info is not None:
        if "kube" not in memo:
            memo.kube = KubeClient()
        _kube(memo).login(info)
    return info


@kopf.on.cleanup()
async def close_client(memo: kopf.Memo, **_: Any) -> None:
    if "kube" in memo:
        await _kube(memo).close()


@kopf.on.probe(id="api")
def api_logged_in(memo: kopf.Memo, **_: Any) -> bool:
    return "kube" in memo and _kube(memo).credentials is not None


async def _write_status(kube: KubeClient, body: kopf.Body, current: Mapping[str, Any] | None,
                        new: Mapping[str, Any]) -> None:
    if status.status_changed(current, new):
        name, namespace = body.metadata.name, body.metadata.namespace
        assert name is not None and namespace is not None
        await kube.patch_status(KIND, namespace, name, new)


async def _reconcile(body: kopf.Body, memo: kopf.Memo, log: kopf.Logger, *, from_timer: bool) -> None:
    kube = _kube(memo)
    current: Mapping[str, Any] = body.get("status") or {}
    generation = body.metadata.get("generation")
    previous_ready = _ready_condition(current)

    def warn(reason: str, message: str) -> None:
        # The timer re-checks every interval: post an Event only when the problem is new.
        if previous_ready.get("reason") != reason or previous_ready.get("message", "").split(" (note: ")[0] != message:
            kopf.warn(body, reason=reason, message=message)

    async with _lock(memo, body.metadata.uid):
        try:
            outcome = await reconcile.reconcile(body, kube, SETTINGS)
        except ReconcileError as e:
            if e.permanent:
                warn(e.reason, e.message)
            await _write_status(kube, body, current,
                                status.compute_status(generation, None, previous=current, problem=(e.reason, e.message)))
            if from_timer:
                return
            if e.permanent:
                raise kopf.PermanentError(e.message) from e
            raise kopf.TemporaryError(e.message, delay=e.delay) from e

        for what in outcome.created:
            kopf.info(body, reason=reasons.REPAIRED if from_timer else reasons.CREATED, message=f"Created {what}")
        for what in outcome.updated:
            kopf.info(body, reason=reasons.REPAIRED if from_timer else reasons.UPDATED,
                      message=f"Re-applied {what} (it differed from the spec)" if from_timer else f"Updated {what}")
        for what in outcome.deleted:
            kopf.info(body, reason=reasons.DELETED, message=f"Deleted {what} (the spec no longer asks for it)")
        if outcome.problem:
            warn(*outcome.problem)
        if outcome.notes and not from_timer:
            kopf.warn(body, reason=reasons.IGNORED_SETTINGS, message="; ".join(outcome.notes))
        new = status.compute_status(generation, outcome.resolved, outcome.observed.children, current,
                                    pods=outcome.observed.pods, problem=outcome.problem, notes=outcome.notes,
                                    autoscaling=outcome.autoscaling)
        await _write_status(kube, body, current, new)
        if outcome.created or outcome.updated or outcome.deleted:
            log.info("created %s; updated %s; deleted %s", outcome.created or "nothing",
                     outcome.updated or "nothing", outcome.deleted or "nothing")


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile_stack(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Create missing children and re-apply drifted ones; status from the children."""
    await _reconcile(body, memo, logger, from_timer=False)


# kopf puts a finalizer on every object a timer runs for. Objects labelled ephemeral (the chart's
# sample) get no timer, hence no finalizer: deleting them never waits for the operator, even
# when `helm uninstall` removes the operator first.
@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds,
            labels={EPHEMERAL_LABEL: kopf.ABSENT})
async def resync(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, stopped: Any = None, **_: Any) -> None:
    """Repair deleted or hand-edited children and refresh status, every resync interval."""
    if not (body.get("status") or {}).get("conditions"):
        return  # never reconciled yet: the create/resume handler is on it (or retrying)
    try:
        await _reconcile(body, memo, logger, from_timer=True)
    except Exception:
        if stopped:  # the operator is stopping and may have closed its API client under this pass
            logger.debug("resync cut short by the operator stopping")
            return
        raise


def _owner(body: kopf.Body) -> Mapping[str, Any] | None:
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            return dict(ref)
    return None


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MANAGED_BY: MANAGED_BY})
@kopf.on.event("apps", "v1", "statefulsets", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def child_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """A child's status moved (pods became ready, or it was deleted): refresh the owner's status."""
    owner = _owner(body)
    namespace = body.metadata.namespace
    if owner is None or namespace is None:
        return
    kube = _kube(memo)
    async with _lock(memo, owner.get("uid")):
        parent = await kube.get(KIND, namespace, owner["name"])
        meta = (parent or {}).get("metadata") or {}
        if parent is None or meta.get("uid") != owner.get("uid") or meta.get("deletionTimestamp"):
            return
        try:
            resolved = reconcile.resolve_body(parent, SETTINGS)
            observed = await reconcile.observe(kube, resolved)
        except ReconcileError:
            return  # the reconcile handler has already said why in the status
        except ApiError:
            return  # the timer refreshes status later
        current = parent.get("status") or {}
        ready = _ready_condition(current)
        problem = (ready["reason"], ready.get("message", "")) if ready.get("reason") in reasons.PROBLEM_REASONS \
            else None
        # The generation last reconciled: a child event must not claim a newer spec was acted on.
        new = status.compute_status(current.get("observedGeneration"), resolved, observed.children, current,
                                    pods=observed.pods, problem=problem,
                                    notes=() if problem else builders.ignored_settings(resolved, SETTINGS))
        if status.status_changed(current, new):
            await kube.patch_status(KIND, namespace, owner["name"], new)
