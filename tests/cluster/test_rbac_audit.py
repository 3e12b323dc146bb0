"""Least privilege, proved by the API server's audit log while the operator runs as the chart's account.

Every request the operator made was allowed (RBAC enforced by the API server, not by us), and
every rule the chart grants was used by some request, or is listed below with the reason.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.kubeplane import ACCOUNT, OPERATOR_NAMESPACE, REPO, Kube, wait_for

EXAMPLES = REPO / "operator" / "examples"
USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{ACCOUNT}"
# Granted, but never the verb of a request of its own; each is still checked by the API server.
NOT_A_REQUEST = {
    # Server-side apply creates a missing child in a PATCH request; the API server then also
    # authorizes "create" (a failure would be a 403 on that PATCH, which the test forbids).
    **{(group, resource, "create"): "authorized inside the apply (PATCH) that creates the child"
       for group, resource in [("apps", "deployments"), ("apps", "statefulsets"), ("", "services"),
                               ("", "configmaps"), ("", "secrets"), ("networking.k8s.io", "networkpolicies"),
                               ("autoscaling", "horizontalpodautoscalers"), ("keda.sh", "scaledobjects"),
                               ("keda.sh", "triggerauthentications"), ("monitoring.coreos.com", "podmonitors")]},
    # The OwnerReferencesPermissionEnforcement admission plugin (on in tools/cluster.py) checks it
    # when a child with blockOwnerDeletion is created.
    ("inferstack.dev", "inferenceservices/finalizers", "update"): "checked by admission on every child's owner reference",
}
pytestmark = pytest.mark.usefixtures("operator")


def load(name: str, **changes: Any) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / name).read_text())
    body["spec"]["worker"]["gpu"] = 0
    for path, value in changes.items():
        body["spec"][path] = value
    return body


def exercise(kube: Kube, namespace: str) -> None:
    """Everything the operator does: create, drift repair, optional children on and off, claims, delete."""
    def apply(body: dict[str, Any]) -> None:
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))

    kube.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
                 "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}}}, namespace)
    apply(load("custom-model.yaml"))
    apply(load("resnet50-autoscaled.yaml"))
    wait_for(lambda: kube.condition(namespace, "resnet50-elastic").get("status") == "True", timeout=90,
             what=lambda: f"resnet50-elastic Ready: {kube.condition(namespace, 'resnet50-elastic')}")
    wait_for(lambda: kube.get("PodMonitor", namespace, "resnet50-elastic-web"), what="a PodMonitor")
    kube.delete("Deployment", namespace, "resnet50-elastic-web")  # drift: recreated
    kube.kubectl("patch", "infsvc", "resnet50-elastic", "-n", namespace, "--type=json", "-p", json.dumps([
        {"op": "remove", "path": "/spec/worker/autoscaling"}, {"op": "remove", "path": "/spec/web/autoscaling"},
        {"op": "replace", "path": "/spec/monitoring/enabled", "value": False}]))
    wait_for(lambda: not kube.get("PodMonitor", namespace, "resnet50-elastic-web")
             and not kube.get("ScaledObject", namespace, "resnet50-elastic-worker")
             and not kube.get("HorizontalPodAutoscaler", namespace, "resnet50-elastic-web")
             and kube.get("Deployment", namespace, "resnet50-elastic-web"), timeout=60, what="pruned and repaired")
    kube.kubectl("delete", "infsvc", "--all", "-n", namespace, "--timeout=60s")


def granted(kube: Kube) -> set[tuple[str, str, str]]:
    role = kube.get("ClusterRole", None, ACCOUNT)
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_every_operator_request_was_allowed_and_every_rule_was_used(keda_and_prometheus: Kube,
                                                                    namespace: str) -> None:
    kube = keda_and_prometheus
    exercise(kube, namespace)
    requests = [e for e in kube.audit() if e["user"]["username"] == USER and "objectRef" in e
                and e.get("stage") in ("ResponseStarted", "ResponseComplete")]
    assert requests, f"no request by {USER} in the audit log"
    # RBAC's own verdict (a 403 from admission, e.g. a create in a namespace being deleted, is not one).
    denied = sorted({f"{e['verb']} {e['requestURI']}: {e['annotations'].get('authorization.k8s.io/reason', '')}"
                     for e in requests if e.get("annotations", {}).get("authorization.k8s.io/decision") != "allow"})
    assert not denied, "RBAC refused the operator:\n" + "\n".join(denied)

    used = {(e["objectRef"].get("apiGroup", ""), e["objectRef"]["resource"]
             + (f"/{e['objectRef']['subresource']}" if e["objectRef"].get("subresource") else ""), e["verb"])
            for e in requests}
    unused = granted(kube) - used - set(NOT_A_REQUEST)
    assert not unused, f"granted but never used (drop them, or say in NOT_A_REQUEST why): {sorted(unused)}"
    assert set(NOT_A_REQUEST) <= granted(kube)
