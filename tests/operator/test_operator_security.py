"""The security children and settings as plain data: Secret, ACL, NetworkPolicies, Redis, allowlist."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import kubernetes_validate
import pytest
from tests.operator.netpol import admits
from tests.operator.kit import AUTH, K8S_VERSION, SETTINGS, build, container, resolved

from inferstack.contract.queue import FUNCTION_LIBRARY
from inferstack.contract.redis_functions import LIBRARY
from inferstack_operator import builders, reconcile, spec
from inferstack_operator.config import OperatorSettings, SettingsError
from inferstack_operator.credentials import RedisAuth

NS = "ml"
WEB_ONLY = {"networkPolicy": {"web": {"from": [
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]}}}


def pod_labels(objs: dict[str, dict[str, Any]], key: str) -> dict[str, str]:
    return objs[key]["spec"]["template"]["metadata"]["labels"]


def test_secret_holds_the_urls_users_and_acl() -> None:
    objs = build({})
    secret = objs["Secret/demo-redis-auth"]
    assert secret["type"] == "Opaque"
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert sorted(data) == ["functions.lua", "health-password", "keda-password", "keda-username", "users.acl",
                            "web-url", "worker-url"]
    assert data["functions.lua"] == LIBRARY and LIBRARY.startswith(f"#!lua name={FUNCTION_LIBRARY}\n")
    host = "demo-redis.ml.svc.cluster.local:6379/0"
    assert data["web-url"] == f"redis://web:{AUTH.web}@{host}"
    assert data["worker-url"] == f"redis://worker:{AUTH.worker}@{host}"
    assert data["keda-username"] == "keda" and data["keda-password"] == AUTH.keda
    acl = data["users.acl"]
    assert acl.splitlines()[0] == "user default reset off"
    assert "nopass" not in acl and "+@all" not in acl and "allkeys" not in acl and "~*" not in acl
    # Hashes only: the ACL file would not give a password away even if read.
    assert not any(p in acl for p in (AUTH.web, AUTH.worker, AUTH.keda, AUTH.health))
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)


def test_passwords_appear_only_in_the_secret() -> None:
    objs = build({"worker": {"gpu": 2}, "redis": {"storage": "1Gi"}})
    secrets = (AUTH.web, AUTH.worker, AUTH.keda, AUTH.health)
    for key, obj in objs.items():
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(obj)
        encoded = [base64.b64encode(p.encode()).decode()[:40] for p in secrets]
        assert not any(p in text for p in secrets + tuple(encoded)), key
    assert "INFERSTACK_REDIS_URL" not in objs["ConfigMap/demo-config"]["data"]
    assert "RedisAuth(<redacted>)" == repr(AUTH) and AUTH.web not in repr(resolved({}))


def test_pods_read_the_urls_from_the_secret() -> None:
    objs = build({"worker": {"gpu": 2}})
    ref = {"secretKeyRef": {"name": "demo-redis-auth"}}
    for key, url_key in (("Deployment/demo-web", "web-url"), ("Deployment/demo-worker", "worker-url")):
        for c in objs[key]["spec"]["template"]["spec"]["containers"]:
            (url,) = [e for e in c["env"] if e["name"] == "INFERSTACK_REDIS_URL"]
            assert url["valueFrom"] == {"secretKeyRef": {**ref["secretKeyRef"], "key": url_key}}, key


def test_redis_runs_the_acl_with_protected_mode_and_a_patched_image() -> None:
    sts = build({})["StatefulSet/demo-redis"]
    c = container(sts)
    args = c["args"]
    assert args[args.index("--protected-mode") + 1] == "yes"
    assert args[args.index("--aclfile") + 1] == "/etc/redis-acl/users.acl"
    assert {"name": "acl", "mountPath": "/etc/redis-acl", "readOnly": True} in c["volumeMounts"]
    (acl,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "acl"]
    assert acl["secret"]["secretName"] == "demo-redis-auth" and acl["secret"]["defaultMode"] == 0o440
    assert acl["secret"]["items"] == [{"key": "users.acl", "path": "users.acl"},
                                      {"key": "functions.lua", "path": "functions.lua"}]
    image, tag = c["image"].split(":")
    major, minor, patch = (int(x) for x in tag.split("-")[0].split("."))
    # The October 2025 fixes (CVE-2025-49844, -46817, -46818, -46819): 7.2.11, 7.4.6, 8.0.4, 8.2.2.
    fixed = {(7, 2): 11, (7, 4): 6, (8, 0): 4, (8, 2): 2}
    assert image == "redis" and ((major, minor) in fixed and patch >= fixed[(major, minor)] or (major, minor) > (8, 2))


def test_a_new_password_rolls_every_pod_and_only_then() -> None:
    same = {k: v["spec"]["template"]["metadata"]["annotations"]["inferstack.dev/redis-auth-hash"]
            for k, v in build({}).items() if v["kind"] in ("Deployment", "StatefulSet")}
    assert len(same) == 3 and len(set(same.values())) == 1
    again = build({})  # same passwords: nothing changes
    assert all(again[k]["spec"]["template"]["metadata"]["annotations"]["inferstack.dev/redis-auth-hash"] == v
               for k, v in same.items())
    rotated = by_kind_with(RedisAuth.generate())
    for key, digest in same.items():
        assert rotated[key]["spec"]["template"]["metadata"]["annotations"]["inferstack.dev/redis-auth-hash"] != digest


def by_kind_with(auth: RedisAuth) -> dict[str, dict[str, Any]]:
    r = dataclasses.replace(spec.resolve("demo", NS, {}), redis_auth=auth)
    return {f"{m['kind']}/{m['metadata']['name']}": m for _, m in builders.build_children(r, SETTINGS)}


def test_redis_policy_admits_this_instances_web_and_worker_only() -> None:
    objs, other = build({}), build({}, name="other")
    policy = objs["NetworkPolicy/demo-redis"]
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    redis_pod = pod_labels(objs, "StatefulSet/demo-redis")

    def reaches(source: dict[str, str], namespace: str = NS, port: int = 6379) -> bool:
        return admits(policy, target=redis_pod, source=source, source_namespace=namespace, port=port)

    assert reaches(pod_labels(objs, "Deployment/demo-web")) and reaches(pod_labels(objs, "Deployment/demo-worker"))
    assert not reaches(pod_labels(objs, "Deployment/demo-web"), port=26379)
    assert not reaches(pod_labels(other, "Deployment/other-web"))  # another InferenceService's pods
    assert not reaches(pod_labels(other, "Deployment/other-worker"))
    assert not reaches({})  # an unlabelled pod
    assert not reaches({"app.kubernetes.io/component": "web"})
    assert not reaches(pod_labels(objs, "Deployment/demo-web"), namespace="elsewhere")  # same labels, other ns
    assert not reaches({}, namespace="keda")  # no autoscaling: KEDA has no business here
    # The policy restricts Redis only.
    assert admits(policy, target=pod_labels(objs, "Deployment/demo-web"), source={}, source_namespace="x", port=8080)


@pytest.mark.parametrize("settings, namespace", [(SETTINGS, "keda"),
                                                 (OperatorSettings.from_env({"INFERSTACK_KEDA_NAMESPACE": "scalers"}),
                                                  "scalers")])
def test_autoscaling_admits_kedas_namespace(settings: OperatorSettings, namespace: str) -> None:
    objs = build({"worker": {"autoscaling": {"maxReplicas": 4}}}, settings=settings)
    policy = objs["NetworkPolicy/demo-redis"]
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    redis_pod = pod_labels(objs, "StatefulSet/demo-redis")
    assert admits(policy, target=redis_pod, source={"app": "keda-operator"}, source_namespace=namespace, port=6379)
    assert not admits(policy, target=redis_pod, source={}, source_namespace="default", port=6379)
    off = build({"worker": {"replicas": 2}}, settings=settings)["NetworkPolicy/demo-redis"]
    assert not admits(off, target=redis_pod, source={}, source_namespace=namespace, port=6379)


def test_web_policy_only_when_asked() -> None:
    assert "NetworkPolicy/demo-web" not in build({})
    objs = build(WEB_ONLY)
    policy = objs["NetworkPolicy/demo-web"]
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    web_pod = pod_labels(objs, "Deployment/demo-web")
    assert admits(policy, target=web_pod, source={"app": "nginx"}, source_namespace="ingress-nginx", port="http")
    assert not admits(policy, target=web_pod, source={"app": "nginx"}, source_namespace="default", port="http")
    assert not admits(policy, target=web_pod, source=pod_labels(objs, "Deployment/demo-worker"),
                      source_namespace=NS, port="http")


@pytest.mark.parametrize("web", [{}, {"from": []}, {"from": [{}]}, {"from": "everyone"}])
def test_web_policy_never_admits_everyone_by_accident(web: dict[str, Any]) -> None:
    with pytest.raises(spec.SpecError, match="spec.networkPolicy.web.from"):
        spec.resolve("demo", NS, {"networkPolicy": {"web": web}})


def test_credentials_round_trip_through_the_secret() -> None:
    secret = build({})["Secret/demo-redis-auth"]
    assert RedisAuth.from_secret(secret) == AUTH
    assert RedisAuth.generate() != RedisAuth.generate()
    assert len({AUTH.web, AUTH.worker, AUTH.keda, AUTH.health}) == 4 and len(AUTH.web) == 64
    for broken in (None, {}, {"data": {}}, {"data": {**secret["data"], "web-url": "not base64!"}},
                   {"data": {**secret["data"], "keda-password": base64.b64encode(b"short").decode()}}):
        assert RedisAuth.from_secret(broken) is None


def test_builders_refuse_to_run_without_passwords() -> None:
    with pytest.raises(ValueError, match="redis_auth"):
        builders.build_children(spec.resolve("demo", NS, {}), SETTINGS)


def body(spec_: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "demo", "namespace": NS}, "spec": spec_}


def test_image_allowlist() -> None:
    settings = OperatorSettings.from_env({"INFERSTACK_ALLOWED_IMAGES": "registry.corp/ml/, ghcr.io/inferstack/"})
    assert settings.allowed_images == ("registry.corp/ml/", "ghcr.io/inferstack/")
    reconcile.resolve_body(body({"web": {"image": "registry.corp/ml/web:1"}}), settings)
    reconcile.resolve_body(body({}), settings)  # the operator's own images
    with pytest.raises(spec.SpecError, match=r"spec.worker.image 'docker.io/evil/worker:1' is not allowed"):
        reconcile.resolve_body(body({"worker": {"image": "docker.io/evil/worker:1"}}), settings)
    with pytest.raises(spec.SpecError, match="spec.web.image"):
        reconcile.resolve_body(body({"web": {"image": "registry.corp/mlx/web:1"}}), settings)
    reconcile.resolve_body(body({"worker": {"image": "docker.io/evil/worker:1"}}), SETTINGS)  # no allowlist


def test_keda_namespace_setting_is_checked() -> None:
    with pytest.raises(SettingsError):
        OperatorSettings.from_env({"INFERSTACK_KEDA_NAMESPACE": "Not_A_Namespace"})


def test_redis_liveness_pings_as_the_health_user_and_its_start_hook_loads_the_functions() -> None:
    c = container(build({})["StatefulSet/demo-redis"])
    live = c["livenessProbe"]
    assert "tcpSocket" not in live  # a TCP check passes while Redis answers BUSY to everything
    script = live["exec"]["command"][2]
    assert "timeout 3 redis-cli --user health -p 6379 ping" in script and "PONG|LOADING*" in script
    assert live["timeoutSeconds"] > 3 and live["periodSeconds"] * live["failureThreshold"] <= 20
    hook = c["lifecycle"]["postStart"]["exec"]["command"][2]
    assert "--user health" in hook and "FUNCTION LOAD REPLACE < /etc/redis-acl/functions.lua" in hook
    assert f"grep -qx {FUNCTION_LIBRARY}" in hook
    # The health user may PING and load the library, nothing else.
    acl = base64.b64decode(build({})["Secret/demo-redis-auth"]["data"]["users.acl"]).decode()
    (health,) = [line for line in acl.splitlines() if line.startswith("user health ")]
    assert health.endswith("-@all +ping +function|load")
