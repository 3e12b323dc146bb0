"""Namespaced mode: the chart with watchNamespaces and the operator with --namespace, on a real API server."""

from __future__ import annotations

import json
import pathlib

from tests.kubeplane import CHART, ISVC_API, Kube, SessionOperator, helm

RELEASE, OPERATOR_NS, WATCHED, OTHER = "squad", "squad-ops", "squad-a", "squad-b"


def isvc(name: str) -> str:
    return json.dumps({"apiVersion": ISVC_API, "kind": "InferenceService", "metadata": {"name": name},
                       "spec": {"worker": {"gpu": 0}, "web": {"replicas": 1}}})


def test_namespaced_operator_serves_only_its_namespace_without_cluster_rules(
        control_plane: Kube, operator: SessionOperator, run_operator, tmp_path: pathlib.Path) -> None:
    for ns in (WATCHED, OTHER):
        control_plane.kubectl("create", "namespace", ns)
    report = helm({"steps": [{"action": "install", "release": RELEASE, "namespace": OPERATOR_NS, "chart": str(CHART),
                              "values": {"watchNamespaces": [WATCHED]}}]}, control_plane, tmp_path)
    assert report["steps"][0]["error"] is None, report["steps"][0]["error"]
    account = f"{RELEASE}-inferstack"
    # Nothing cluster-scoped was granted: a Role and a RoleBinding in the watched namespace only.
    assert control_plane.get("ClusterRole", None, account) is None
    assert control_plane.get("ClusterRoleBinding", None, account) is None
    assert control_plane.get("Role", WATCHED, account) is not None
    assert control_plane.get("Role", OTHER, account) is None

    operator.stop()  # the session's cluster-wide operator would serve the other namespace too
    team = run_operator(f"--namespace={WATCHED}", service_account=account, sa_namespace=OPERATOR_NS)
    try:
        for ns in (WATCHED, OTHER):
            control_plane.kubectl("apply", "-n", ns, "-f", "-", input=isvc("svc"))
        control_plane.kubectl("wait", "--for=condition=Ready", "infsvc/svc", "-n", WATCHED, "--timeout=120s")
        assert control_plane.get("Deployment", WATCHED, "svc-worker") is not None
        # The other namespace's resource is not touched: no finalizer, no children, no status.
        other = control_plane.isvc(OTHER, "svc")
        assert not other["metadata"].get("finalizers") and "status" not in other
        assert not control_plane.list("Deployment", OTHER)
        user = f"system:serviceaccount:{OPERATOR_NS}:{account}"
        if control_plane.audit_log is not None:
            denied = [f"{e['verb']} {e.get('requestURI')}" for e in control_plane.audit()
                      if e["user"]["username"] == user and "objectRef" in e
                      and e.get("annotations", {}).get("authorization.k8s.io/decision") != "allow"]
            assert not denied, denied
    finally:
        log = team.stop()
        operator.start()
        for ns in (WATCHED, OTHER):
            control_plane.delete("Namespace", None, ns)
    assert "Traceback" not in log, log[-3000:]
