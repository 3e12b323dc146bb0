"""Pure status computation: the resolved spec and the children's state in, the status out."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from inferstack_operator import reasons
from inferstack_operator.names import REDIS, WEB, WORKER
from inferstack_operator.spec import Resolved

READY = "Ready"
AVAILABLE = "Available"
# Container waiting reasons that need the user (the kubelet will not get past them alone).
STUCK_WAITING = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CrashLoopBackOff",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})
MAX_POD_MESSAGES = 3


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


AUTOSCALING = "Autoscaling"


def ready_replicas(child: Mapping[str, Any] | None) -> int:
    if not child:
        return 0
    return int((child.get("status") or {}).get("readyReplicas") or 0)


def desired_replicas(resolved: Resolved, children: Mapping[str, Mapping[str, Any] | None]) -> dict[str, int]:
    """Pods each tier should have: the spec's count, or for an autoscaled tier the count its
    autoscaler last set on the live Deployment (the API server defaults a missing one to 1)."""
    def live(component: str, fixed: int, scaled: bool) -> int:
        child = children.get(component)
        if not scaled or child is None:
            return fixed
        return int((child.get("spec") or {}).get("replicas", 1))

    web_min = resolved.web_autoscaling.min_replicas if resolved.web_autoscaling else resolved.web_replicas
    worker_min = resolved.worker_autoscaling.min_replicas if resolved.worker_autoscaling else resolved.worker_replicas
    return {
        WEB: live(WEB, web_min, resolved.web_autoscaling is not None),
        WORKER: live(WORKER, worker_min, resolved.worker_autoscaling is not None),
        REDIS: 1,
    }


def condition(
    previous: list[Mapping[str, Any]] | None,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str | None = None,
) -> dict[str, Any]:
    """A condition whose lastTransitionTime moves only when its status flips."""
    value = "True" if status else "False"
    old = next((c for c in previous or [] if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    result: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now or now_iso(),
    }
    if generation is not None:
        result["observedGeneration"] = generation
    return result


def _replicas(ready: int, desired: int) -> dict[str, Any]:
    return {"replicas": desired, "readyReplicas": ready, "ready": f"{ready}/{desired}"}


def _pod_problem(pod: Mapping[str, Any]) -> list[str]:
    st = pod.get("status") or {}
    found: list[str] = []
    for cond in st.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            found.append(f"is Pending ({cond.get('reason') or 'Unschedulable'}): "
                         f"{cond.get('message') or 'not scheduled yet'}")
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in STUCK_WAITING:
            continue
        text = f"container {cs.get('name')}: {waiting['reason']}"
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if waiting["reason"] == "CrashLoopBackOff" and "exitCode" in last:
            text += f" (last exit code {last['exitCode']})"
        elif waiting.get("message"):
            text += f": {waiting['message']}"
        found.append(text)
    return found


def pod_problems(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why pods are not running, from their conditions and container states.

    Pods of one workload usually fail alike: each distinct problem is named once, with the
    first pod that has it.
    """
    seen: dict[str, str] = {}
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        for text in _pod_problem(pod):
            seen.setdefault(text, f"pod {name} {text}")
    return list(seen.values())[:MAX_POD_MESSAGES]


def compute_status(
    generation: int | None,
    resolved: Resolved | None,
    children: Mapping[str, Mapping[str, Any] | None] | None = None,
    previous: Mapping[str, Any] | None = None,
    *,
    pods: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    problem: tuple[str, str] | None = None,
    notes: Sequence[str] = (),
    autoscaling: tuple[bool, str, str] | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """The InferenceService's status; ``observedGeneration`` is ``generation`` on every path.

    ``resolved`` None: the spec could not be resolved (``problem`` says why); only the Ready
    condition changes. Otherwise from the live children ("web", "worker", "redis" -> body).
    Ready: every pod the spec asks for is ready (what ``kubectl wait --for=condition=Ready``
    needs). Available: at least one web, worker and Redis pod is ready, so /predict answers.
    ``problem`` (reason, message) forces Ready=False, e.g. a child the operator cannot update.
    ``notes`` (settings the operator overrides) are appended to the Ready message.
    ``autoscaling`` (status, reason, message) is the Autoscaling condition; None keeps the
    previous one while a tier is autoscaled (a child event does not ask whether KEDA is served).
    An autoscaled tier wants as many pods as its autoscaler set; workers scaled to zero by KEDA
    are Ready (a queued request starts one) and Available when web and Redis are.
    """
    prev_conditions = list((previous or {}).get("conditions") or [])
    if resolved is None:
        return _unresolved_status(generation, prev_conditions, problem, now)
    counts = _counts(resolved, children or {})
    ready, reason, message = _readiness(resolved, counts, problem, pods or {})
    if notes:
        message += " (note: " + "; ".join(notes) + ")"
    conditions = [
        condition(prev_conditions, READY, ready, reason, message, generation, now),
        _available_condition(prev_conditions, counts, generation, now),
    ]
    if autoscaling is not None:
        conditions.append(condition(prev_conditions, AUTOSCALING, *autoscaling, generation, now))
    elif resolved.worker_autoscaling or resolved.web_autoscaling:
        conditions += [dict(c) for c in prev_conditions if c.get("type") == AUTOSCALING]
    return {
        "observedGeneration": generation,
        "url": resolved.url,
        "model": resolved.model_display,
        "web": _replicas(counts.web_ready, counts.desired[WEB]),
        "worker": _replicas(counts.worker_ready, counts.desired[WORKER]),
        "redis": {"ready": counts.redis_ready},
        "conditions": conditions,
    }


@dataclass(frozen=True)
class _Counts:
    """Ready pods per tier against what the spec (or its autoscaler) wants."""

    web_ready: int
    worker_ready: int
    redis_ready: bool
    desired: Mapping[str, int]
    idle: bool  # autoscaled workers at zero: a queued request starts one

    @property
    def web_ok(self) -> bool:
        return self.web_ready >= self.desired[WEB]

    @property
    def worker_ok(self) -> bool:
        return self.worker_ready >= self.desired[WORKER]


def _counts(resolved: Resolved, children: Mapping[str, Mapping[str, Any] | None]) -> _Counts:
    desired = desired_replicas(resolved, children)
    return _Counts(
        web_ready=ready_replicas(children.get(WEB)),
        worker_ready=ready_replicas(children.get(WORKER)),
        redis_ready=ready_replicas(children.get(REDIS)) >= 1,
        desired=desired,
        idle=resolved.worker_autoscaling is not None and desired[WORKER] == 0,
    )


def _unresolved_status(generation: int | None, prev_conditions: list[Mapping[str, Any]],
                       problem: tuple[str, str] | None, now: str | None) -> dict[str, Any]:
    """A spec that cannot be served: only the Ready condition changes."""
    reason, message = problem or (reasons.INVALID_SPEC, "the spec cannot be served")
    return {
        "observedGeneration": generation,
        "conditions": [
            condition(prev_conditions, READY, False, reason, message, generation, now),
            *[c for c in prev_conditions if c.get("type") != READY],
        ],
    }


def _readiness(resolved: Resolved, counts: _Counts, problem: tuple[str, str] | None,
               pods: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[bool, str, str]:
    """(ready, reason, message) of the Ready condition."""
    if problem:
        return False, *problem
    if (resolved.web_autoscaling is None and resolved.web_replicas == 0) or \
            (resolved.worker_autoscaling is None and resolved.worker_replicas == 0):
        return (False, reasons.SCALED_TO_ZERO,
                "spec.web.replicas and spec.worker.replicas must both be above 0 to serve requests")
    if counts.web_ok and counts.worker_ok and counts.redis_ready:
        workers = "workers scaled to zero (a queued request starts one)" if counts.idle \
            else f"{counts.worker_ready} worker pods ready"
        return (True, reasons.ALL_REPLICAS_READY,
                f"{counts.web_ready} web pods ready, {workers}; serving {resolved.model_display}")
    return (False, *_waiting(counts, pods))


def _waiting(counts: _Counts, pods: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[str, str]:
    """(reason, message) while pods are missing: what we wait for, and why pods fail if they do."""
    waiting = []
    if not counts.redis_ready:
        waiting.append("Redis")
    if not counts.worker_ok:
        waiting.append(f"workers ({counts.worker_ready}/{counts.desired[WORKER]} ready)")
    if not counts.web_ok:
        waiting.append(f"web ({counts.web_ready}/{counts.desired[WEB]} ready)")
    message = "waiting for " + ", ".join(waiting)
    stuck = [text for component in (WORKER, WEB, REDIS) for text in pod_problems(pods.get(component, ()))]
    if stuck:
        return reasons.PODS_FAILING, message + ": " + "; ".join(stuck[:MAX_POD_MESSAGES])
    return reasons.PROGRESSING, message


def _available_condition(prev_conditions: list[Mapping[str, Any]], counts: _Counts, generation: int | None,
                         now: str | None) -> dict[str, Any]:
    """Available: one complete web -> Redis -> worker path (or idle workers KEDA will start)."""
    available = counts.web_ready >= 1 and counts.redis_ready and (counts.worker_ready >= 1 or counts.idle)
    if not available:
        return condition(prev_conditions, AVAILABLE, False, reasons.NO_SERVING_PATH,
                         "no complete web -> Redis -> worker path is ready yet", generation, now)
    message = ("web and Redis are ready; requests queue until KEDA starts a worker" if counts.worker_ready == 0
               else "at least one web, worker and Redis pod is ready")
    return condition(prev_conditions, AVAILABLE, True, reasons.MINIMUM_REPLICAS_READY, message, generation, now)


def status_changed(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change anything (ignores keys ``new`` does not set)."""
    current = current or {}
    return any(current.get(key) != value for key, value in new.items())
