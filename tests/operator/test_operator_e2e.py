"""The real operator (kopf reactor + our handlers) against kmock's Kubernetes emulator."""

from __future__ import annotations

import asyncio
from typing import Any

import kmock
import pytest
import yaml
from tests.operator.conftest import EXAMPLES, ISVC, NAMESPACE, Cluster, eventually

from inferstack_operator import rbac

pytestmark = pytest.mark.asyncio

DEPLOYMENTS = "apps/v1/deployments"
STATEFULSETS = "apps/v1/statefulsets"
SERVICES = "v1/services"
CONFIGMAPS = "v1/configmaps"
ISVCS = "inferstack.dev/v1alpha1/inferenceservices"
CONTRACT_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                   "app.kubernetes.io/managed-by")


def live(cluster: Cluster, resource: str, name: str) -> dict[str, Any] | None:
    key = (kmock.resource(resource), NAMESPACE, name)  # kmock's `in` does not parse strings
    if key in cluster.objects and not cluster.objects[key].deleted:
        return cluster.objects[key].raw
    return None


def children(cluster: Cluster, name: str) -> dict[str, dict[str, Any] | None]:
    return {
        "web": live(cluster, DEPLOYMENTS, f"{name}-web"),
        "worker": live(cluster, DEPLOYMENTS, f"{name}-worker"),
        "redis": live(cluster, STATEFULSETS, f"{name}-redis"),
        "redis-svc": live(cluster, SERVICES, f"{name}-redis"),
        "svc": live(cluster, SERVICES, name),
    }


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (live(cluster, ISVCS, name) or {}).get("status") or {}


def ready_condition(cluster: Cluster, name: str) -> dict[str, Any]:
    for cond in status(cluster, name).get("conditions") or []:
        if cond["type"] == "Ready":
            return cond
    return {}


def worker_env(cluster: Cluster, name: str) -> dict[str, Any]:
    deploy = live(cluster, DEPLOYMENTS, f"{name}-worker") or {}
    containers = deploy.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])
    return {e["name"]: e.get("value") for e in containers[0].get("env", [])}


def events(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [obj.raw for (res, ns, _), obj in cluster.objects.items()
            if res == "v1/events" and not obj.deleted and obj.raw.get("involvedObject", {}).get("name") == name]


def example(filename: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / filename).read_text())


async def apply(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
    rsp = await cluster.post(ISVC, json=body)
    assert rsp.status == 200, await rsp.text()
    return await rsp.json()


async def patch(cluster: Cluster, path: str, body: dict[str, Any]) -> None:
    rsp = await cluster.patch(path, json=body, headers={"Content-Type": "application/merge-patch+json"})
    assert rsp.status == 200, await rsp.text()


async def delete(cluster: Cluster, path: str) -> None:
    rsp = await cluster.delete(path)
    assert rsp.status == 200, await rsp.text()


def assert_rbac_covers(cluster: Cluster) -> None:
    """Every API call the operator (not the test) made is allowed by rbac.RULES."""
    verbs = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}
    checked = 0
    for request in list(cluster):
        agent = request.headers.get("User-Agent", "")
        if agent.startswith("kmock") or request.resource is None or not request.resource.plural:
            continue  # the test's own calls; discovery (/api, /apis) is open to every account
        verb = verbs.get(request.action.name) or ("patch" if request.method.name == "PATCH" else "update")
        plural = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        assert rbac.allows(request.resource.group, plural, verb), \
            f"{verb} {request.resource.group}/{plural} is not in rbac.RULES ({request.url})"
        checked += 1
    assert checked > 0


async def test_creates_all_children_with_owner_and_labels(operator: Cluster) -> None:
    parent = await apply(operator, example("resnet50-gpu.yaml"))
    uid = parent["metadata"]["uid"]
    found = await eventually(lambda: all(children(operator, "resnet50").values()) and children(operator, "resnet50"),
                             what="the five children")
    assert live(operator, CONFIGMAPS, "resnet50-config") is not None
    components = {"web": "web", "worker": "worker", "redis": "redis", "redis-svc": "redis", "svc": "web"}
    for key, child in found.items():
        refs = child["metadata"]["ownerReferences"]
        assert refs == [{"apiVersion": "inferstack.dev/v1alpha1", "kind": "InferenceService", "name": "resnet50",
                         "uid": uid, "controller": True, "blockOwnerDeletion": True}], key
        labels = child["metadata"]["labels"]
        assert all(label in labels for label in CONTRACT_LABELS), key
        assert labels["app.kubernetes.io/instance"] == "resnet50"
        assert labels["app.kubernetes.io/component"] == components[key]
        assert labels["app.kubernetes.io/managed-by"] == "inferstack-operator"
    assert found["svc"]["spec"]["selector"]["app.kubernetes.io/component"] == "web"
    assert found["redis-svc"]["spec"]["clusterIP"] == "None"
    assert found["worker"]["spec"]["replicas"] == 2
    limits = found["worker"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1

    # Nothing is ready in an emulator without controllers: Ready=False, saying what it waits for.
    cond = await eventually(lambda: ready_condition(operator, "resnet50").get("reason") == "Progressing"
                            and ready_condition(operator, "resnet50"), what="Ready=False Progressing")
    assert cond["status"] == "False" and "waiting for" in cond["message"]
    st = status(operator, "resnet50")
    assert st["url"] == "http://resnet50.ml.svc.cluster.local:80/predict"
    assert st["observedGeneration"] == 1
    assert st["web"] == {"replicas": 2, "readyReplicas": 0, "ready": "0/2"}
    assert st["worker"]["ready"] == "0/2"
    assert st["model"] == "ResNet50"
    await eventually(lambda: any(e["reason"] == "Created" for e in events(operator, "resnet50")),
                     what="a Created event")
    assert_rbac_covers(operator)


async def test_spec_change_patches_only_the_worker(operator: Cluster) -> None:
    await apply(operator, example("resnet50-gpu.yaml"))
    await eventually(lambda: all(children(operator, "resnet50").values()), what="children")
    await eventually(lambda: status(operator, "resnet50").get("observedGeneration") == 1, what="generation 1")
    web_versions = len(operator.objects[DEPLOYMENTS, NAMESPACE, "resnet50-web"].history)

    await patch(operator, f"{ISVC}/resnet50", {"spec": {"worker": {"replicas": 3, "batchSize": 128}}})
    assert live(operator, ISVCS, "resnet50")["metadata"]["generation"] == 2

    await eventually(lambda: live(operator, DEPLOYMENTS, "resnet50-worker")["spec"]["replicas"] == 3,
                     what="worker replicas 3")
    assert worker_env(operator, "resnet50")["INFERSTACK_BATCH_SIZE"] == "128"
    await eventually(lambda: status(operator, "resnet50").get("observedGeneration") == 2, what="generation 2")
    assert status(operator, "resnet50")["worker"]["replicas"] == 3
    # The change is worker-only: the web Deployment (and its pods) are left alone.
    assert len(operator.objects[DEPLOYMENTS, NAMESPACE, "resnet50-web"].history) == web_versions
    applies = [r for r in operator if r.method.name == "PATCH" and r.name == "resnet50-worker"]
    assert applies and all(r.headers["Content-Type"].startswith("application/apply-patch+yaml") for r in applies)
    assert all(r.params.get("fieldManager") == "inferstack-operator" for r in applies)
    assert_rbac_covers(operator)


async def test_deleted_or_edited_child_is_repaired_by_the_timer(operator: Cluster) -> None:
    await apply(operator, example("cpu-small.yaml"))
    await eventually(lambda: all(children(operator, "mobilenet").values()), what="children")

    await delete(operator, f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/mobilenet-worker")
    assert live(operator, DEPLOYMENTS, "mobilenet-worker") is None
    await eventually(lambda: live(operator, DEPLOYMENTS, "mobilenet-worker"), what="worker recreated")

    await delete(operator, f"/api/v1/namespaces/{NAMESPACE}/services/mobilenet")
    await eventually(lambda: live(operator, SERVICES, "mobilenet"), what="front Service recreated")

    # A hand edit of a field we own is reverted; fields we do not set are left alone.
    await patch(operator, f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/mobilenet-web",
                {"spec": {"replicas": 7, "paused": False}})
    await eventually(lambda: live(operator, DEPLOYMENTS, "mobilenet-web")["spec"]["replicas"] == 1,
                     what="web replicas reverted")
    await eventually(lambda: any(e["reason"] == "Repaired" for e in events(operator, "mobilenet")),
                     what="a Repaired event")
    assert_rbac_covers(operator)


async def test_child_readiness_flows_into_status(operator: Cluster) -> None:
    await apply(operator, example("cpu-small.yaml"))
    await eventually(lambda: all(children(operator, "mobilenet").values()), what="children")
    await eventually(lambda: ready_condition(operator, "mobilenet").get("status") == "False", what="Ready=False")

    base = f"/apis/apps/v1/namespaces/{NAMESPACE}"
    await patch(operator, f"{base}/statefulsets/mobilenet-redis/status", {"status": {"readyReplicas": 1}})
    await patch(operator, f"{base}/deployments/mobilenet-worker/status", {"status": {"readyReplicas": 2}})
    await patch(operator, f"{base}/deployments/mobilenet-web/status", {"status": {"readyReplicas": 1}})
    cond = await eventually(lambda: ready_condition(operator, "mobilenet").get("status") == "True"
                            and ready_condition(operator, "mobilenet"), what="Ready=True")
    assert cond["reason"] == "AllReplicasReady"
    st = status(operator, "mobilenet")
    assert st["web"]["ready"] == "1/1" and st["worker"]["ready"] == "2/2" and st["redis"]["ready"] is True
    assert any(c["type"] == "Available" and c["status"] == "True" for c in st["conditions"])

    # A worker pod going away shows up again, without waiting for anything but the event.
    await patch(operator, f"{base}/deployments/mobilenet-worker/status", {"status": {"readyReplicas": 1}})
    cond = await eventually(lambda: ready_condition(operator, "mobilenet").get("status") == "False"
                            and ready_condition(operator, "mobilenet"), what="Ready=False again")
    assert "workers (1/2 ready)" in cond["message"]
    assert status(operator, "mobilenet")["worker"]["ready"] == "1/2"
    assert_rbac_covers(operator)


@pytest.mark.parametrize("model, expected", [
    ({"uri": "pvc://models/flowers/model.keras"}, "spec.model.labels is required"),
    ({"uri": "s3://bucket/model.keras", "labels": "/labels.txt"}, "the s3:// scheme is not supported"),
])
async def test_invalid_resource_gets_ready_false_with_a_message(
        operator: Cluster, model: dict[str, Any], expected: str) -> None:
    body = example("custom-model.yaml")
    body["spec"]["model"] = model
    await apply(operator, body)
    cond = await eventually(lambda: ready_condition(operator, "flowers").get("reason") == "InvalidSpec"
                            and ready_condition(operator, "flowers"), what="Ready=False InvalidSpec")
    assert cond["status"] == "False"
    assert expected in cond["message"]
    assert status(operator, "flowers")["observedGeneration"] == 1  # set on the failure path too
    await eventually(lambda: any(e["type"] == "Warning" and e["reason"] == "InvalidSpec"
                                 for e in events(operator, "flowers")), what="a Warning event")
    # A permanent error: nothing is created, and the timer does not spam events about it.
    await asyncio.sleep(2.5)
    assert not any(children(operator, "flowers").values())
    assert sum(e["reason"] == "InvalidSpec" for e in events(operator, "flowers")) == 1
    assert_rbac_covers(operator)


async def test_missing_model_claim_waits_then_proceeds(operator: Cluster) -> None:
    await apply(operator, example("custom-model.yaml"))
    cond = await eventually(lambda: ready_condition(operator, "flowers").get("reason") == "WaitingForVolume"
                            and ready_condition(operator, "flowers"), what="WaitingForVolume")
    assert "PersistentVolumeClaim 'models'" in cond["message"]
    assert not any(children(operator, "flowers").values())

    rsp = await operator.post(f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims", json={
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    assert rsp.status == 200
    await eventually(lambda: all(children(operator, "flowers").values()), what="children after the claim")
    env = worker_env(operator, "flowers")
    assert env["INFERSTACK_MODEL"] == "/mnt/models/models/flowers/model.keras"
    assert env["INFERSTACK_LABELS"] == "/mnt/models/models/flowers/labels.txt"
    await eventually(lambda: ready_condition(operator, "flowers").get("reason") == "Progressing",
                     what="Progressing after the claim")
    assert_rbac_covers(operator)


async def test_foreign_child_is_not_taken_over(operator: Cluster) -> None:
    rsp = await operator.post(f"/api/v1/namespaces/{NAMESPACE}/services", json={
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "mobilenet"},
        "spec": {"selector": {"app": "someone-else"}, "ports": [{"port": 80}]}})
    assert rsp.status == 200
    await apply(operator, example("cpu-small.yaml"))
    cond = await eventually(lambda: ready_condition(operator, "mobilenet").get("reason") == "ChildConflict"
                            and ready_condition(operator, "mobilenet"), what="ChildConflict")
    assert "Service mobilenet already exists" in cond["message"]
    await asyncio.sleep(1.5)
    assert live(operator, SERVICES, "mobilenet")["spec"]["selector"] == {"app": "someone-else"}
    assert_rbac_covers(operator)


async def test_deleting_the_resource_is_not_fought(operator: Cluster) -> None:
    await apply(operator, example("cpu-small.yaml"))
    await eventually(lambda: all(children(operator, "mobilenet").values()), what="children")
    # The timer needs a finalizer (kopf stops it before the object goes away).
    assert live(operator, ISVCS, "mobilenet")["metadata"]["finalizers"] == ["inferstack.dev/finalizer"]

    await delete(operator, f"{ISVC}/mobilenet")
    await eventually(lambda: live(operator, ISVCS, "mobilenet") is None, what="finalizer released")
    await eventually(lambda: not any(children(operator, "mobilenet").values()), what="children collected")
    await asyncio.sleep(2.5)  # > 2 timer intervals: nothing comes back
    assert not any(children(operator, "mobilenet").values())
    assert_rbac_covers(operator)


async def test_console_script_runs_the_operator_with_liveness(cluster: Cluster, tmp_path: Any) -> None:
    """``inferstack-operator`` as the image runs it: a separate process, kubeconfig login, /healthz."""
    import os
    import socket
    import sys

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inferstack_operator.cli", f"--liveness=http://127.0.0.1:{port}/healthz",
        env=dict(os.environ), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async def healthy() -> dict[str, Any] | None:
            try:
                async with aiohttp.ClientSession() as session, \
                        session.get(f"http://127.0.0.1:{port}/healthz") as rsp:
                    return await rsp.json() if rsp.status == 200 else None
            except aiohttp.ClientConnectionError:
                return None

        probes = await eventually(healthy, timeout=30, what="/healthz")
        assert probes["api"] is True  # our @kopf.on.probe: logged in
        await apply(cluster, example("cpu-small.yaml"))
        await eventually(lambda: all(children(cluster, "mobilenet").values()), what="children from the CLI process")
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode in (0, -15), stderr.decode()[-2000:]


async def test_redis_storage_change_is_reported_not_forced(operator: Cluster) -> None:
    await apply(operator, example("cpu-small.yaml"))
    await eventually(lambda: all(children(operator, "mobilenet").values()), what="children")
    await eventually(lambda: status(operator, "mobilenet").get("observedGeneration") == 1, what="generation 1")
    redis_versions = len(operator.objects[STATEFULSETS, NAMESPACE, "mobilenet-redis"].history)

    await patch(operator, f"{ISVC}/mobilenet", {"spec": {"redis": {"storage": "1Gi"}, "worker": {"replicas": 4}}})
    cond = await eventually(lambda: ready_condition(operator, "mobilenet").get("reason") == "ImmutableFieldChanged"
                            and ready_condition(operator, "mobilenet"), what="ImmutableFieldChanged")
    assert "delete the StatefulSet" in cond["message"]
    # The rest of the spec still applies; the StatefulSet is left for the user to recreate.
    assert live(operator, DEPLOYMENTS, "mobilenet-worker")["spec"]["replicas"] == 4
    assert len(operator.objects[STATEFULSETS, NAMESPACE, "mobilenet-redis"].history) == redis_versions

    await delete(operator, f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/mobilenet-redis")
    sts = await eventually(lambda: live(operator, STATEFULSETS, "mobilenet-redis"), what="Redis recreated")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    await eventually(lambda: ready_condition(operator, "mobilenet").get("reason") == "Progressing",
                     what="problem cleared")
