"""The CRD: valid for Kubernetes, and its schema accepts the examples and rejects nonsense."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from inferstack_operator import spec as operator_spec
from tests.operator.kit import CLUSTER_SETTINGS, EXAMPLES, SCHEMA, admit, load_crd, version


def test_crd_is_valid_kubernetes() -> None:
    kubernetes_validate.validate(load_crd(), "1.31", strict=True)


def test_names_versions_and_columns() -> None:
    crd = load_crd()
    assert crd["metadata"]["name"] == "inferenceservices.inferstack.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == \
        ("InferenceService", "inferenceservices", "inferenceservice")
    assert names["shortNames"] == ["infsvc"]
    assert crd["spec"]["scope"] == "Namespaced"
    v = version()
    assert (v["name"], v["served"], v["storage"]) == ("v1alpha1", True, True)
    assert v["subresources"] == {"status": {}}
    columns = [c["name"].upper() for c in v["additionalPrinterColumns"]]
    assert columns == ["READY", "WEB", "WORKERS", "MODEL", "URL", "AGE"]


def test_schema_is_structural() -> None:
    # Every node has a type (or is int-or-string / preserve-unknown); no additionalProperties
    # next to properties. The API server refuses non-structural schemas.
    def walk(node: dict[str, Any], path: str) -> None:
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        for key, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")
        if "items" in node:
            walk(node["items"], f"{path}[]")
    walk(SCHEMA, "")


@pytest.mark.parametrize("filename", ["resnet50-gpu.yaml", "cpu-small.yaml", "custom-model.yaml",
                                      "resnet50-autoscaled.yaml"])
def test_examples_are_admitted(filename: str) -> None:
    body = yaml.safe_load((EXAMPLES / filename).read_text())
    assert body["apiVersion"] == "inferstack.dev/v1alpha1" and body["kind"] == "InferenceService"
    admitted = admit(body)
    operator_spec.resolve(body["metadata"]["name"], "ml", admitted["spec"])  # and the operator accepts them


def test_schema_defaults_match_the_operator_defaults() -> None:
    admitted = admit({"apiVersion": "inferstack.dev/v1alpha1", "kind": "InferenceService",
                      "metadata": {"name": "x"}})
    spec = admitted["spec"]
    assert spec["model"] == {"name": "ResNet50", "weights": "imagenet", "topK": 5, "autoInt8": False}
    assert spec["web"]["replicas"] == 2 and spec["worker"]["replicas"] == 1 and spec["worker"]["gpu"] == 1
    assert spec["service"] == {"type": "ClusterIP", "port": 80}
    assert "storage" not in spec["redis"]
    # What the API server fills in is what the operator assumes when it is absent.
    assert operator_spec.resolve("x", "ml", spec) == operator_spec.resolve("x", "ml", {})


@pytest.mark.parametrize("spec, field", [
    ({"worker": {"batchSize": 0}}, "batchSize"),
    ({"worker": {"batchSize": 1025}}, "batchSize"),
    ({"worker": {"replicas": -1}}, "replicas"),
    ({"web": {"replicas": -1}}, "replicas"),
    ({"worker": {"gpu": -1}}, "gpu"),
    ({"service": {"type": "Ingress"}}, "type"),
    ({"service": {"port": 0}}, "port"),
    ({"model": {"topK": 0}}, "topK"),
    ({"model": {"name": "resnet 50"}}, "name"),
    ({"redis": {"storage": "lots"}}, "storage"),
    ({"redis": {"maxQueue": 0}}, "maxQueue"),
    ({"worker": {"tolerations": [{"operator": "Maybe"}]}}, "operator"),
    ({"worker": {"resources": {"limits": {"cpu": "two"}}}}, "cpu"),
    ({"worker": {"nodeSelector": {"pool": 1}}}, "pool"),
    ({"web": {"requestTimeoutSeconds": "30"}}, "requestTimeoutSeconds"),
    ({"model": {"runtime": "onnx"}}, "runtime"),
    ({"model": {"precision": "fp64"}}, "precision"),
    ({"model": {"autoInt8": "yes"}}, "autoInt8"),
    ({"imagePullSecrets": [{"secret": "regcred"}]}, "name"),
    ({"imagePullSecrets": ["regcred"]}, "imagePullSecrets"),
    ({"web": {"env": [{"value": "1"}]}}, "name"),
    ({"worker": {"podLabels": {"team": 1}}}, "team"),
    ({"redis": {"podAnnotations": {"a": True}}}, "a"),
    ({"worker": {"priorityClassName": ""}}, "priorityClassName"),
    ({"worker": {"runtimeClassName": 3}}, "runtimeClassName"),
    ({"web": {"affinity": "anywhere"}}, "affinity"),
])
def test_nonsense_is_rejected(spec: dict[str, Any], field: str) -> None:
    body = {"apiVersion": "inferstack.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "x"}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError) as info:
        admit(body)
    assert field in "/".join(str(p) for p in info.value.absolute_path) + info.value.message


def test_quantities_accept_numbers_and_strings() -> None:
    admit({"apiVersion": "inferstack.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "x"},
           "spec": {"worker": {"resources": {"limits": {"cpu": 2, "memory": "4Gi"}, "requests": {"cpu": "500m"}}}}})


def test_cluster_settings_are_admitted_and_resolved() -> None:
    admitted = admit({"apiVersion": "inferstack.dev/v1alpha1", "kind": "InferenceService",
                      "metadata": {"name": "x"}, "spec": CLUSTER_SETTINGS})
    r = operator_spec.resolve("x", "ml", admitted["spec"])
    assert r.image_pull_secrets == ("regcred", "mirror")
    assert r.worker.runtime_class_name == "nvidia" and r.runtime == "openvino" and r.precision == "int8"
