"""Install every case of the chart once per session, for real (helm-sdkpy into the test control plane)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.kubeplane import Kube, helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "inferstack"
CHART_CRD = CHART / "crds" / "inferenceservices.inferstack.dev.yaml"
OPERATOR_CRD = REPO / "operator" / "inferstack_operator" / "crd.yaml"
# The session's operator release (tests/kubeplane.py) lives beside these, under another name.
NAMESPACE = "inferstack-system"
RELEASE = "inferstack"

# Every case is a real `helm install` into the test control plane, uninstalled after.
CASES: dict[str, dict] = {
    "default": {},
    "sample": {"sample": {"enabled": True, "name": "resnet",
                          "spec": {"web": {"replicas": 2}, "worker": {"replicas": 1, "gpu": 1, "batchSize": 16},
                                   "service": {"type": "ClusterIP", "port": 8000}}}},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "dashboard": {"grafanaDashboard": {"enabled": True}},
    "custom-images": {
        "image": {"repository": "registry.example.com/ml/operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "images": {
            "pullPolicy": "Always",
            "web": {"repository": "registry.example.com/ml/web", "tag": "1.2.3"},
            "worker": {"repository": "registry.example.com/ml/worker", "tag": "1.2.3"},
            "workerGpu": {"repository": "registry.example.com/ml/worker-gpu", "tag": "1.2.3-cuda"},
            "redis": {"repository": "registry.example.com/redis", "tag": "7.4.6"},
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "clusterDomain": "corp.example",
        "kedaNamespace": "autoscalers",
        "allowedImages": ["registry.example.com/ml/", "registry.example.com/redis:"],
        "serviceAccount": {"create": False, "name": "ml-operator"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    },
    "paused-no-rbac": {"replicaCount": 0, "rbac": {"create": False}},
}

# Values the schema must reject: (case name, values, a fragment of Helm's message).
BAD_VALUES: dict[str, tuple[dict, str]] = {
    "replicaCount-string": ({"replicaCount": "1"}, "/replicaCount"),
    "replicaCount-two": ({"replicaCount": 2}, "/replicaCount"),
    "pullPolicy-unknown": ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "images-pullPolicy-unknown": ({"images": {"pullPolicy": "always"}}, "/images/pullPolicy"),
    "unknown-key": ({"replicas": 1}, "replicas"),
    "namespace-not-dns": ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    "redis-without-tag": ({"images": {"redis": {"repository": "redis", "tag": ""}}}, "/images/redis"),
    "clusterDomain-not-dns": ({"clusterDomain": "Corp_Example"}, "/clusterDomain"),
    "sample-spec-not-object": ({"sample": {"enabled": True, "spec": "gpu: 1"}}, "/sample/spec"),
    "allowedImages-comma": ({"allowedImages": ["a/,b/"]}, "/allowedImages"),
    "kedaNamespace-upper": ({"kedaNamespace": "KEDA"}, "/kedaNamespace"),
}

# Values the templates refuse with `fail`: (case name, values, a fragment of the message).
TEMPLATE_FAILURES: dict[str, tuple[dict, str]] = {
    "sample-outside-watched": ({"sample": {"enabled": True}, "watchNamespaces": ["team-a"]},
                               "which watchNamespaces leaves out"),
}


def _install_and_check(kube: Kube, values: dict, tmp: Path) -> dict:
    """One real `helm install` into the control plane: its manifest and notes, which objects the
    API server then holds, and the uninstall (waited for, so the next case can reuse the names)."""
    for ns in values.get("watchNamespaces", []):  # Roles go into namespaces that exist
        if kube.get("Namespace", None, ns) is None:
            kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    steps = [{"action": "install", "release": RELEASE, "namespace": NAMESPACE, "chart": str(CHART), "values": values}]
    (out,) = helm({"steps": steps}, kube, tmp)["steps"]
    if out["error"] is None:
        out["found"] = [(o["kind"], o["metadata"]["name"]) for o in objects(out["manifest"])
                        if kube.get(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) is not None]
        (gone,) = helm({"steps": [{"action": "uninstall", "release": RELEASE, "namespace": NAMESPACE,
                                   "wait": True}]}, kube, tmp)["steps"]
        assert gone["error"] is None, gone["error"]
    return out


@pytest.fixture(scope="session")
def helm_report(control_plane: Kube, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Lint once, then every case as a real install into the test control plane (tests/kubeplane.py)."""
    tmp = tmp_path_factory.mktemp("helm")
    report = helm({"lint": [str(CHART)]}, control_plane, tmp)
    report["cases"] = {name: _install_and_check(control_plane, values, tmp) for name, values in CASES.items()}
    # Refused values never reach the API server: one driver run for all of them.
    refused = {f"bad:{n}": v for n, (v, _) in BAD_VALUES.items()} | \
        {f"fail:{n}": v for n, (v, _) in TEMPLATE_FAILURES.items()}
    steps = [{"action": "install", "release": RELEASE, "namespace": NAMESPACE, "chart": str(CHART), "values": v}
             for v in refused.values()]
    report["cases"].update(zip(refused, helm({"steps": steps}, control_plane, tmp)["steps"]))
    return report


def objects(manifest: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


@pytest.fixture(scope="session")
def rendered(helm_report: dict) -> dict[str, dict]:
    """Case name -> {"objects": [...], "notes": str, "found": [(kind, name)...]} for the good cases."""
    out = {}
    for name in CASES:
        case = helm_report["cases"][name]
        assert case["error"] is None, f"{name}: helm install failed: {case['error']}"
        out[name] = {"objects": objects(case["manifest"]), "notes": case["notes"], "found": case["found"]}
    return out


def find(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def only(objs: list[dict], kind: str) -> dict:
    matches = find(objs, kind)
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]
