"""Cluster settings and pod diagnostics, end to end: the real operator against the emulator."""

from __future__ import annotations

from typing import Any

import pytest
from tests.operator.conftest import ISVC, NAMESPACE, Cluster, eventually, running_operator
from tests.operator.test_operator_e2e import (
    DEPLOYMENTS,
    ISVCS,
    STATEFULSETS,
    apply,
    assert_rbac_covers,
    children,
    events,
    example,
    live,
    patch,
    ready_condition,
    status,
)

pytestmark = pytest.mark.asyncio


def pods(cluster: Cluster, resource: str, name: str) -> dict[str, Any]:
    """The pod template (metadata and spec) of a live child."""
    return (live(cluster, resource, name) or {}).get("spec", {}).get("template", {})


def settings(prefix: str) -> dict[str, Any]:
    """Every per-tier setting, with values naming the tier and ``prefix`` (to see a change)."""
    return {
        "env": [{"name": "EXTRA", "value": prefix}],
        "podAnnotations": {"example.com/note": prefix},
        "podLabels": {"team": prefix},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": [prefix]}]}]}}},
        "priorityClassName": f"{prefix}-priority",
    }


def spec_with(prefix: str) -> dict[str, Any]:
    return {
        "imagePullSecrets": [{"name": f"{prefix}-regcred"}],
        "model": {"runtime": "openvino" if prefix == "one" else "keras", "precision": "int8" if prefix == "one" else "fp16"},
        "web": settings(prefix),
        "worker": {**settings(prefix), "runtimeClassName": f"{prefix}-runtime"},
        "redis": settings(prefix),
    }


REMOVED = {
    "imagePullSecrets": None,
    "model": {"runtime": None, "precision": None},
    **{tier: {key: None for key in settings("x")} for tier in ("web", "redis")},
    "worker": {**{key: None for key in settings("x")}, "runtimeClassName": None},
}


def observed(cluster: Cluster) -> dict[str, Any]:
    """What the cluster settings look like on the three live pod templates."""
    found: dict[str, Any] = {}
    for tier, resource in (("web", DEPLOYMENTS), ("worker", DEPLOYMENTS), ("redis", STATEFULSETS)):
        template = pods(cluster, resource, f"mobilenet-{tier}")
        pod = template.get("spec", {})
        container = pod.get("containers", [{}])[0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        found[tier] = {
            "pullSecrets": pod.get("imagePullSecrets"),
            "extra": env.get("EXTRA"),
            "annotation": template.get("metadata", {}).get("annotations", {}).get("example.com/note"),
            "label": template.get("metadata", {}).get("labels", {}).get("team"),
            "affinity": pod.get("affinity", {}).get("nodeAffinity", {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [{}])[0].get(
                "matchExpressions", [{}])[0].get("values"),
            "priority": pod.get("priorityClassName"),
            "runtimeClass": pod.get("runtimeClassName"),
            "runtime": (env.get("INFERSTACK_RUNTIME"), env.get("INFERSTACK_PRECISION")),
        }
    return found


def expected(prefix: str | None) -> dict[str, Any]:
    def tier(name: str) -> dict[str, Any]:
        worker = name == "worker"
        return {
            "pullSecrets": [{"name": f"{prefix}-regcred"}] if prefix else None,
            "extra": prefix,
            "annotation": prefix,
            "label": prefix,
            "affinity": [prefix] if prefix else None,
            "priority": f"{prefix}-priority" if prefix else None,
            "runtimeClass": f"{prefix}-runtime" if prefix and worker else None,
            "runtime": ({"one": ("openvino", "int8"), "two": ("keras", "fp16")}[prefix] if prefix and worker
                        else (None, None)),
        }
    return {name: tier(name) for name in ("web", "worker", "redis")}


async def test_cluster_settings_are_applied_changed_and_removed(operator: Cluster) -> None:
    body = example("cpu-small.yaml")
    body["spec"].update(spec_with("one"))
    await apply(operator, body)
    await eventually(lambda: observed(operator) == expected("one"), what="settings applied at creation")

    await patch(operator, f"{ISVC}/mobilenet", {"spec": spec_with("two")})
    await eventually(lambda: observed(operator) == expected("two"), what="settings changed")
    await eventually(lambda: status(operator, "mobilenet").get("observedGeneration") == 2, what="generation 2")

    await patch(operator, f"{ISVC}/mobilenet", {"spec": REMOVED})
    await eventually(lambda: observed(operator) == expected(None), what="settings removed")
    await eventually(lambda: status(operator, "mobilenet").get("observedGeneration") == 3, what="generation 3")
    assert_rbac_covers(operator)


async def test_env_clash_keeps_ours_and_says_so(operator: Cluster) -> None:
    body = example("cpu-small.yaml")
    body["spec"]["web"]["env"] = [{"name": "INFERSTACK_PORT", "value": "1"}, {"name": "MINE", "value": "2"}]
    await apply(operator, body)
    await eventually(lambda: all(children(operator, "mobilenet").values()), what="children")
    env = {e["name"]: e.get("value") for e in pods(operator, DEPLOYMENTS, "mobilenet-web")["spec"]["containers"][0]["env"]}
    assert env["INFERSTACK_PORT"] == "8080" and env["MINE"] == "2"
    cond = await eventually(lambda: "ignored" in ready_condition(operator, "mobilenet").get("message", "")
                            and ready_condition(operator, "mobilenet"), what="a note in Ready")
    assert "spec.web.env INFERSTACK_PORT ignored: the operator sets it" in cond["message"]
    await eventually(lambda: any(e["reason"] == "IgnoredSettings" and e["type"] == "Warning"
                                 for e in events(operator, "mobilenet")), what="an IgnoredSettings event")


def pod(name: str, component: str, instance: str, pod_status: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "inferstack",
                                                  "app.kubernetes.io/instance": instance,
                                                  "app.kubernetes.io/component": component}},
            "spec": {"containers": [{"name": component, "image": "x"}]},
            "status": pod_status}


UNSCHEDULABLE = {"phase": "Pending", "conditions": [{
    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}
IMAGE_PULL = {"phase": "Pending", "containerStatuses": [{
    "name": "web", "ready": False, "restartCount": 0,
    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"r.local/web:9\""}}}]}
CRASHING = {"phase": "Running", "containerStatuses": [{
    "name": "worker", "ready": False, "restartCount": 4,
    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
    "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}}}]}


async def test_pod_problems_show_in_the_ready_condition(operator: Cluster) -> None:
    await apply(operator, example("cpu-small.yaml"))
    await eventually(lambda: all(children(operator, "mobilenet").values()), what="children")
    for body in (pod("mobilenet-worker-a", "worker", "mobilenet", UNSCHEDULABLE),
                 pod("mobilenet-worker-b", "worker", "mobilenet", UNSCHEDULABLE),
                 pod("mobilenet-web-a", "web", "mobilenet", IMAGE_PULL),
                 pod("other-worker-a", "worker", "other", CRASHING)):  # another service's: not ours to report
        rsp = await operator.post(f"/api/v1/namespaces/{NAMESPACE}/pods", json=body)
        assert rsp.status == 200, await rsp.text()

    # The timer reads the pods; wait for a refresh that saw all of them.
    cond = await eventually(lambda: ready_condition(operator, "mobilenet").get("reason") == "PodsFailing"
                            and "ImagePullBackOff" in ready_condition(operator, "mobilenet")["message"]
                            and ready_condition(operator, "mobilenet"), what="PodsFailing")
    message = cond["message"]
    assert "pod mobilenet-worker-a is Pending (Unschedulable): 0/3 nodes are available: 3 Insufficient nvidia.com/gpu" \
        in message
    assert "mobilenet-worker-b" not in message  # the same problem is said once
    assert 'pod mobilenet-web-a container web: ImagePullBackOff: Back-off pulling image "r.local/web:9"' in message
    assert "CrashLoopBackOff" not in message

    rsp = await operator.post(f"/api/v1/namespaces/{NAMESPACE}/pods",
                              json=pod("mobilenet-worker-c", "worker", "mobilenet", CRASHING))
    assert rsp.status == 200
    await eventually(lambda: "pod mobilenet-worker-c container worker: CrashLoopBackOff (last exit code 2)"
                     in ready_condition(operator, "mobilenet").get("message", ""), what="CrashLoopBackOff")
    assert_rbac_covers(operator)


async def test_ephemeral_resource_is_deleted_without_the_operator(cluster: Cluster) -> None:
    """The chart's sample (labelled ephemeral) has no finalizer: `helm uninstall` cannot leave it stuck."""
    sample = example("cpu-small.yaml")
    sample["metadata"]["labels"] = {"inferstack.dev/ephemeral": "true"}
    regular = example("resnet50-gpu.yaml")
    async with running_operator(cluster):
        await apply(cluster, sample)
        await apply(cluster, regular)
        await eventually(lambda: all(children(cluster, "mobilenet").values())
                         and all(children(cluster, "resnet50").values()), what="children")
        await eventually(lambda: status(cluster, "mobilenet").get("observedGeneration") == 1, what="sample status")
        await eventually(lambda: live(cluster, ISVCS, "resnet50")["metadata"].get("finalizers"),
                         what="the regular one's finalizer")
        assert not live(cluster, ISVCS, "mobilenet")["metadata"].get("finalizers")
    # The operator is gone (as after `helm uninstall` removed its Deployment).
    rsp = await cluster.delete(f"{ISVC}/mobilenet")
    assert rsp.status == 200
    assert live(cluster, ISVCS, "mobilenet") is None
    await eventually(lambda: not any(children(cluster, "mobilenet").values()), what="sample's children collected")
    rsp = await cluster.delete(f"{ISVC}/resnet50")
    assert rsp.status == 200
    assert live(cluster, ISVCS, "resnet50") is not None  # without the label it waits for its finalizer


async def test_optional_children_follow_the_apis_the_cluster_serves(
        operator: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from inferstack_operator import builders

    def extra(suffix: str) -> builders.Builder:
        def build(r: Any, settings: Any) -> dict[str, Any]:
            return {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": f"{r.name}-{suffix}", "namespace": r.namespace}, "data": {}}
        return build

    monkeypatch.setattr(builders, "CHILDREN", [
        *builders.CHILDREN,
        builders.Child("ConfigMap", extra("served"), requires="apps/v1"),
        builders.Child("ConfigMap", extra("absent"), requires="example.com/v1"),
    ])
    await apply(operator, example("cpu-small.yaml"))
    await eventually(lambda: live(operator, "v1/configmaps", "mobilenet-served"), what="the served API's child")
    await eventually(lambda: all(children(operator, "mobilenet").values()), what="children")
    assert live(operator, "v1/configmaps", "mobilenet-absent") is None
