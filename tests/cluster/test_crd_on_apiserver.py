"""The CRD as the API server itself takes it: structural, CEL compiled, defaults applied, columns printed."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from inferstack_operator import spec as operator_spec
from tests.kubeplane import CRD_NAME, ISVC_API, REPO, Kube, wait_for

EXAMPLES = sorted((REPO / "operator" / "examples").glob("*.yaml"))
pytestmark = pytest.mark.usefixtures("operator_release")


def isvc(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": ISVC_API, "kind": "InferenceService", "metadata": {"name": name}, "spec": spec}


def test_crd_is_established_structural_and_served(control_plane: Kube) -> None:
    crd = control_plane.get("CustomResourceDefinition", None, CRD_NAME)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    # NonStructuralSchema would be listed (True) if the schema were not structural.
    assert conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True"
    assert "NonStructuralSchema" not in conditions
    resources = control_plane.request("GET", f"/apis/{ISVC_API}")["resources"]
    main = next(r for r in resources if r["name"] == "inferenceservices")
    assert main["shortNames"] == ["infsvc"] and main["namespaced"] is True
    assert {"inferenceservices/status"} <= {r["name"] for r in resources}


def test_every_example_is_applied_by_kubectl(control_plane: Kube, namespace: str) -> None:
    out = control_plane.kubectl("apply", "-n", namespace, "--validate=strict",
                                *[arg for path in EXAMPLES for arg in ("-f", str(path))]).stdout
    for path in EXAMPLES:
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        assert f"inferenceservice.inferstack.dev/{name} created" in out


@pytest.mark.parametrize("spec, message", [
    ({"worker": {"batchSize": 0}}, "spec.worker.batchSize: Invalid value: 0: spec.worker.batchSize in body should be greater than or equal to 1"),
    ({"worker": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas must not exceed maxReplicas"),
    ({"web": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas must not exceed maxReplicas"),
    ({"service": {"type": "Ingress"}}, 'spec.service.type: Unsupported value: "Ingress"'),
    ({"model": {"precision": "fp64"}}, 'spec.model.precision: Unsupported value: "fp64"'),
    ({"worker": {"gpu": -1}}, "spec.worker.gpu: Invalid value: -1"),
    ({"worker": {"gpus": 1}}, 'unknown field "spec.worker.gpus"'),
])
def test_api_server_rejects_bad_specs_with_the_schemas_words(
        control_plane: Kube, namespace: str, spec: dict[str, Any], message: str) -> None:
    proc = control_plane.kubectl("apply", "-n", namespace, "--validate=strict", "-f", "-",
                                 input=json.dumps(isvc("bad", spec)), check=False)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr
    assert control_plane.isvc(namespace, "bad") is None


def test_defaults_are_applied_by_the_api_server_as_the_operator_assumes(control_plane: Kube, namespace: str) -> None:
    created = control_plane.create(isvc("defaults", {}), namespace)
    spec = created["spec"]
    assert spec["model"] == {"name": "ResNet50", "weights": "imagenet", "topK": 5, "autoInt8": False}
    assert spec["web"]["replicas"] == 2 and spec["worker"]["replicas"] == 1 and spec["worker"]["gpu"] == 1
    assert spec["worker"]["batchSize"] == 32 and spec["worker"]["maxBatchDelayMs"] == 5
    assert spec["redis"]["maxQueue"] == 1000 and "storage" not in spec["redis"]
    assert spec["service"] == {"type": "ClusterIP", "port": 80}
    # What the API server fills in is what the operator assumes when a field is absent.
    assert operator_spec.resolve("defaults", namespace, spec) == operator_spec.resolve("defaults", namespace, {})


def test_kubectl_get_shows_the_printer_columns(control_plane: Kube, namespace: str, operator: object) -> None:
    control_plane.create(isvc("columns", {"model": {"name": "MobileNetV3Small"}, "worker": {"gpu": 0}}), namespace)
    # The columns read the status the operator writes (kwok runs the pods, so it becomes Ready).
    lines = wait_for(lambda: (out := control_plane.kubectl("get", "infsvc", "-n", namespace).stdout.splitlines())
                     and out[1].split()[1] == "True" and out, timeout=90, what="kubectl get infsvc showing Ready")
    assert lines[0].split() == ["NAME", "READY", "WEB", "WORKERS", "MODEL", "URL", "AGE"]
    assert lines[1].split()[:5] == ["columns", "True", "2/2", "1/1", "MobileNetV3Small"], lines
    assert f"http://columns.{namespace}.svc.cluster.local:80/predict" in lines[1]
