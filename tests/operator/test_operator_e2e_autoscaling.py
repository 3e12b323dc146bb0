"""Autoscaling end to end: the real operator against the emulator, with and without KEDA's API.

The emulator runs no KEDA and no HPA controller: the tests do what they would (patch the
worker Deployment's replicas, write pod readiness into status).
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest
from tests.operator.conftest import ISVC, NAMESPACE, VERBS, Cluster, eventually, running_operator
from tests.operator.test_operator_e2e import (
    DEPLOYMENTS,
    apply,
    assert_rbac_covers,
    events,
    example,
    live,
    patch,
    ready_condition,
    status,
    worker_env,
)

pytestmark = pytest.mark.asyncio

SCALEDOBJECTS = "keda.sh/v1alpha1/scaledobjects"
TRIGGERAUTHS = "keda.sh/v1alpha1/triggerauthentications"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
KEDA_RESOURCES: dict[str, dict[str, Any]] = {
    SCALEDOBJECTS: dict(kind="ScaledObject", singular="scaledobject", namespaced=True, subresources={"status"}),
    TRIGGERAUTHS: dict(kind="TriggerAuthentication", singular="triggerauthentication", namespaced=True),
}
APPS = f"/apis/apps/v1/namespaces/{NAMESPACE}"


def autoscaled() -> dict[str, Any]:
    body = example("cpu-small.yaml")
    body["spec"]["worker"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 5, "targetQueueLength": 16}
    body["spec"]["web"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 3}
    return body


def condition(cluster: Cluster, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in status(cluster, name).get("conditions") or [] if c["type"] == type_), {})


def install_keda(cluster: Cluster) -> None:
    for key, info in KEDA_RESOURCES.items():
        cluster.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)


def owned_by(child: dict[str, Any], parent: dict[str, Any]) -> bool:
    return [(r["kind"], r["uid"], r.get("controller")) for r in child["metadata"]["ownerReferences"]] == \
        [("InferenceService", parent["metadata"]["uid"], True)]


async def test_keda_owns_worker_replicas_and_autoscalers_are_pruned(cluster: Cluster) -> None:
    install_keda(cluster)
    async with running_operator(cluster) as operator:
        parent = await apply(operator, autoscaled())
        so = await eventually(lambda: live(operator, SCALEDOBJECTS, "mobilenet-worker"), what="the ScaledObject")
        assert owned_by(so, parent)
        assert so["spec"]["triggers"][0]["metadata"]["lagCount"] == "16"
        assert owned_by(await eventually(lambda: live(operator, TRIGGERAUTHS, "mobilenet-worker")), parent)
        assert owned_by(await eventually(lambda: live(operator, HPAS, "mobilenet-web")), parent)
        worker = await eventually(lambda: live(operator, DEPLOYMENTS, "mobilenet-worker"), what="the worker")
        assert "replicas" not in worker["spec"]
        cond = await eventually(lambda: condition(operator, "mobilenet", "Autoscaling").get("status") == "True"
                                and condition(operator, "mobilenet", "Autoscaling"), what="Autoscaling=True")
        assert cond["reason"] == "AutoscalingActive" and "between 0 and 5" in cond["message"]

        # KEDA scales the workers up; resyncs (every second here) and a spec change leave the count alone.
        await patch(operator, f"{APPS}/deployments/mobilenet-worker", {"spec": {"replicas": 4}})
        await patch(operator, f"{APPS}/deployments/mobilenet-web", {"spec": {"replicas": 2}})
        await patch(operator, f"{ISVC}/mobilenet", {"spec": {"worker": {"batchSize": 12}}})
        await eventually(lambda: worker_env(operator, "mobilenet")["INFERSTACK_BATCH_SIZE"] == "12",
                         what="the batchSize change rolled out")
        await eventually(lambda: status(operator, "mobilenet").get("observedGeneration") == 2, what="generation 2")
        resyncs = len([r for r in operator if r.method.name == "GET" and r.name == "mobilenet-worker"])
        await eventually(lambda: len([r for r in operator if r.method.name == "GET"
                                      and r.name == "mobilenet-worker"]) >= resyncs + 3, what="three more resyncs")
        assert live(operator, DEPLOYMENTS, "mobilenet-worker")["spec"]["replicas"] == 4
        assert live(operator, DEPLOYMENTS, "mobilenet-web")["spec"]["replicas"] == 2
        assert status(operator, "mobilenet")["worker"]["ready"] == "0/4"

        # Idle: KEDA took the workers to zero. Web and Redis ready: Ready=True, scaled to zero.
        await patch(operator, f"{APPS}/deployments/mobilenet-worker", {"spec": {"replicas": 0}})
        await patch(operator, f"{APPS}/statefulsets/mobilenet-redis/status", {"status": {"readyReplicas": 1}})
        await patch(operator, f"{APPS}/deployments/mobilenet-web/status", {"status": {"readyReplicas": 2}})
        cond = await eventually(lambda: ready_condition(operator, "mobilenet").get("status") == "True"
                                and ready_condition(operator, "mobilenet"), what="Ready=True at zero workers")
        assert "scaled to zero" in cond["message"]
        assert condition(operator, "mobilenet", "Available")["status"] == "True"

        # Autoscaling off again: the autoscalers go, the spec's fixed counts come back.
        await patch(operator, f"{ISVC}/mobilenet",
                    {"spec": {"worker": {"autoscaling": None, "replicas": 2}, "web": {"autoscaling": None}}})
        await eventually(lambda: live(operator, SCALEDOBJECTS, "mobilenet-worker") is None, what="ScaledObject deleted")
        await eventually(lambda: live(operator, TRIGGERAUTHS, "mobilenet-worker") is None, what="auth deleted")
        await eventually(lambda: live(operator, HPAS, "mobilenet-web") is None, what="HPA deleted")
        await eventually(lambda: live(operator, DEPLOYMENTS, "mobilenet-worker")["spec"].get("replicas") == 2,
                         what="fixed worker replicas")
        await eventually(lambda: not condition(operator, "mobilenet", "Autoscaling"), what="no Autoscaling condition")
        await eventually(lambda: any(e["reason"] == "Deleted" for e in events(operator, "mobilenet")),
                         what="a Deleted event")
        assert_rbac_covers(operator)


async def test_without_keda_workers_stay_fixed_and_the_service_still_serves(operator: Cluster) -> None:
    await apply(operator, autoscaled())
    worker = await eventually(lambda: live(operator, DEPLOYMENTS, "mobilenet-worker"), what="the worker")
    assert worker["spec"]["replicas"] == 1  # max(minReplicas 0, 1)
    cond = await eventually(lambda: condition(operator, "mobilenet", "Autoscaling").get("status") == "False"
                            and condition(operator, "mobilenet", "Autoscaling"), what="Autoscaling=False")
    assert cond["reason"] == "KEDANotInstalled"
    assert live(operator, SCALEDOBJECTS, "mobilenet-worker") is None
    assert live(operator, HPAS, "mobilenet-web") is not None  # the HPA needs nothing extra

    for path, ready in (("statefulsets/mobilenet-redis", 1), ("deployments/mobilenet-worker", 1),
                        ("deployments/mobilenet-web", 1)):
        await patch(operator, f"{APPS}/{path}/status", {"status": {"readyReplicas": ready}})
    await eventually(lambda: ready_condition(operator, "mobilenet").get("status") == "True", what="Ready=True")
    assert condition(operator, "mobilenet", "Autoscaling")["reason"] == "KEDANotInstalled"
    assert_rbac_covers(operator)
