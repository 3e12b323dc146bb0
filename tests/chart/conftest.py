"""Render the chart once per session through helm-sdkpy (see helm_driver.py) and share the results."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "inferstack"
CHART_CRD = CHART / "crds" / "inferenceservices.inferstack.dev.yaml"
OPERATOR_CRD = REPO / "operator" / "inferstack_operator" / "crd.yaml"
DRIVER = Path(__file__).resolve().parents[2] / "tools" / "helm_driver.py"
# make's `.venv-helm/.stamp` target builds it; INFERSTACK_HELM_PYTHON points elsewhere.
HELM_PYTHON = Path(os.environ.get("INFERSTACK_HELM_PYTHON", REPO / ".venv-helm" / "bin" / "python"))
NAMESPACE = "inferstack-system"

# Every case is rendered by a real `helm install` (into a fake API server) in one subprocess.
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


def helm_python() -> Path:
    if not HELM_PYTHON.exists():
        # Fail, never skip: a missing venv would silently drop the chart checks in CI.
        pytest.fail(
            f"{HELM_PYTHON} not found: the chart tests drive Helm through helm-sdkpy in a Python 3.12 venv. "
            "Create it with `make .venv-helm/.stamp` (or set INFERSTACK_HELM_PYTHON).",
            pytrace=False,
        )
    return HELM_PYTHON


def run_driver(job: dict, tmp: Path) -> dict:
    env = {
        **os.environ,
        "HELM_DRIVER": "memory",  # keep releases in memory: nothing to store, no Secrets
        "HELM_CACHE_HOME": str(tmp / "cache"),
        "HELM_CONFIG_HOME": str(tmp / "config"),
        "HELM_DATA_HOME": str(tmp / "data"),
    }
    env.pop("KUBECONFIG", None)
    proc = subprocess.run(
        [str(helm_python()), str(DRIVER)], input=json.dumps(job), capture_output=True, text=True,
        env=env, timeout=120, cwd=tmp,
    )
    assert proc.returncode == 0, f"helm driver failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def objects(manifest: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


@pytest.fixture(scope="session")
def helm_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    names = list(CASES) + [f"bad:{n}" for n in BAD_VALUES] + [f"fail:{n}" for n in TEMPLATE_FAILURES]
    values = (list(CASES.values()) + [v for v, _ in BAD_VALUES.values()]
              + [v for v, _ in TEMPLATE_FAILURES.values()])
    tmp = tmp_path_factory.mktemp("helm")
    report = run_driver({
        "lint": [str(CHART)],
        "render": [{"release": "inferstack", "namespace": NAMESPACE, "chart": str(CHART), "values": v}
                   for v in values],
    }, tmp)
    report["cases"] = dict(zip(names, report["render"]))
    return report


@pytest.fixture(scope="session")
def rendered(helm_report: dict) -> dict[str, dict]:
    """Case name -> {"objects": [...], "notes": str, "posted": [...]} for the good cases."""
    out = {}
    for name in CASES:
        case = helm_report["cases"][name]
        assert case["error"] is None, f"{name}: helm install failed: {case['error']}"
        out[name] = {"objects": objects(case["manifest"]), "notes": case["notes"], "posted": case["posted"]}
    return out


def find(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def only(objs: list[dict], kind: str) -> dict:
    matches = find(objs, kind)
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]
