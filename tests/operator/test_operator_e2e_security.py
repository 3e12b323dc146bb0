"""The operator's security children in kmock's emulator: the Secret lives across resyncs,
rotates when deleted, pods use it, and the NetworkPolicy admits the right pods."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import kubernetes_validate
import pytest
from tests.operator.conftest import NAMESPACE, Cluster, eventually
from tests.operator.netpol import admits
from tests.operator.test_operator_e2e import (
    DEPLOYMENTS,
    STATEFULSETS,
    apply,
    assert_rbac_covers,
    delete,
    example,
    live,
)

pytestmark = pytest.mark.asyncio

SECRETS = "v1/secrets"
POLICIES = "networking.k8s.io/v1/networkpolicies"
CONFIGMAPS = "v1/configmaps"
AUTH_HASH = "inferstack.dev/redis-auth-hash"
WORKLOADS = ((DEPLOYMENTS, "mobilenet-web"), (DEPLOYMENTS, "mobilenet-worker"), (STATEFULSETS, "mobilenet-redis"))


def secret_text(cluster: Cluster, name: str = "mobilenet") -> dict[str, str]:
    secret = live(cluster, SECRETS, f"{name}-redis-auth")
    assert secret is not None
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def template(cluster: Cluster, resource: str, name: str) -> dict[str, Any]:
    obj = live(cluster, resource, name)
    assert obj is not None
    return obj["spec"]["template"]


def auth_hashes(cluster: Cluster) -> set[str]:
    return {template(cluster, res, name)["metadata"]["annotations"][AUTH_HASH] for res, name in WORKLOADS}


def everything(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [o for res, n in ((SECRETS, f"{name}-redis-auth"), (POLICIES, f"{name}-redis"),
                             (STATEFULSETS, f"{name}-redis"), (DEPLOYMENTS, f"{name}-web"),
                             (DEPLOYMENTS, f"{name}-worker"), (CONFIGMAPS, f"{name}-config"))
            if (o := live(cluster, res, n)) is not None]


async def test_secret_is_created_once_and_reused_across_resyncs(operator: Cluster) -> None:
    await apply(operator, example("cpu-small.yaml"))
    await eventually(lambda: len(everything(operator, "mobilenet")) == 6, what="the children")
    first = secret_text(operator)
    versions = len(operator.objects[SECRETS, NAMESPACE, "mobilenet-redis-auth"].history)
    hashes = auth_hashes(operator)
    assert len(hashes) == 1
    await asyncio.sleep(3.5)  # > 3 resyncs (1 s in tests)
    assert secret_text(operator) == first, "the passwords changed on a resync"
    assert len(operator.objects[SECRETS, NAMESPACE, "mobilenet-redis-auth"].history) == versions
    assert auth_hashes(operator) == hashes
    # The pods log in with it; nothing secret sits in the ConfigMap.
    for resource, name in WORKLOADS[:2]:
        for c in template(operator, resource, name)["spec"]["containers"]:
            (url,) = [e for e in c["env"] if e["name"] == "INFERSTACK_REDIS_URL"]
            assert url["valueFrom"]["secretKeyRef"]["name"] == "mobilenet-redis-auth"
    config = live(operator, CONFIGMAPS, "mobilenet-config")
    assert config is not None and not any(first["web-url"] in v for v in config["data"].values())
    for manifest in everything(operator, "mobilenet"):
        clean = {k: v for k, v in manifest.items() if k != "status"}
        clean["metadata"] = {k: v for k, v in manifest["metadata"].items()
                             if k not in ("uid", "resourceVersion", "generation", "creationTimestamp")}
        kubernetes_validate.validate(clean, "1.31", strict=True)
    assert_rbac_covers(operator)


async def test_deleting_the_secret_rotates_the_passwords_and_rolls_the_pods(operator: Cluster) -> None:
    await apply(operator, example("cpu-small.yaml"))
    await eventually(lambda: len(everything(operator, "mobilenet")) == 6, what="the children")
    before, hashes = secret_text(operator), auth_hashes(operator)

    await delete(operator, f"/api/v1/namespaces/{NAMESPACE}/secrets/mobilenet-redis-auth")
    after = await eventually(lambda: live(operator, SECRETS, "mobilenet-redis-auth") and secret_text(operator),
                             what="a new Secret")
    assert after["web-url"] != before["web-url"] and after["worker-url"] != before["worker-url"]
    assert after["keda-password"] != before["keda-password"] and after["users.acl"] != before["users.acl"]
    # Redis (reads the ACL at start), web and workers (env from the Secret) all roll, together.
    new = await eventually(lambda: (h := auth_hashes(operator)) != hashes and len(h) == 1 and h, what="pods rolled")
    assert new.isdisjoint(hashes)
    assert_rbac_covers(operator)


async def test_network_policy_admits_only_this_instances_pods(operator: Cluster) -> None:
    await apply(operator, example("cpu-small.yaml"))
    other = example("cpu-small.yaml")
    other["metadata"]["name"] = "other"
    await apply(operator, other)
    await eventually(lambda: len(everything(operator, "mobilenet")) == 6 and len(everything(operator, "other")) == 6,
                     what="both services' children")
    policy = live(operator, POLICIES, "mobilenet-redis")
    assert policy is not None

    def reaches(labels: dict[str, str]) -> bool:
        redis_pod = template(operator, STATEFULSETS, "mobilenet-redis")["metadata"]["labels"]
        return admits(policy, target=redis_pod, source=labels, source_namespace=NAMESPACE, port=6379)

    assert reaches(template(operator, DEPLOYMENTS, "mobilenet-web")["metadata"]["labels"])
    assert reaches(template(operator, DEPLOYMENTS, "mobilenet-worker")["metadata"]["labels"])
    assert not reaches(template(operator, DEPLOYMENTS, "other-web")["metadata"]["labels"])
    assert not reaches(template(operator, DEPLOYMENTS, "other-worker")["metadata"]["labels"])
    assert not reaches({})
    # Each service has its own passwords.
    assert secret_text(operator)["web-url"] != secret_text(operator, "other")["web-url"]
    assert_rbac_covers(operator)
