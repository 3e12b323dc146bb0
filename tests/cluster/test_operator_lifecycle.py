"""The operator, run as the chart's ServiceAccount, reconciling on a real API server with kwok nodes."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from inferstack_operator import config as opconfig
from inferstack_operator.config import AUTH_HASH_ANNOTATION
from tools import cluster
from tests.kubeplane import REPO, Kube, SessionOperator, wait_for

EXAMPLES = REPO / "operator" / "examples"
CONTRACT_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                   "app.kubernetes.io/managed-by")
pytestmark = pytest.mark.usefixtures("operator")


def example(filename: str, **spec_changes: Any) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / filename).read_text())
    for tier, change in spec_changes.items():
        body["spec"].setdefault(tier, {}).update(change)
    return body


def apply(kube: Kube, namespace: str, body: dict[str, Any]) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def children(kube: Kube, ns: str, name: str) -> dict[str, dict[str, Any] | None]:
    return {
        "web": kube.get("Deployment", ns, f"{name}-web"),
        "worker": kube.get("Deployment", ns, f"{name}-worker"),
        "redis": kube.get("StatefulSet", ns, f"{name}-redis"),
        "redis-svc": kube.get("Service", ns, f"{name}-redis"),
        "svc": kube.get("Service", ns, name),
        "config": kube.get("ConfigMap", ns, f"{name}-config"),
        "secret": kube.get("Secret", ns, f"{name}-redis-auth"),
        "netpol": kube.get("NetworkPolicy", ns, f"{name}-redis"),
    }


def all_children(kube: Kube, ns: str, name: str) -> dict[str, dict[str, Any]]:
    return wait_for(lambda: (found := children(kube, ns, name)) and all(found.values()) and found,
                    timeout=60, what=f"the children of {name}")


def wait_ready(kube: Kube, ns: str, name: str, timeout: int = 120) -> None:
    def seen() -> str:
        pods = [(p["metadata"]["name"], p["status"].get("phase"), p["spec"].get("nodeName"),
                 [c.get("reason") for c in p["status"].get("conditions", [])]) for p in kube.list("Pod", ns)]
        workloads = [(d["metadata"]["name"], d["status"]) for d in kube.list("Deployment", ns)]
        events = [(e["involvedObject"]["name"], e["reason"], e["message"][:120]) for e in kube.list("Event", ns)][-15:]
        return f"{name} Ready: {kube.condition(ns, name)}\npods: {pods}\nworkloads: {workloads}\nevents: {events}"

    wait_for(lambda: kube.condition(ns, name).get("status") == "True", timeout=timeout, what=seen)


def container_env(deploy: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0].get("env", [])}


def pod_names(kube: Kube, ns: str, name: str, component: str) -> set[str]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component={component}"
    return {p["metadata"]["name"] for p in kube.list("Pod", ns, selector)
            if not p["metadata"].get("deletionTimestamp")}


def foreign_managers(obj: dict[str, Any]) -> list[str]:
    """Managers of the object's spec and metadata other than the operator (status writers excluded)."""
    out = []
    for entry in obj["metadata"].get("managedFields", []):
        if entry.get("subresource") == "status" or entry["manager"] == opconfig.FIELD_MANAGER:
            continue
        fields = entry.get("fieldsV1", {})
        # The Deployment controller stamps its revision annotation on every Deployment it rolls.
        if fields == {"f:metadata": {"f:annotations": {".": {}, "f:deployment.kubernetes.io/revision": {}}}} or \
                fields == {"f:metadata": {"f:annotations": {"f:deployment.kubernetes.io/revision": {}}}}:
            continue
        out.append(f"{entry['manager']} ({entry['operation']}): {json.dumps(fields)[:200]}")
    return out


def test_children_are_owned_applied_by_the_operator_only_and_become_ready(control_plane: Kube,
                                                                         namespace: str) -> None:
    apply(control_plane, namespace, example("cpu-small.yaml"))
    found = all_children(control_plane, namespace, "mobilenet")
    parent = control_plane.isvc(namespace, "mobilenet")
    for key, child in found.items():
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "inferstack.dev/v1alpha1", "kind": "InferenceService", "name": "mobilenet",
            "uid": parent["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}], key
        # The contract's four labels; the shared ConfigMap, Secret and NetworkPolicy belong to no component.
        wanted = CONTRACT_LABELS if key in ("web", "worker", "redis", "redis-svc", "svc") else CONTRACT_LABELS[:2]
        assert all(label in child["metadata"]["labels"] for label in wanted), key
        managers = {e["manager"] for e in child["metadata"]["managedFields"] if e["operation"] == "Apply"}
        assert managers == {opconfig.FIELD_MANAGER}, key
        assert not foreign_managers(child), (key, foreign_managers(child))
    assert parent["metadata"]["finalizers"] == ["inferstack.dev/finalizer"]

    # kwok runs the pods; the Deployments and the StatefulSet report them, the operator says Ready.
    wait_ready(control_plane, namespace, "mobilenet")
    status = control_plane.isvc(namespace, "mobilenet")["status"]
    assert status["observedGeneration"] == 1
    assert status["url"] == f"http://mobilenet.{namespace}.svc.cluster.local:80/predict"
    assert status["web"]["ready"] == "1/1" and status["worker"]["ready"] == "2/2"
    ready = control_plane.condition(namespace, "mobilenet")
    assert ready["status"] == "True" and ready["reason"] == "AllReplicasReady"
    assert any(e["reason"] == "Created" for e in control_plane.events(namespace, "mobilenet"))


def test_gpu_workers_wait_for_a_gpu_node_with_the_schedulers_words(control_plane: Kube, namespace: str) -> None:
    body = example("resnet50-gpu.yaml")
    del body["spec"]["redis"]["storage"]  # no volume provisioner here (the storage test brings its own)
    apply(control_plane, namespace, body)
    cond = wait_for(lambda: (c := control_plane.condition(namespace, "resnet50")).get("reason") == "PodsFailing"
                    and "Insufficient nvidia.com/gpu" in c["message"] and c, timeout=90,
                    what="Ready=False naming Insufficient nvidia.com/gpu")
    assert cond["status"] == "False"
    node = "kwok-gpu-0"
    plane_nodes = control_plane.list("Node")
    assert all("nvidia.com/gpu" not in n["status"]["capacity"] for n in plane_nodes)
    try:
        add_gpu_node(control_plane, node)
        wait_ready(control_plane, namespace, "resnet50", timeout=120)
        workers = control_plane.list("Pod", namespace, "app.kubernetes.io/component=worker")
        assert workers and all(p["spec"]["nodeName"] == node for p in workers)
    finally:
        control_plane.delete("Node", None, node)


def add_gpu_node(kube: Kube, name: str) -> None:
    kube.create(cluster.node_manifest(name, cpu="32", memory="256Gi", gpus=4))


def test_batch_size_edit_rolls_only_the_worker_pods(control_plane: Kube, namespace: str) -> None:
    apply(control_plane, namespace, example("cpu-small.yaml"))
    all_children(control_plane, namespace, "mobilenet")
    wait_ready(control_plane, namespace, "mobilenet")
    old_workers = pod_names(control_plane, namespace, "mobilenet", "worker")
    old_web = pod_names(control_plane, namespace, "mobilenet", "web")
    web_generation = control_plane.get("Deployment", namespace, "mobilenet-web")["metadata"]["generation"]

    control_plane.kubectl("patch", "infsvc", "mobilenet", "-n", namespace, "--type=merge",
                          "-p", json.dumps({"spec": {"worker": {"batchSize": 48}}}))
    wait_for(lambda: container_env(control_plane.get("Deployment", namespace, "mobilenet-worker"))
             ["INFERSTACK_BATCH_SIZE"] == "48", what="the new batch size in the worker template")
    # The Deployment controller replaces every worker pod (kwok runs the new ones).
    wait_for(lambda: (new := pod_names(control_plane, namespace, "mobilenet", "worker")) and len(new) == 2
             and not new & old_workers, timeout=90, what="the worker pods rolled")
    wait_ready(control_plane, namespace, "mobilenet")
    assert control_plane.isvc(namespace, "mobilenet")["status"]["observedGeneration"] == 2
    assert control_plane.get("Deployment", namespace, "mobilenet-web")["metadata"]["generation"] == web_generation
    assert pod_names(control_plane, namespace, "mobilenet", "web") == old_web


def test_hand_edits_of_owned_fields_are_reverted_and_foreign_fields_kept(control_plane: Kube,
                                                                        namespace: str) -> None:
    apply(control_plane, namespace, example("cpu-small.yaml"))
    all_children(control_plane, namespace, "mobilenet")
    # Another manager's field (an annotation the operator never sets) is left alone...
    control_plane.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                         "metadata": {"name": "mobilenet-web", "annotations": {"team.example.com/owner": "ml"}}},
                        namespace, manager="team-tooling")
    # ...and a field the operator owns, changed by hand, is put back.
    control_plane.patch("Deployment", namespace, "mobilenet-web", {"spec": {"replicas": 5}}, manager="kubectl-edit")
    wait_for(lambda: control_plane.get("Deployment", namespace, "mobilenet-web")["spec"]["replicas"] == 1,
             what="web replicas put back")
    web = control_plane.get("Deployment", namespace, "mobilenet-web")
    assert web["metadata"]["annotations"]["team.example.com/owner"] == "ml"
    wait_for(lambda: any(e["reason"] == "Repaired" for e in control_plane.events(namespace, "mobilenet")),
             what="a Repaired event")
    # A deleted child comes back.
    control_plane.delete("Service", namespace, "mobilenet")
    wait_for(lambda: control_plane.get("Service", namespace, "mobilenet"), what="the front Service recreated")


def test_deleting_the_secret_issues_new_passwords_and_rolls_the_pods(control_plane: Kube, namespace: str) -> None:
    apply(control_plane, namespace, example("cpu-small.yaml"))
    found = all_children(control_plane, namespace, "mobilenet")
    old_data = found["secret"]["data"]
    control_plane.delete("Secret", namespace, "mobilenet-redis-auth")
    new = wait_for(lambda: (s := control_plane.get("Secret", namespace, "mobilenet-redis-auth"))
                   and s["metadata"]["uid"] != found["secret"]["metadata"]["uid"] and s, what="a new Secret")
    assert set(new["data"]) == set(old_data) and new["data"]["web-url"] != old_data["web-url"]
    # Every pod that holds a password gets the new ones: the templates' credentials digest changes.
    for component in ("web", "worker"):
        before = found[component]["spec"]["template"]["metadata"]["annotations"][AUTH_HASH_ANNOTATION]
        wait_for(lambda: control_plane.get("Deployment", namespace, f"mobilenet-{component}")["spec"]["template"]
                 ["metadata"]["annotations"][AUTH_HASH_ANNOTATION] != before, what=f"the {component} pods rolled")


def test_redis_storage_is_kept_when_the_service_is_deleted(control_plane: Kube, namespace: str) -> None:
    pv = f"{namespace}-redis"
    control_plane.create({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                                   "persistentVolumeReclaimPolicy": "Retain",
                                   "hostPath": {"path": f"/tmp/inferstack-{namespace}"}}})
    try:
        apply(control_plane, namespace, example("cpu-small.yaml", redis={"storage": "1Gi"}))
        all_children(control_plane, namespace, "mobilenet")
        claim = "data-mobilenet-redis-0"
        wait_for(lambda: (c := control_plane.get("PersistentVolumeClaim", namespace, claim))
                 and c["status"].get("phase") == "Bound", timeout=60, what="the Redis claim bound")
        wait_ready(control_plane, namespace, "mobilenet")

        control_plane.kubectl("delete", "infsvc", "mobilenet", "-n", namespace, "--timeout=60s")
        # kubectl returned: the finalizer was released. The garbage collector takes the children...
        wait_for(lambda: not any(children(control_plane, namespace, "mobilenet").values()), timeout=60,
                 what="the children collected")
        wait_for(lambda: not control_plane.list("Pod", namespace), timeout=60, what="the pods gone")
        # ...but the queue's data stays, as StatefulSet claims do.
        assert control_plane.get("PersistentVolumeClaim", namespace, claim) is not None
    finally:
        control_plane.delete("PersistentVolume", None, pv)


def test_operator_killed_mid_way_resumes_without_duplicates(control_plane: Kube, namespace: str,
                                                           operator: SessionOperator) -> None:
    body = example("cpu-small.yaml")
    apply(control_plane, namespace, body)
    wait_for(lambda: control_plane.get("Secret", namespace, "mobilenet-redis-auth"), what="the first child")
    operator.kill()
    try:
        secret = control_plane.get("Secret", namespace, "mobilenet-redis-auth")
        changed = copy.deepcopy(body)
        changed["spec"]["worker"]["replicas"] = 3  # a change made while no operator runs
        apply(control_plane, namespace, changed)
    finally:
        operator.start()
    # The new process picks the change up where the old one left off: every child, the new spec.
    all_children(control_plane, namespace, "mobilenet")
    wait_for(lambda: control_plane.isvc(namespace, "mobilenet")["status"]["observedGeneration"] == 2, timeout=60,
             what="the change made while no operator ran, reconciled")
    assert control_plane.get("Deployment", namespace, "mobilenet-worker")["spec"]["replicas"] == 3
    assert control_plane.get("Secret", namespace, "mobilenet-redis-auth")["data"] == secret["data"]
    selector = "app.kubernetes.io/instance=mobilenet"
    assert len(control_plane.list("Deployment", namespace, selector)) == 2
    assert len(control_plane.list("StatefulSet", namespace, selector)) == 1
    assert len(control_plane.list("Service", namespace, selector)) == 2
    assert control_plane.isvc(namespace, "mobilenet")["metadata"]["finalizers"] == ["inferstack.dev/finalizer"]


def test_without_keda_workers_stay_fixed_and_the_service_serves(control_plane: Kube, namespace: str) -> None:
    body = example("resnet50-autoscaled.yaml")
    body["spec"]["worker"]["gpu"] = 0
    apply(control_plane, namespace, body)
    cond = wait_for(lambda: (c := control_plane.condition(namespace, "resnet50-elastic", "Autoscaling"))
                    .get("reason") == "KEDANotInstalled" and c, timeout=60, what="Autoscaling=False KEDANotInstalled")
    assert cond["status"] == "False"
    assert control_plane.get("Deployment", namespace, "resnet50-elastic-worker")["spec"]["replicas"] == 1
    wait_ready(control_plane, namespace, "resnet50-elastic")


def test_console_script_serves_liveness_when_logged_in(run_operator: Any, namespace: str) -> None:
    """``inferstack-operator`` as the image runs it: a separate process, token login, /healthz."""
    import requests

    from tools.cluster import free_port

    port = free_port()
    op = run_operator(f"--namespace={namespace}", f"--liveness=http://127.0.0.1:{port}/healthz")
    try:
        def probes() -> dict[str, Any] | None:
            try:
                rsp = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            except requests.ConnectionError:
                return None
            return rsp.json() if rsp.status_code == 200 else None

        assert wait_for(probes, timeout=60, what="/healthz")["api"] is True  # our @kopf.on.probe: logged in
    finally:
        log = op.stop()
    assert op.proc.returncode in (0, -15), log[-2000:]


def test_deletion_is_not_held_by_a_running_resync(control_plane: Kube, namespace: str) -> None:
    """kopf keeps the finalizer until the resync timer stops; one caught mid-run used to hold it a minute."""
    for index in range(4):
        body = example("cpu-small.yaml")
        body["metadata"]["name"] = f"svc-{index}"
        apply(control_plane, namespace, body)
    for index in range(4):
        wait_for(lambda: control_plane.condition(namespace, f"svc-{index}"), timeout=60, what=f"svc-{index} status")
    # Timers run every second here and a reconcile takes a good part of it: some are mid-run now.
    control_plane.kubectl("delete", "infsvc", "--all", "-n", namespace, "--timeout=20s")
    assert not control_plane.list("InferenceService", namespace)
