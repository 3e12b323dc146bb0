"""Children that scale and watch the tiers: KEDA for the workers, an HPA for the web tier, PodMonitors.

Pure builders like those in builders.py (each returns None when the spec does not want its
child). The workers scale on the request queue through KEDA's ``redis-streams`` scaler in its
consumer-group-lag mode, the only one that scales from zero: ``XINFO GROUPS`` lag counts the
requests no worker has taken yet, so it is right before any worker ever ran (the web tier
creates the stream and group at start-up, else the scaler errors), and one queued request
wakes a zero-replica Deployment (``activationLagCount: "0"``: active when lag > 0).
Lag mode needs KEDA >= 2.11 and Redis >= 7. Like the web tier's queue cap (lag + pending, see
inferstack.contract.redis_functions), it ignores answered entries still in the stream, which
``streamLength`` (XLEN) would count.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from inferstack.contract import http, queue
from inferstack_operator import credentials as cred
from inferstack_operator.config import LABEL_COMPONENT, LABEL_INSTANCE, OperatorSettings
from inferstack_operator.names import (
    WEB,
    WORKER,
    auth_secret_name,
    labels,
    redis_host,
    selector_labels,
    web_name,
    worker_name,
)
from inferstack_operator.spec import Resolved

Manifest = dict[str, Any]

KEDA_API = "keda.sh/v1alpha1"
MONITORING_API = "monitoring.coreos.com/v1"
# The request stream and consumer group the pods use (the default queue prefix).
REQUEST_STREAM = queue.Keys().stream
CONSUMER_GROUP = queue.GROUP
METRICS_PORT = http.WORKER_METRICS_PORT  # re-exported for older imports
# How often KEDA reads the lag: the wait before a zero-replica Deployment starts scaling up.
POLLING_INTERVAL_S = 5
SCRAPE_INTERVAL = "15s"


def _meta(obj_name: str, r: Resolved, component: str) -> dict[str, Any]:
    return {"name": obj_name, "namespace": r.namespace, "labels": labels(r.name, component)}


def without_keda(r: Resolved) -> Resolved:
    """The spec as served when KEDA is not installed: fixed workers at max(minReplicas, 1)."""
    if r.worker_autoscaling is None:
        return r
    return replace(r, worker_autoscaling=None, worker_replicas=max(r.worker_autoscaling.min_replicas, 1))


def build_trigger_authentication(r: Resolved, settings: OperatorSettings) -> Manifest | None:
    if r.worker_autoscaling is None:
        return None
    secret = auth_secret_name(r.name)  # the read-only user KEDA logs in to Redis as
    return {
        "apiVersion": KEDA_API,
        "kind": "TriggerAuthentication",
        "metadata": _meta(worker_name(r.name), r, WORKER),
        "spec": {"secretTargetRef": [
            {"parameter": "username", "name": secret, "key": cred.KEDA_USERNAME_KEY},
            {"parameter": "password", "name": secret, "key": cred.KEDA_PASSWORD_KEY},
        ]},
    }


def build_scaled_object(r: Resolved, settings: OperatorSettings) -> Manifest | None:
    scaling = r.worker_autoscaling
    if scaling is None:
        return None
    address = f"{redis_host(r.name, r.namespace, r.cluster_domain)}:{http.REDIS_PORT}"
    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": _meta(worker_name(r.name), r, WORKER),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": worker_name(r.name)},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": POLLING_INTERVAL_S,
            "cooldownPeriod": scaling.cooldown_s,  # queue empty this long: down to minReplicaCount
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                # Same patience when going down between 1 and N (the HPA's own default is 300 s).
                "scaleDown": {"stabilizationWindowSeconds": scaling.cooldown_s},
            }}},
            "triggers": [{
                "type": "redis-streams",
                "metadata": {
                    "address": address,
                    "databaseIndex": "0",
                    "stream": REQUEST_STREAM,
                    "consumerGroup": CONSUMER_GROUP,
                    "lagCount": str(scaling.target_queue_length),
                    "activationLagCount": "0",
                },
                "authenticationRef": {"name": worker_name(r.name)},
            }],
        },
    }


def build_web_hpa(r: Resolved, settings: OperatorSettings) -> Manifest | None:
    scaling = r.web_autoscaling
    if scaling is None:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(web_name(r.name), r, WEB),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": web_name(r.name)},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu", "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_percent}}}],
        },
    }


def _pod_monitor(r: Resolved, component: str, endpoints: list[dict[str, Any]]) -> Manifest | None:
    if not r.monitoring:
        return None
    return {
        "apiVersion": MONITORING_API,
        "kind": "PodMonitor",
        "metadata": _meta(f"{r.name}-{component}", r, component),
        "spec": {
            "selector": {"matchLabels": selector_labels(r.name, component)},
            # As series labels (app_kubernetes_io_instance, ...): the dashboard selects a service by them.
            "podTargetLabels": [LABEL_INSTANCE, LABEL_COMPONENT],
            "podMetricsEndpoints": endpoints,
        },
    }


metrics_port_name = http.worker_metrics_port_name  # re-exported for older imports


def _scrape(port_name: str) -> dict[str, Any]:
    return {"port": port_name, "path": http.METRICS_PATH, "interval": SCRAPE_INTERVAL}


def build_web_pod_monitor(r: Resolved, settings: OperatorSettings) -> Manifest | None:
    # The web pods serve /metrics only on their metrics listener (INFERSTACK_METRICS_PORT).
    return _pod_monitor(r, WEB, [_scrape(http.METRICS_PORT_NAME)])


def build_worker_pod_monitor(r: Resolved, settings: OperatorSettings) -> Manifest | None:
    return _pod_monitor(r, WORKER, [_scrape(http.worker_metrics_port_name(i)) for i in range(max(r.gpu, 1))])
