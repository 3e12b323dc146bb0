"""Exactly which API calls the operator makes: the source for the chart's ClusterRole.

``RULES`` is in ClusterRole ``rules`` form. With ``--namespace`` (namespaced mode) the same
rules go into a Role per namespace, without the cluster-scoped one marked below: kopf then
scans no CRDs or namespaces, so the operator needs nothing cluster-scoped. The tests check
every request the operator sends against this, on a real API server (its audit log).
"""

from __future__ import annotations

from typing import Any

from inferstack_operator.config import GROUP, PLURAL

RULES: list[dict[str, Any]] = [
    # The custom resource: kopf watches it, patches its finalizer/annotations; we write status.
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    # Children carry an ownerReference with blockOwnerDeletion: clusters that enforce
    # OwnerReferencesPermissionEnforcement require update on the owner's finalizers for that.
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    # Children: read for drift, server-side apply to create (needs create too) or update.
    # list/watch on Deployments/StatefulSets: status changes flow into the owner's status.
    {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": ["get", "create", "patch"]},
    # The Redis passwords (read back so they survive resyncs) and who may reach Redis / the web port.
    # Same verbs: never list, watch or delete, so the operator reads only the Secrets it names.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "create", "patch"]},
    # Autoscalers and PodMonitors (optional children): created, updated, and deleted again when
    # the spec stops asking for them.
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"],
     "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["keda.sh"], "resources": ["scaledobjects", "triggerauthentications"],
     "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["podmonitors"],
     "verbs": ["get", "create", "patch", "delete"]},
    # pvc:// model locations must exist before the worker is created.
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]},
    # Why pods of a workload are not ready (Unschedulable, image pulls, crash loops), for status.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    # kopf.info()/kopf.warn() and kopf's own handler events.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # Cluster-wide mode only: kopf lists and watches CRDs to notice the InferenceService CRD
    # appear or go (cluster-scoped; namespaced mode turns this scanning off).
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["list", "watch"]},
]

# Rules that cannot go into a namespaced Role.
CLUSTER_SCOPED_RESOURCES = frozenset({"customresourcedefinitions"})


def allows(group: str, resource: str, verb: str, rules: list[dict[str, Any]] | None = None) -> bool:
    """Whether ``rules`` allow ``verb`` on ``group``/``resource`` (resource may be "x/status")."""
    for rule in RULES if rules is None else rules:
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            return True
    return False
