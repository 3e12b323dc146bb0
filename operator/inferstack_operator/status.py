"""Pure status computation: the children's own status in, the InferenceService status out."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from inferstack_operator.builders import Resolved, service_url

READY = "Ready"
AVAILABLE = "Available"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _ready(child: Mapping[str, Any] | None) -> int:
    if not child:
        return 0
    return int((child.get("status") or {}).get("readyReplicas") or 0)


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


def compute_status(
    name: str,
    namespace: str,
    generation: int | None,
    resolved: Resolved,
    children: Mapping[str, Mapping[str, Any] | None],
    previous: Mapping[str, Any] | None,
    problem: tuple[str, str] | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """Status from the live children ("web", "worker", "redis" -> body or None).

    Ready: every pod the spec asks for is ready (what ``kubectl wait --for=condition=Ready``
    needs). Available: at least one web, worker and Redis pod is ready, so /predict answers.
    ``problem`` (reason, message) forces Ready=False, e.g. a child the operator cannot update.
    """
    prev_conditions = list((previous or {}).get("conditions") or [])
    web_ready, worker_ready = _ready(children.get("web")), _ready(children.get("worker"))
    redis_ready = _ready(children.get("redis")) >= 1
    web_ok = web_ready >= resolved.web_replicas
    worker_ok = worker_ready >= resolved.worker_replicas

    if problem:
        reason, message = problem
        ready = False
    elif resolved.web_replicas == 0 or resolved.worker_replicas == 0:
        ready, reason = False, "ScaledToZero"
        message = "spec.web.replicas and spec.worker.replicas must both be above 0 to serve requests"
    elif web_ok and worker_ok and redis_ready:
        ready, reason = True, "AllReplicasReady"
        message = (f"{web_ready} web and {worker_ready} worker pods ready; "
                   f"serving {resolved.model_display}")
    else:
        ready, reason = False, "Progressing"
        waiting = []
        if not redis_ready:
            waiting.append("Redis")
        if not worker_ok:
            waiting.append(f"workers ({worker_ready}/{resolved.worker_replicas} ready)")
        if not web_ok:
            waiting.append(f"web ({web_ready}/{resolved.web_replicas} ready)")
        message = "waiting for " + ", ".join(waiting)

    available = web_ready >= 1 and worker_ready >= 1 and redis_ready
    return {
        "url": service_url(name, namespace, resolved.service_port),
        "model": resolved.model_display,
        "web": _replicas(web_ready, resolved.web_replicas),
        "worker": _replicas(worker_ready, resolved.worker_replicas),
        "redis": {"ready": redis_ready},
        "conditions": [
            condition(prev_conditions, READY, ready, reason, message, generation, now),
            condition(prev_conditions, AVAILABLE, available,
                      "MinimumReplicasReady" if available else "NoServingPath",
                      "at least one web, worker and Redis pod is ready" if available
                      else "no complete web -> Redis -> worker path is ready yet",
                      generation, now),
        ],
    }


def invalid_status(previous: Mapping[str, Any] | None, message: str, generation: int | None,
                   reason: str = "InvalidSpec", now: str | None = None) -> dict[str, Any]:
    """Status for a spec the operator cannot act on; children are left as they are."""
    prev_conditions = list((previous or {}).get("conditions") or [])
    return {
        "conditions": [
            condition(prev_conditions, READY, False, reason, message, generation, now),
            *[c for c in prev_conditions if c.get("type") != READY],
        ],
    }


def status_changed(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change anything (ignores keys ``new`` does not set)."""
    current = current or {}
    return any(current.get(key) != value for key, value in new.items())
