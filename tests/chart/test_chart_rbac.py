"""The chart's RBAC grants exactly what the operator declares (``inferstack_operator.rbac.RULES``).

That the operator needs all of it and nothing more is proved on a real API server, from its
audit log, while the operator runs as the chart's account: tests/cluster/test_rbac_audit.py.
"""

from __future__ import annotations

from inferstack_operator import rbac

from .conftest import NAMESPACE, find

Perm = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)
CLUSTER_SCOPED = {"customresourcedefinitions"}
APP_NS = "prod"


def triples(rules: list[dict]) -> set[Perm]:
    out = set()
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], f"wildcard in {rule}"
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def authorized(objs: list[dict], namespace: str | None, perm: Perm, sa: str = "inferstack") -> bool:
    """RBAC's decision for the operator's ServiceAccount; namespace None means a cluster-scoped object."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs
             if o["kind"] in ("Role", "ClusterRole")}
    for binding in find(objs, "ClusterRoleBinding") + find(objs, "RoleBinding"):
        if {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} not in binding["subjects"]:
            continue
        bound_ns = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        if bound_ns is not None and bound_ns != namespace:
            continue  # a RoleBinding grants only in its own namespace, never cluster-scoped objects
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], bound_ns if ref["kind"] == "Role" else None, ref["name"]))
        if role and perm in triples(role["rules"]):
            return True
    return False


# --- the tests ------------------------------------------------------------------------------

def test_chart_grants_exactly_the_declared_rules(rendered: dict) -> None:
    declared = triples(rbac.RULES)
    objs = rendered["default"]["objects"]
    (cluster_role,) = find(objs, "ClusterRole")
    # All namespaces: one ClusterRole; kopf never lists namespaces then, so that rule is left out.
    assert triples(cluster_role["rules"]) == declared
    assert find(objs, "Role") == []

    objs = rendered["namespaced"]["objects"]
    # Named namespaces: nothing cluster-scoped (kopf scans no CRDs or namespaces then).
    assert find(objs, "ClusterRole") == [] and find(objs, "ClusterRoleBinding") == []
    roles = find(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert triples(role["rules"]) == {p for p in declared if p[1] not in rbac.CLUSTER_SCOPED_RESOURCES}
    assert sorted(b["metadata"]["namespace"] for b in find(objs, "RoleBinding")) == ["team-a", "team-b"]


def test_declared_cluster_scoped_resources() -> None:
    assert rbac.CLUSTER_SCOPED_RESOURCES == CLUSTER_SCOPED


def test_no_rbac_without_rbac_create(rendered: dict) -> None:
    objs = rendered["paused-no-rbac"]["objects"]
    assert not authorized(objs, APP_NS, ("apps", "deployments", "create"))


def test_bindings_follow_a_custom_service_account(rendered: dict) -> None:
    objs = rendered["custom-images"]["objects"]
    assert authorized(objs, APP_NS, ("apps", "deployments", "create"), sa="ml-operator")
    assert not authorized(objs, APP_NS, ("apps", "deployments", "create"), sa="inferstack")
