"""Autoscaling as data: the spec, the CRD's rules, the KEDA/HPA/PodMonitor children, and the status."""

from __future__ import annotations

import base64
from typing import Any

import celpy
import kubernetes_validate
import pytest
from tests.operator.kit import admit, resolved, version

from inferstack import protocol
from inferstack_operator import builders, builders_autoscaling, reasons, reconcile, spec, status
from inferstack_operator.config import OperatorSettings
from inferstack_operator.reasons import SpecError

K8S_VERSION = "1.31"
SETTINGS = OperatorSettings()
KEDA = builders_autoscaling.KEDA_API
MONITORING = builders_autoscaling.MONITORING_API
AUTOSCALED = {
    "worker": {"batchSize": 16, "autoscaling": {"minReplicas": 0, "maxReplicas": 4}},
    "web": {"autoscaling": {"maxReplicas": 6}},
}
# Every metadata key KEDA documents for the redis-streams trigger (keda.sh/docs/latest/scalers/redis-streams).
KEDA_REDIS_STREAMS_KEYS = {
    "address", "host", "port", "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
    "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
    "databaseIndex", "addressFromEnv", "hostFromEnv", "portFromEnv",
}


def children(body: dict[str, Any], served: set[str]) -> dict[str, dict[str, Any]]:
    r = resolved(body)
    return {f"{m['kind']}/{m['metadata']['name']}": m for _, m in builders.build_children(r, SETTINGS, served)}


# --- spec and CRD -----------------------------------------------------------------------------

def test_autoscaling_resolves_with_defaults() -> None:
    r = spec.resolve("demo", "ml", AUTOSCALED)
    assert r.worker_autoscaling == spec.WorkerAutoscaling(min_replicas=0, max_replicas=4,
                                                          target_queue_length=32, cooldown_s=300)
    assert r.web_autoscaling == spec.WebAutoscaling(min_replicas=1, max_replicas=6, target_cpu_percent=70)
    assert spec.resolve("demo", "ml", {}).worker_autoscaling is None


@pytest.mark.parametrize("body, message", [
    ({"worker": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
     "spec.worker.autoscaling.minReplicas (5) must not exceed spec.worker.autoscaling.maxReplicas (2)"),
    ({"web": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}}, "must not exceed"),
    ({"worker": {"autoscaling": {"minReplicas": 1}}}, "spec.worker.autoscaling.maxReplicas is required"),
    ({"web": {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}}, "spec.web.autoscaling.minReplicas must be between 1"),
    ({"worker": {"autoscaling": {"maxReplicas": 2, "targetQueueLength": 0}}}, "targetQueueLength must be between"),
    ({"monitoring": {"enabled": "yes"}}, "spec.monitoring.enabled must be true or false"),
])
def test_bad_autoscaling_is_an_invalid_spec(body: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec.resolve("demo", "ml", body)


def _rules() -> dict[str, str]:
    props = version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return {tier: props[tier]["properties"]["autoscaling"]["x-kubernetes-validations"][0]["rule"]
            for tier in ("web", "worker")}


@pytest.mark.parametrize("tier", ["web", "worker"])
def test_crd_rejects_min_above_max_like_the_api_server(tier: str) -> None:
    """The CRD's CEL rule, evaluated with a CEL implementation on the defaulted object."""
    program = celpy.Environment().program(celpy.Environment().compile(_rules()[tier]))

    def allowed(autoscaling: dict[str, Any]) -> bool:
        obj = admit({"apiVersion": "inferstack.dev/v1alpha1", "kind": "InferenceService",
                     "metadata": {"name": "demo"}, "spec": {tier: {"autoscaling": autoscaling}}})
        return bool(program.evaluate({"self": celpy.json_to_cel(obj["spec"][tier]["autoscaling"])}))

    assert allowed({"minReplicas": 1, "maxReplicas": 1})
    assert allowed({"maxReplicas": 3})  # minReplicas defaults to 1
    assert not allowed({"minReplicas": 4, "maxReplicas": 3})


# --- children ---------------------------------------------------------------------------------

def test_scaled_object_follows_keda_redis_streams_docs() -> None:
    objs = children(AUTOSCALED, {KEDA})
    so = objs["ScaledObject/demo-worker"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    s = so["spec"]
    assert s["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "demo-worker"}
    assert (s["minReplicaCount"], s["maxReplicaCount"], s["cooldownPeriod"]) == (0, 4, 300)
    (trigger,) = s["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert set(meta) <= KEDA_REDIS_STREAMS_KEYS
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata is a map of strings"
    # Lag mode (consumerGroup + lagCount): the only one that scales from zero; active when lag > 0.
    assert meta["lagCount"] == "32" and meta["activationLagCount"] == "0"
    assert "pendingEntriesCount" not in meta and "streamLength" not in meta
    # The very stream and group the data plane uses, on the Redis the pods use.
    assert meta["stream"] == protocol.Keys("inferstack").stream
    assert meta["consumerGroup"] == protocol.GROUP
    assert meta["address"] == "demo-redis.ml.svc.cluster.local:6379" and meta["databaseIndex"] == "0"
    worker_url = base64.b64decode(objs["Secret/demo-redis-auth"]["data"]["worker-url"]).decode()
    assert worker_url.endswith(f"@{meta['address']}/{meta['databaseIndex']}"), "KEDA reads the workers' Redis"
    assert trigger["authenticationRef"] == {"name": "demo-worker"}
    auth = objs["TriggerAuthentication/demo-worker"]["spec"]["secretTargetRef"]
    assert auth == [{"parameter": "username", "name": "demo-redis-auth", "key": "keda-username"},
                    {"parameter": "password", "name": "demo-redis-auth", "key": "keda-password"}]
    # KEDA hands `advanced.horizontalPodAutoscalerConfig.behavior` to the HPA it creates: valid HPA behavior.
    kubernetes_validate.validate({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": s["scaleTargetRef"], "maxReplicas": 1,
                 "behavior": s["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]}}, K8S_VERSION, strict=True)


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler() -> None:
    objs = children(AUTOSCALED, {KEDA})
    assert "replicas" not in objs["Deployment/demo-worker"]["spec"]
    assert "replicas" not in objs["Deployment/demo-web"]["spec"]
    hpa = objs["HorizontalPodAutoscaler/demo-web"]
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "demo-web"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)
    assert hpa["spec"]["metrics"][0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    for manifest in objs.values():
        if manifest["apiVersion"] in ("v1", "apps/v1", "autoscaling/v2"):
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    # Fixed replicas otherwise.
    plain = children({"worker": {"replicas": 3}}, {KEDA})
    assert plain["Deployment/demo-worker"]["spec"]["replicas"] == 3
    assert not [k for k in plain if k.split("/")[0] in ("ScaledObject", "HorizontalPodAutoscaler")]


def test_without_keda_the_workers_stay_at_min_replicas_at_least_one() -> None:
    objs = children(AUTOSCALED, set())
    assert objs["Deployment/demo-worker"]["spec"]["replicas"] == 1
    assert "ScaledObject/demo-worker" not in objs and "TriggerAuthentication/demo-worker" not in objs
    three = children({"worker": {"autoscaling": {"minReplicas": 3, "maxReplicas": 5}}}, set())
    assert three["Deployment/demo-worker"]["spec"]["replicas"] == 3
    ok, reason, message = reconcile.autoscaling_condition(spec.resolve("demo", "ml", AUTOSCALED), set())
    assert (ok, reason) == (False, "KEDANotInstalled")
    assert "keda.sh/v1alpha1 is not served" in message and "fixed 1" in message
    ok, reason, _ = reconcile.autoscaling_condition(spec.resolve("demo", "ml", AUTOSCALED), {KEDA})
    assert (ok, reason) == (True, "AutoscalingActive")
    assert reconcile.autoscaling_condition(spec.resolve("demo", "ml", {}), {KEDA}) is None


def test_pod_monitors_only_when_enabled_and_served() -> None:
    body = {"monitoring": {"enabled": True}, "worker": {"gpu": 2}}
    objs = children(body, {MONITORING})
    web, worker = objs["PodMonitor/demo-web"], objs["PodMonitor/demo-worker"]
    assert web["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert [e["port"] for e in worker["spec"]["podMetricsEndpoints"]] == ["metrics", "metrics-gpu1"]
    containers = objs["Deployment/demo-worker"]["spec"]["template"]["spec"]["containers"]
    assert [c["ports"][0] for c in containers] == [
        {"name": "metrics", "containerPort": 9102, "protocol": "TCP"},
        {"name": "metrics-gpu1", "containerPort": 9103, "protocol": "TCP"}]
    assert [next(e["value"] for e in c["env"] if e["name"] == "INFERSTACK_METRICS_PORT") for c in containers] == \
        ["9102", "9103"]
    assert worker["spec"]["selector"]["matchLabels"] == \
        objs["Deployment/demo-worker"]["spec"]["selector"]["matchLabels"]
    assert "PodMonitor/demo-web" not in children(body, set())
    assert "PodMonitor/demo-web" not in children({}, {MONITORING})


def test_unwanted_children_are_the_prunable_ones_the_spec_dropped() -> None:
    r = resolved({})
    assert builders.unwanted_children(r, SETTINGS, {KEDA, MONITORING}) == [
        ("TriggerAuthentication", "demo-worker"), ("ScaledObject", "demo-worker"),
        ("HorizontalPodAutoscaler", "demo-web"), ("PodMonitor", "demo-web"), ("PodMonitor", "demo-worker")]
    # APIs the cluster does not serve have nothing to prune; wanted children are kept.
    assert builders.unwanted_children(r, SETTINGS, set()) == [("HorizontalPodAutoscaler", "demo-web")]
    scaled = resolved({**AUTOSCALED, "monitoring": {"enabled": True}})
    assert builders.unwanted_children(scaled, SETTINGS, {KEDA, MONITORING}) == []


# --- status -----------------------------------------------------------------------------------

def _live(spec_replicas: int | None, ready: int) -> dict[str, Any]:
    return {"spec": {} if spec_replicas is None else {"replicas": spec_replicas}, "status": {"readyReplicas": ready}}


def _conditions(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in st["conditions"]}


def test_workers_scaled_to_zero_are_ready_and_available() -> None:
    r = spec.resolve("demo", "ml", AUTOSCALED)
    live = {"web": _live(2, 2), "worker": _live(0, 0), "redis": _live(1, 1)}
    st = status.compute_status(3, r, live, autoscaling=(True, reasons.AUTOSCALING_ACTIVE, "KEDA ..."))
    cond = _conditions(st)
    assert cond["Ready"]["status"] == "True"
    assert "scaled to zero" in cond["Ready"]["message"]
    assert cond["Available"]["status"] == "True"
    assert "queue until KEDA starts a worker" in cond["Available"]["message"]
    assert cond["Autoscaling"]["status"] == "True"
    assert st["worker"] == {"replicas": 0, "readyReplicas": 0, "ready": "0/0"}
    # Scaled up by KEDA: the autoscaler's count is what the workers must reach.
    live["worker"] = _live(3, 1)
    cond = _conditions(status.compute_status(3, r, live, previous=st))
    assert cond["Ready"]["status"] == "False" and "workers (1/3 ready)" in cond["Ready"]["message"]
    assert cond["Autoscaling"]["status"] == "True", "a child event keeps the reconciler's Autoscaling condition"
    # Fixed replicas at zero are still not a serving service.
    fixed = status.compute_status(1, spec.resolve("demo", "ml", {"worker": {"replicas": 0}}), live)
    assert _conditions(fixed)["Ready"]["reason"] == "ScaledToZero"


def test_keda_missing_does_not_fail_the_service() -> None:
    r = spec.resolve("demo", "ml", AUTOSCALED)
    live = {"web": _live(2, 2), "worker": _live(1, 1), "redis": _live(1, 1)}
    st = status.compute_status(1, r, live, autoscaling=reconcile.autoscaling_condition(r, set()))
    cond = _conditions(st)
    assert cond["Ready"]["status"] == "True"
    assert (cond["Autoscaling"]["status"], cond["Autoscaling"]["reason"]) == ("False", "KEDANotInstalled")


def test_scale_to_zero_with_a_short_request_timeout_is_pointed_out() -> None:
    short = spec.resolve("demo", "ml", AUTOSCALED)
    assert "requestTimeoutSeconds (30) is short" in reconcile.autoscaling_condition(short, {KEDA})[2]
    long = spec.resolve("demo", "ml", {**AUTOSCALED, "web": {"requestTimeoutSeconds": 180}})
    assert "requestTimeoutSeconds" not in reconcile.autoscaling_condition(long, {KEDA})[2]
