"""The pure builders: spec in, manifests out, each valid against the Kubernetes 1.31 schemas."""

from __future__ import annotations

import base64
from typing import Any

import kubernetes_validate
import pytest
import yaml

from inferstack_operator import builders, drift, spec
from tests.operator.kit import (AFFINITY, AUTH, CLUSTER_SETTINGS, EXAMPLES, K8S_VERSION, SETTINGS, build, container,
                                env, manifests, resolved)
from inferstack_operator.config import OperatorSettings, SettingsError

SPECS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu-persistent": {"worker": {"gpu": 2, "replicas": 3, "nodeSelector": {"pool": "gpu"},
                                  "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml",
                                                   "effect": "NoExecute", "tolerationSeconds": 30}]},
                       "redis": {"storage": "2Gi", "storageClassName": "fast"}},
    "cpu-nodeport": {"model": {"name": "MobileNetV3Small"}, "worker": {"gpu": 0, "batchSize": 8},
                     "service": {"type": "NodePort", "port": 8080}},
    "loadbalancer": {"service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
                     "web": {"replicas": 0, "image": "registry.local/web:dev",
                             "resources": {"requests": {"cpu": 0.5}, "limits": {"memory": "2Gi"}}}},
    "custom-model": {"model": {"uri": "pvc://models/flowers/model.keras", "labels": "pvc://labels/flowers.txt",
                               "weights": "none", "topK": 3}, "worker": {"gpu": 0}},
    "cluster-settings": CLUSTER_SETTINGS,
    "image-paths": {"model": {"uri": "/opt/models/m.keras", "labels": "/opt/models/labels.txt"},
                    "redis": {"resources": {"limits": {"memory": "1Gi"}}}},
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_manifest_is_valid_kubernetes(case: str) -> None:
    for manifest in manifests(SPECS[case]):
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


@pytest.mark.parametrize("filename", ["resnet50-gpu.yaml", "cpu-small.yaml", "custom-model.yaml"])
def test_examples_build_valid_children(filename: str) -> None:
    body = yaml.safe_load((EXAMPLES / filename).read_text())
    children = manifests(body["spec"], body["metadata"]["name"])
    assert len(children) == 8
    for manifest in children:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_defaults() -> None:
    objs = build({})
    assert sorted(objs) == ["ConfigMap/demo-config", "Deployment/demo-web", "Deployment/demo-worker",
                            "NetworkPolicy/demo-redis", "Secret/demo-redis-auth",
                            "Service/demo", "Service/demo-redis", "StatefulSet/demo-redis"]
    for key, obj in objs.items():
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "inferstack"
        assert labels["app.kubernetes.io/instance"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "inferstack-operator"
        assert obj["metadata"]["namespace"] == "ml"
    assert objs["ConfigMap/demo-config"]["data"] == {
        "INFERSTACK_MAX_QUEUE": "1000",
        "INFERSTACK_TOP_K": "5",
        "INFERSTACK_MODEL_NAME": "resnet50",
    }
    web = objs["Deployment/demo-web"]
    assert web["spec"]["replicas"] == 2
    assert web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    c = container(web)
    assert c["image"] == "ghcr.io/inferstack/web:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["ports"][0]["containerPort"] == 8080
    # /metrics on its own port, which the front Service (targetPort http) never exposes.
    assert c["ports"][1] == {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}
    assert c["envFrom"] == [{"configMapRef": {"name": "demo-config"}}]
    assert env(web) | {} == {"INFERSTACK_REDIS_URL": {"secretKeyRef": {"name": "demo-redis-auth", "key": "web-url"}},
                             "INFERSTACK_PORT": "8080", "INFERSTACK_METRICS_PORT": "9090",
                             "INFERSTACK_REQUEST_TIMEOUT_S": "30",
                             "INFERSTACK_MAX_IMAGE_BYTES": "10485760", "HOME": "/tmp"}

    worker = objs["Deployment/demo-worker"]
    assert worker["spec"]["replicas"] == 1
    e = env(worker)
    assert e["INFERSTACK_MODEL"] == "ResNet50" and e["INFERSTACK_WEIGHTS"] == "imagenet"
    assert "INFERSTACK_LABELS" not in e
    assert e["INFERSTACK_BATCH_SIZE"] == "32" and e["INFERSTACK_MAX_BATCH_DELAY_MS"] == "5"
    assert e["INFERSTACK_WORKER_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["INFERSTACK_READY_FILE"] == "/tmp/inferstack-ready" and "KERAS_HOME" not in e
    c = container(worker)
    assert c["readinessProbe"]["exec"]["command"] == ["test", "-f", "/tmp/inferstack-ready"]
    assert "stat -c %Y /tmp/inferstack-ready" in c["livenessProbe"]["exec"]["command"][2]
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model load on a cold node
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60

    front = objs["Service/demo"]
    assert front["spec"]["type"] == "ClusterIP"
    assert front["spec"]["selector"] == {"app.kubernetes.io/name": "inferstack",
                                         "app.kubernetes.io/instance": "demo",
                                         "app.kubernetes.io/component": "web"}
    assert front["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert objs["Service/demo-redis"]["spec"]["clusterIP"] == "None"


def test_selectors_match_their_pod_templates_only() -> None:
    objs = build({})
    for key in ("Deployment/demo-web", "Deployment/demo-worker", "StatefulSet/demo-redis"):
        selector = objs[key]["spec"]["selector"]["matchLabels"]
        template_labels = objs[key]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= template_labels.items()
    web_pods = objs["Deployment/demo-web"]["spec"]["template"]["metadata"]["labels"]
    worker_pods = objs["Deployment/demo-worker"]["spec"]["template"]["metadata"]["labels"]
    front = objs["Service/demo"]["spec"]["selector"]
    assert front.items() <= web_pods.items()
    assert not front.items() <= worker_pods.items()


def test_pod_security_everywhere() -> None:
    for key, obj in build(SPECS["gpu-persistent"]).items():
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
    redis_pod = build({})["StatefulSet/demo-redis"]["spec"]["template"]["spec"]
    assert redis_pod["securityContext"]["runAsUser"] == 999
    web_pod = build({})["Deployment/demo-web"]["spec"]["template"]["spec"]
    tmp = next(v for v in web_pod["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"]["sizeLimit"] == "515Mi"  # web_tmp_bytes of the defaults: 2 x (16 + 2) bodies of 13.4 MiB + 2 x 16 MiB
    assert {"name": "tmp", "mountPath": "/tmp"} in web_pod["containers"][0]["volumeMounts"]


def test_gpu_worker() -> None:
    worker = build(SPECS["gpu-persistent"])["Deployment/demo-worker"]
    pod = worker["spec"]["template"]["spec"]
    c = container(worker)
    assert c["image"] == "ghcr.io/inferstack/worker-gpu:0.1.0"
    # One worker container per GPU, each with its own device, Redis consumer name and ready file.
    workers = pod["containers"]
    assert [w["name"] for w in workers] == ["worker", "worker-gpu1"]
    assert all(w["resources"]["limits"]["nvidia.com/gpu"] == 1 for w in workers)
    second = {e["name"]: e for e in workers[1]["env"]}
    assert second["INFERSTACK_WORKER_NAME"]["value"] == "$(POD_NAME)-gpu1"
    assert second["INFERSTACK_READY_FILE"]["value"] == "/tmp/inferstack-ready-1"
    assert workers[1]["readinessProbe"]["exec"]["command"] == ["test", "-f", "/tmp/inferstack-ready-1"]
    assert pod["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pod["tolerations"][1]["key"] == "dedicated"
    assert pod["nodeSelector"] == {"pool": "gpu"}
    # No surge: a rollout must not need a spare GPU.
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}


def test_cpu_worker() -> None:
    worker = build(SPECS["cpu-nodeport"])["Deployment/demo-worker"]
    c = container(worker)
    assert c["image"] == "ghcr.io/inferstack/worker:0.1.0"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "tolerations" not in worker["spec"]["template"]["spec"]
    assert env(worker)["INFERSTACK_MODEL"] == "MobileNetV3Small"
    assert env(worker)["INFERSTACK_BATCH_SIZE"] == "8"
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_redis_without_persistence() -> None:
    sts = build({})["StatefulSet/demo-redis"]
    args = container(sts)["args"]
    assert args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--save") + 1] == ""
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = int(args[args.index("--maxmemory") + 1])
    assert maxmemory == 1000 * 512 * 1024 + 64 * 1024 * 1024
    assert spec.quantity(container(sts)["resources"]["limits"]["memory"]) >= maxmemory
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]
    assert sts["spec"]["serviceName"] == "demo-redis"
    probe = container(sts)["readinessProbe"]["exec"]["command"]
    assert "redis-cli" in probe[-1] and "ping" in probe[-1]


def test_redis_with_persistence() -> None:
    sts = build(SPECS["gpu-persistent"])["StatefulSet/demo-redis"]
    args = container(sts)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert [v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]] == ["acl"]  # data: the claim


def test_redis_memory_from_limit() -> None:
    r = spec.resolve("demo", "ml", SPECS["image-paths"])
    assert builders.redis_memory(r) == (int(2**30 * 0.8), 2**30)
    sts = build(SPECS["image-paths"])["StatefulSet/demo-redis"]
    assert container(sts)["resources"]["limits"]["memory"] == "1Gi"


@pytest.mark.parametrize("service_type, port", [("ClusterIP", 80), ("NodePort", 8080), ("LoadBalancer", 80)])
def test_service_types(service_type: str, port: int) -> None:
    svc = build({"service": {"type": service_type, "port": port}})["Service/demo"]
    assert svc["spec"]["type"] == service_type
    assert svc["spec"]["ports"][0]["port"] == port


def test_service_annotations_and_web_overrides() -> None:
    objs = build(SPECS["loadbalancer"])
    assert objs["Service/demo"]["metadata"]["annotations"] == {"example.com/lb": "internal"}
    web = objs["Deployment/demo-web"]
    assert web["spec"]["replicas"] == 0
    c = container(web)
    assert c["image"] == "registry.local/web:dev"
    assert c["resources"] == {"requests": {"cpu": 0.5, "memory": "256Mi"}, "limits": {"memory": "2Gi"}}


def test_custom_model_on_claims() -> None:
    worker = build(SPECS["custom-model"])["Deployment/demo-worker"]
    e = env(worker)
    assert e["INFERSTACK_MODEL"] == "/mnt/models/models/flowers/model.keras"
    assert e["INFERSTACK_LABELS"] == "/mnt/models/labels/flowers.txt"
    assert e["INFERSTACK_WEIGHTS"] == "none"
    mounts = {m["mountPath"]: m for m in container(worker)["volumeMounts"]}
    assert mounts["/mnt/models/models"]["readOnly"] is True
    assert mounts["/mnt/models/labels"]["readOnly"] is True
    claims = [v["persistentVolumeClaim"] for v in worker["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "models", "readOnly": True}, {"claimName": "labels", "readOnly": True}]
    r = spec.resolve("demo", "ml", SPECS["custom-model"])
    assert r.model_display == "flowers/model.keras"
    assert r.served_name == "model"


def test_custom_model_in_image() -> None:
    worker = build(SPECS["image-paths"])["Deployment/demo-worker"]
    assert env(worker)["INFERSTACK_MODEL"] == "/opt/models/m.keras"
    assert env(worker)["INFERSTACK_LABELS"] == "/opt/models/labels.txt"
    assert not any("persistentVolumeClaim" in v for v in worker["spec"]["template"]["spec"]["volumes"])


def test_image_settings_from_env_and_spec_override() -> None:
    settings = OperatorSettings.from_env({
        "INFERSTACK_WEB_IMAGE": "r.local/web:1", "INFERSTACK_WORKER_IMAGE": "r.local/worker:1",
        "INFERSTACK_WORKER_GPU_IMAGE": "r.local/worker-gpu:1", "INFERSTACK_REDIS_IMAGE": "r.local/redis:7",
        "INFERSTACK_IMAGE_PULL_POLICY": "Always", "INFERSTACK_OPERATOR_RESYNC_SECONDS": "15",
    })
    assert settings.resync_seconds == 15
    objs = build({}, settings=settings)
    assert container(objs["Deployment/demo-web"])["image"] == "r.local/web:1"
    assert container(objs["Deployment/demo-worker"])["image"] == "r.local/worker-gpu:1"
    assert container(objs["StatefulSet/demo-redis"])["image"] == "r.local/redis:7"
    assert container(objs["StatefulSet/demo-redis"])["imagePullPolicy"] == "Always"
    assert container(build({"worker": {"gpu": 0}}, settings=settings)["Deployment/demo-worker"])["image"] \
        == "r.local/worker:1"
    assert container(build({"worker": {"image": "mine:2"}}, settings=settings)["Deployment/demo-worker"])["image"] \
        == "mine:2"


@pytest.mark.parametrize("env", [{"INFERSTACK_IMAGE_PULL_POLICY": "Sometimes"},
                                 {"INFERSTACK_OPERATOR_RESYNC_SECONDS": "soon"},
                                 {"INFERSTACK_OPERATOR_RESYNC_SECONDS": "0"}])
def test_bad_settings(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        OperatorSettings.from_env(env)


def test_config_change_rolls_both_tiers_but_worker_change_only_the_worker() -> None:
    base = build({})
    queue = build({"redis": {"maxQueue": 50}})
    batch = build({"worker": {"batchSize": 64}})

    def template(objs: dict[str, Any], key: str) -> Any:
        return objs[key]["spec"]["template"]

    assert template(queue, "Deployment/demo-web") != template(base, "Deployment/demo-web")
    assert template(queue, "Deployment/demo-worker") != template(base, "Deployment/demo-worker")
    assert template(batch, "Deployment/demo-web") == template(base, "Deployment/demo-web")
    assert template(batch, "Deployment/demo-worker") != template(base, "Deployment/demo-worker")


@pytest.mark.parametrize("name, body, message", [
    ("demo", {"model": {"uri": "pvc://models/m.keras"}}, "spec.model.labels is required"),
    ("demo", {"model": {"uri": "s3://b/m.keras", "labels": "/l.txt"}}, "the s3:// scheme is not supported"),
    ("demo", {"model": {"uri": "models/m.keras", "labels": "/l.txt"}}, "a relative path is not supported"),
    ("demo", {"model": {"uri": "pvc://models", "labels": "/l.txt"}}, "must name a file on the claim"),
    ("demo", {"model": {"uri": "pvc://Models/m", "labels": "/l.txt"}}, "not a valid PersistentVolumeClaim name"),
    ("demo", {"model": {"uri": "/a/../etc/m", "labels": "/l.txt"}}, "must not contain '..'"),
    ("demo", {"model": {"labels": "http://x/labels.txt"}}, "spec.model.labels"),
    ("demo", {"model": {"weights": "gs://w.h5"}}, "spec.model.weights"),
    ("demo", {"worker": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}, "set spec.worker.gpu instead"),
    ("demo", {"worker": {"batchSize": 0}}, "spec.worker.batchSize must be between 1 and 1024"),
    ("demo", {"worker": {"replicas": "3"}}, "spec.worker.replicas must be an integer"),
    ("demo", {"web": {"resources": {"requests": {"cpu": "lots"}}}}, "is not a quantity"),
    ("demo", {"service": {"type": "Ingress"}}, "spec.service.type must be"),
    ("demo", {"redis": {"storage": "big"}}, "spec.redis.storage"),
    ("demo", {"model": {"runtime": "onnx"}}, "spec.model.runtime must be one of auto, keras, openvino"),
    ("demo", {"imagePullSecrets": [{"name": "Bad_Name"}]}, "spec.imagePullSecrets[0].name"),
    ("demo", {"web": {"env": [{"value": "x"}]}}, "spec.web.env[0] needs a name"),
    ("demo", {"worker": {"affinity": "gpu"}}, "spec.worker.affinity must be"),
    ("a" * 41, {}, "at most 40 characters"),
    ("9lives", {}, "starting with a letter"),
])
def test_spec_errors_say_what_to_fix(name: str, body: dict[str, Any], message: str) -> None:
    with pytest.raises(spec.SpecError, match=None) as info:
        manifests(body, name)
    assert message in str(info.value)


def test_quantities() -> None:
    assert spec.quantity("512Mi") == 512 * 2**20
    assert spec.quantity("1.5") == spec.quantity("1500m")
    assert spec.quantity("2k") == 2000
    assert spec.quantity("1e3") == 1000
    assert spec.quantity(2) == 2
    for bad in ("2 GB", True):
        with pytest.raises(ValueError):
            spec.quantity(bad)


def test_drift_ignores_server_defaults_and_canonical_quantities() -> None:
    want = build(SPECS["loadbalancer"])["Deployment/demo-web"]
    have = yaml.safe_load(yaml.safe_dump(want))
    have["metadata"]["uid"] = "x"
    have["status"] = {"readyReplicas": 1}
    have["spec"]["progressDeadlineSeconds"] = 600
    c = have["spec"]["template"]["spec"]["containers"][0]
    c["terminationMessagePath"] = "/dev/termination-log"
    c["resources"]["requests"]["cpu"] = "500m"  # the API server's form of 0.5
    c["ports"][0]["hostPort"] = None
    assert drift.drifted_paths(want, have) == []

    c["env"] = c["env"][:-1]
    have["spec"]["replicas"] = 5
    assert drift.drifted_paths(want, have) == [".spec.replicas", ".spec.template.spec.containers[0].env"]


def test_immutable_drift_for_redis_storage() -> None:
    without = build({})["StatefulSet/demo-redis"]
    with_storage = build({"redis": {"storage": "1Gi"}})["StatefulSet/demo-redis"]
    assert drift.immutable_drift(with_storage, without) == ["spec.volumeClaimTemplates"]
    assert drift.immutable_drift(without, without) == []
    bigger = build({"redis": {"storage": "5Gi"}})["StatefulSet/demo-redis"]
    assert drift.immutable_drift(bigger, with_storage) == ["spec.volumeClaimTemplates"]


def test_cluster_settings_reach_every_tier() -> None:
    objs = build(CLUSTER_SETTINGS)
    for key, component in (("Deployment/demo-web", "web"), ("Deployment/demo-worker", "worker"),
                           ("StatefulSet/demo-redis", "redis")):
        template = objs[key]["spec"]["template"]
        pod = template["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}], key
        assert pod["affinity"] == AFFINITY and pod["priorityClassName"] == f"{component}-priority", key
        assert template["metadata"]["annotations"]["example.com/tier"] == component
        assert template["metadata"]["labels"]["team"] == component
        for c in pod["containers"]:
            names = [e["name"] for e in c["env"]]
            # Appended after ours, in order.
            assert names[-2:] == [f"{component.upper()}_EXTRA", "FROM_SECRET"], key
    worker_pod = objs["Deployment/demo-worker"]["spec"]["template"]["spec"]
    assert worker_pod["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in objs["Deployment/demo-web"]["spec"]["template"]["spec"]
    e = env(objs["Deployment/demo-worker"])
    assert e["INFERSTACK_RUNTIME"] == "openvino" and e["INFERSTACK_PRECISION"] == "int8"
    assert "INFERSTACK_RUNTIME" not in env(objs["Deployment/demo-web"])
    assert objs["ConfigMap/demo-config"]["data"]["INFERSTACK_MODEL_NAME"] == "efficientnetb0"
    defaults = build({})
    assert "INFERSTACK_RUNTIME" not in env(defaults["Deployment/demo-worker"])
    assert "imagePullSecrets" not in defaults["Deployment/demo-web"]["spec"]["template"]["spec"]


def test_our_env_and_labels_win_and_say_so() -> None:
    body = {"web": {"env": [{"name": "INFERSTACK_PORT", "value": "9999"},
                            {"name": "INFERSTACK_REDIS_URL", "value": "redis://elsewhere:6379/0"},
                            {"name": "MINE", "value": "x"}],
                    "podLabels": {"app.kubernetes.io/instance": "other", "team": "a"}},
            "worker": {"env": [{"name": "INFERSTACK_BATCH_SIZE", "value": "1"}]}}
    objs = build(body)
    web = env(objs["Deployment/demo-web"])
    assert web["INFERSTACK_PORT"] == "8080" and web["MINE"] == "x"
    assert web["INFERSTACK_REDIS_URL"] == {"secretKeyRef": {"name": "demo-redis-auth", "key": "web-url"}}
    assert env(objs["Deployment/demo-worker"])["INFERSTACK_BATCH_SIZE"] == "32"
    labels = objs["Deployment/demo-web"]["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == "demo" and labels["team"] == "a"
    notes = builders.ignored_settings(spec.resolve("demo", "ml", body), SETTINGS)
    assert notes == [
        "spec.web.env INFERSTACK_PORT, INFERSTACK_REDIS_URL ignored: the operator sets it",
        "spec.web.podLabels app.kubernetes.io/instance ignored: the operator sets it",
        "spec.worker.env INFERSTACK_BATCH_SIZE ignored: the operator sets it",
    ]
    assert builders.ignored_settings(spec.resolve("demo", "ml", CLUSTER_SETTINGS), SETTINGS) == []


def test_cluster_domain_setting() -> None:
    settings = OperatorSettings.from_env({"INFERSTACK_CLUSTER_DOMAIN": "corp.example."})
    assert settings.cluster_domain == "corp.example"
    objs = build({}, settings=settings)
    assert base64.b64decode(objs["Secret/demo-redis-auth"]["data"]["web-url"]).decode() == \
        f"redis://web:{AUTH.web}@demo-redis.ml.svc.corp.example:6379/0"
    assert spec.resolve("demo", "ml", {}, settings.cluster_domain).url == "http://demo.ml.svc.corp.example:80/predict"
    with pytest.raises(SettingsError):
        OperatorSettings.from_env({"INFERSTACK_CLUSTER_DOMAIN": "not a domain"})


def test_registry_builds_optional_children_only_when_their_api_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    def widget(r: spec.Resolved, settings: OperatorSettings) -> dict[str, Any] | None:
        return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": r.name}} \
            if r.worker_replicas > 1 else None

    monkeypatch.setattr(builders, "CHILDREN", [*builders.CHILDREN,
                                               builders.Child("Widget", widget, requires="example.com/v1")])
    assert builders.required_apis() == {"example.com/v1", "keda.sh/v1alpha1", "monitoring.coreos.com/v1"}
    r = resolved({"worker": {"replicas": 2}})
    kinds = [m["kind"] for _, m in builders.build_children(r, SETTINGS)]
    assert "Widget" not in kinds and len(kinds) == 8
    kinds = [m["kind"] for _, m in builders.build_children(r, SETTINGS, served={"example.com/v1"})]
    assert kinds[-1] == "Widget"
    # A builder returning None: this spec does not want the child.
    one = resolved({"worker": {"replicas": 1}})
    assert "Widget" not in [m["kind"] for _, m in builders.build_children(one, SETTINGS, {"example.com/v1"})]


def test_web_memory_limit_follows_the_decode_bound() -> None:
    from inferstack.config import Settings, web_memory_limit_bytes
    from kubernetes.utils import parse_quantity

    small = container(build({})["Deployment/demo-web"])["resources"]["limits"]["memory"]
    large = container(build({"web": {"maxImageBytes": 50 * 1024 * 1024}})["Deployment/demo-web"])
    large_limit = large["resources"]["limits"]["memory"]
    # What bounded decoding guarantees (tests/dataplane/test_hostile_clients.py measures it), rounded up to MiB.
    assert parse_quantity(small) >= web_memory_limit_bytes(Settings())
    assert parse_quantity(small) - web_memory_limit_bytes(Settings()) < 2**20
    assert parse_quantity(large_limit) >= web_memory_limit_bytes(Settings(max_image_bytes=50 * 1024 * 1024))
    assert parse_quantity(large_limit) > parse_quantity(small)
    # A user's own limit still wins.
    custom = build({"web": {"resources": {"limits": {"memory": "3Gi"}}}})["Deployment/demo-web"]
    assert container(custom)["resources"]["limits"]["memory"] == "3Gi"


def web_sizes(web: dict[str, Any]) -> tuple[int, int]:
    """The web pod's memory limit and /tmp size, in bytes, for a spec.web."""
    from kubernetes.utils import parse_quantity

    deployment = build({"web": web})["Deployment/demo-web"]
    tmp = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp")
    return (int(parse_quantity(container(deployment)["resources"]["limits"]["memory"])),
            int(parse_quantity(tmp["emptyDir"]["sizeLimit"])))


def test_web_memory_and_tmp_follow_the_effective_settings() -> None:
    from inferstack.config import Settings, web_memory_limit_bytes
    from inferstack.contract.settings import web_tmp_bytes

    base_memory, base_tmp = web_sizes({})
    assert base_tmp >= web_tmp_bytes(Settings())
    # spec.web.maxImageBytes: every upload spooled to /tmp may be this large.
    big = 100 * 1024 * 1024
    memory, tmp = web_sizes({"maxImageBytes": big})
    assert tmp >= web_tmp_bytes(Settings(max_image_bytes=big)) > base_tmp
    assert memory >= web_memory_limit_bytes(Settings(max_image_bytes=big))
    # Settings the web tier reads from spec.web.env count too: more processes, more decode slots.
    overrides = {"INFERSTACK_WEB_PROCESSES": "6", "INFERSTACK_DECODE_CONCURRENCY": "4",
                 "INFERSTACK_MAX_DECODE_BYTES": str(256 * 1024 * 1024)}
    memory, tmp = web_sizes({"maxImageBytes": big, "env": [{"name": k, "value": v} for k, v in overrides.items()]})
    effective = Settings(max_image_bytes=big, web_processes=6, decode_concurrency=4, max_decode_bytes=256 * 1024 * 1024)
    assert 0 <= memory - web_memory_limit_bytes(effective) < 2**20
    assert 0 <= tmp - web_tmp_bytes(effective) < 2**20
    # The operator's own value wins over the user's (it is ignored, with a note), so the sizes do too.
    same = web_sizes({"env": [{"name": "INFERSTACK_MAX_IMAGE_BYTES", "value": str(big)}]})
    assert same == (base_memory, base_tmp)


@pytest.mark.parametrize("entry, message", [
    ({"name": "INFERSTACK_WEB_PROCESSES", "value": "many"}, "INFERSTACK_WEB_PROCESSES must be an integer"),
    ({"name": "INFERSTACK_DECODE_CONCURRENCY", "value": "0"}, "INFERSTACK_DECODE_CONCURRENCY must be between"),
    ({"name": "INFERSTACK_DECODE_CONCURRENCY", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
     "INFERSTACK_DECODE_CONCURRENCY uses valueFrom; give it a literal value"),
])
def test_web_settings_env_the_operator_cannot_size_is_invalid(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(spec.SpecError, match=message) as info:
        spec.resolve("demo", "ml", {"web": {"env": [entry]}})
    assert info.value.reason == "InvalidSpec" and info.value.message.startswith("spec.web.env")
