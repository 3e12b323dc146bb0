"""Pure builders of the security children: the Redis auth Secret and the NetworkPolicies.

Like builders.py, a ``Resolved`` in and a manifest out; the passwords come in on
``Resolved.redis_auth`` (the reconciler reads or generates them, see credentials.py).
"""

from __future__ import annotations

import base64
from typing import Any

from inferstack.contract import http, queue, redis_functions
from inferstack.contract.acl import acl_file
from inferstack_operator import credentials as cred
from inferstack_operator.config import OperatorSettings
from inferstack_operator.credentials import RedisAuth
from inferstack_operator.names import (
    REDIS,
    WEB,
    WORKER,
    auth_secret_name,
    labels,
    redis_host,
    redis_name,
    selector_labels,
    web_name,
)
from inferstack_operator.spec import Resolved

Manifest = dict[str, Any]
# Namespaces carry this label with their own name (Kubernetes >= 1.21).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def auth_of(r: Resolved) -> RedisAuth:
    if r.redis_auth is None:
        raise ValueError("Resolved.redis_auth is unset: the reconciler reads or generates it before building")
    return r.redis_auth


def secret_data(r: Resolved) -> dict[str, str]:
    """The Secret's content, in clear (the manifest carries it base64-encoded)."""
    auth = auth_of(r)
    host = redis_host(r.name, r.namespace, r.cluster_domain)
    return {
        cred.WEB_URL_KEY: f"redis://web:{auth.web}@{host}:{http.REDIS_PORT}/0",
        cred.WORKER_URL_KEY: f"redis://worker:{auth.worker}@{host}:{http.REDIS_PORT}/0",
        cred.KEDA_USERNAME_KEY: "keda",
        cred.KEDA_PASSWORD_KEY: auth.keda,
        cred.HEALTH_PASSWORD_KEY: auth.health,
        cred.ACL_KEY: acl_file(auth.users(), queue.DEFAULT_PREFIX),
        cred.FUNCTIONS_KEY: redis_functions.LIBRARY,
    }


def build_redis_auth_secret(r: Resolved, settings: OperatorSettings) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": auth_secret_name(r.name), "namespace": r.namespace, "labels": labels(r.name, REDIS)},
        "type": "Opaque",
        # data, not stringData: the live object holds data, so drift compares like with like.
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret_data(r).items()},
    }


def _pods(r: Resolved, component: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": selector_labels(r.name, component)}}


def _ingress_policy(r: Resolved, name: str, component: str, peers: list[dict[str, Any]],
                    port: int | str) -> Manifest:
    """Ingress to ``component``'s pods on ``port`` from ``peers`` only."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": r.namespace, "labels": labels(r.name, component)},
        "spec": {
            "podSelector": {"matchLabels": selector_labels(r.name, component)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": port}]}],
        },
    }


def build_redis_network_policy(r: Resolved, settings: OperatorSettings) -> Manifest:
    """Redis takes connections from this instance's web and worker pods (and KEDA's namespace)."""
    peers = [_pods(r, WEB), _pods(r, WORKER)]
    if r.keda_reaches_redis:
        peers.append({"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: settings.keda_namespace}}})
    return _ingress_policy(r, redis_name(r.name), REDIS, peers, http.REDIS_PORT)


def build_web_network_policy(r: Resolved, settings: OperatorSettings) -> Manifest | None:
    """Only with ``spec.networkPolicy.web``: the web port takes connections from those peers only."""
    if r.web_ingress_from is None:
        return None
    return _ingress_policy(r, web_name(r.name), WEB, [dict(p) for p in r.web_ingress_from], http.HTTP_PORT_NAME)
