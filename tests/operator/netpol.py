"""NetworkPolicy semantics, for asserting who a policy admits (no CNI here to enforce one).

Follows the Kubernetes API reference for NetworkPolicy: a policy applies to the pods its
``podSelector`` selects in its own namespace; a peer with only ``podSelector`` means pods in
the policy's namespace, only ``namespaceSelector`` any pod in the selected namespaces, both
together pods matching both; an empty selector selects everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def admits(policy: Mapping[str, Any], *, target: Mapping[str, str], source: Mapping[str, str],
           source_namespace: str, namespace_labels: Mapping[str, str] | None = None, port: int | str) -> bool:
    """Whether ``policy`` lets a pod labelled ``source`` (in ``source_namespace``) connect to
    ``port`` of a pod labelled ``target`` in the policy's namespace. A pod the policy does not
    select is not restricted by it (True)."""
    spec = policy["spec"]
    if not selects(spec["podSelector"], target) or "Ingress" not in spec.get("policyTypes", ["Ingress"]):
        return True
    ns_labels = dict(namespace_labels or {"kubernetes.io/metadata.name": source_namespace})
    same_namespace = source_namespace == policy["metadata"]["namespace"]
    for rule in spec.get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") in (None, port) for p in ports):
            continue
        if not rule.get("from"):
            return True  # no "from": every source
        for peer in rule["from"]:
            pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
            if "ipBlock" in peer:
                continue
            if namespaces is None and not same_namespace:
                continue
            if namespaces is not None and not selects(namespaces, ns_labels):
                continue
            if pods is not None and not selects(pods, source):
                continue
            return True
    return False
