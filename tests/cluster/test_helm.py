"""`helm install`, `helm upgrade` and `helm uninstall` of charts/inferstack with helm-sdkpy, for real."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from tests.kubeplane import ACCOUNT, CHART, OPERATOR_NAMESPACE, Kube, helm, wait_for


def test_install_creates_the_operator_its_account_and_rbac(control_plane: Kube, operator_release: dict) -> None:
    deploy = control_plane.get("Deployment", OPERATOR_NAMESPACE, ACCOUNT)
    assert deploy is not None
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == ACCOUNT
    assert control_plane.get("ServiceAccount", OPERATOR_NAMESPACE, ACCOUNT) is not None
    role = control_plane.get("ClusterRole", None, ACCOUNT)
    binding = control_plane.get("ClusterRoleBinding", None, ACCOUNT)
    assert role["rules"] and binding["roleRef"]["name"] == ACCOUNT
    assert {"kind": "ServiceAccount", "name": ACCOUNT, "namespace": OPERATOR_NAMESPACE} in binding["subjects"]
    # kwok runs the operator's pod: the Deployment reports it ready, as on a real node.
    wait_for(lambda: (control_plane.get("Deployment", OPERATOR_NAMESPACE, ACCOUNT)["status"]
                      .get("readyReplicas") == 1), timeout=60, what="the operator Deployment ready")


def test_upgrade_changes_the_operator_settings(control_plane: Kube, operator_release: dict,
                                               tmp_path: pathlib.Path) -> None:
    ns, release = "helm-upgrade", "upgraded"
    report = helm({"steps": [
        {"action": "install", "release": release, "namespace": ns, "chart": str(CHART)},
        {"action": "upgrade", "release": release, "namespace": ns, "chart": str(CHART),
         "values": {"kedaNamespace": "autoscalers", "allowedImages": ["registry.example.com/ml/"]}},
    ]}, control_plane, tmp_path)
    assert [s["error"] for s in report["steps"]] == [None, None]
    name = f"{release}-inferstack"
    env = {e["name"]: e.get("value") for e in
           control_plane.get("Deployment", ns, name)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["INFERSTACK_KEDA_NAMESPACE"] == "autoscalers"
    assert env["INFERSTACK_ALLOWED_IMAGES"] == "registry.example.com/ml/"
    report = helm({"steps": [{"action": "uninstall", "release": release, "namespace": ns, "wait": True}]},
                  control_plane, tmp_path)
    assert report["steps"][0]["error"] is None
    assert control_plane.get("Deployment", ns, name) is None
    assert control_plane.get("ClusterRole", None, name) is None


def test_uninstall_with_the_sample_leaves_nothing_stuck(control_plane: Kube, operator: Any,
                                                        tmp_path: pathlib.Path) -> None:
    ns, release = "helm-sample", "sampled"
    values = {"sample": {"enabled": True, "name": "demo"}}
    report = helm({"steps": [{"action": "install", "release": release, "namespace": ns, "chart": str(CHART),
                              "values": values}]}, control_plane, tmp_path)
    assert report["steps"][0]["error"] is None, report["steps"][0]["error"]
    # The operator (as the first release's account) serves the sample: children appear and run.
    wait_for(lambda: control_plane.get("Deployment", ns, "demo-worker"), timeout=60, what="the sample's worker")
    control_plane.kubectl("wait", "--for=condition=Ready", "infsvc/demo", "-n", ns, "--timeout=120s")

    report = helm({"steps": [{"action": "uninstall", "release": release, "namespace": ns, "wait": True}]},
                  control_plane, tmp_path)
    assert report["steps"][0]["error"] is None, report["steps"][0]["error"]
    assert control_plane.isvc(ns, "demo") is None  # no finalizer left it hanging
    # The real garbage collector removes the children through their owner references.
    wait_for(lambda: not control_plane.list("Deployment", ns) and not control_plane.list("StatefulSet", ns),
             timeout=60, what="the sample's children collected")
    control_plane.kubectl("delete", "namespace", ns, "--timeout=60s")
    assert control_plane.get("Namespace", None, ns) is None


@pytest.mark.parametrize("values, fragment", [
    ({"replicaCount": 2}, "/replicaCount"),
    ({"sample": {"enabled": True}, "watchNamespaces": ["team-a"]}, "which watchNamespaces leaves out"),
])
def test_bad_values_are_refused_before_anything_is_created(control_plane: Kube, operator_release: dict,
                                                           tmp_path: pathlib.Path, values: dict, fragment: str) -> None:
    report = helm({"steps": [{"action": "install", "release": "refused", "namespace": "helm-refused",
                              "chart": str(CHART), "values": values}]}, control_plane, tmp_path)
    assert fragment in (report["steps"][0]["error"] or "")
    assert control_plane.get("Deployment", "helm-refused", "refused-inferstack") is None


