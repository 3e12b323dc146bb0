"""What the operator's unit tests share: resolving and building specs, and admitting them as the CRD would."""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from typing import Any

import jsonschema
import yaml

from inferstack_operator import builders, spec
from inferstack_operator.config import OperatorSettings
from inferstack_operator.credentials import RedisAuth

REPO = pathlib.Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "operator" / "inferstack_operator" / "crd.yaml"
EXAMPLES = REPO / "operator" / "examples"

K8S_VERSION = "1.31"
SETTINGS = OperatorSettings()
AUTH = RedisAuth.generate()

AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["g5.xlarge"]}]}]}}}


def tier(prefix: str) -> dict[str, Any]:
    """Every per-tier cluster setting, with values that name their tier."""
    return {
        "env": [{"name": f"{prefix.upper()}_EXTRA", "value": "1"},
                {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": prefix}}}],
        "podAnnotations": {"example.com/tier": prefix},
        "podLabels": {"team": prefix},
        "affinity": AFFINITY,
        "priorityClassName": f"{prefix}-priority",
    }


CLUSTER_SETTINGS: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}],
    "model": {"name": "EfficientNetB0", "runtime": "openvino", "precision": "int8"},
    "web": tier("web"),
    "worker": {**tier("worker"), "gpu": 2, "runtimeClassName": "nvidia"},
    "redis": tier("redis"),
}

def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{m['kind']}/{m['metadata']['name']}": m for m in manifests}


def resolved(body: dict[str, Any] | None, name: str = "demo", domain: str = "cluster.local") -> spec.Resolved:
    """What the reconciler hands the builders: the spec resolved, with the Redis passwords."""
    return dataclasses.replace(spec.resolve(name, "ml", body, domain), redis_auth=AUTH)


def manifests(body: dict[str, Any] | None, name: str = "demo", settings: OperatorSettings = SETTINGS
              ) -> list[dict[str, Any]]:
    return [m for _, m in builders.build_children(resolved(body, name, settings.cluster_domain), settings)]


def build(body: dict[str, Any], name: str = "demo", settings: OperatorSettings = SETTINGS) -> dict[str, dict[str, Any]]:
    return by_kind(manifests(body, name, settings))


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]["containers"][0]


def env(manifest: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifest)["env"]}



def load_crd() -> dict[str, Any]:
    docs = list(yaml.safe_load_all(CRD_PATH.read_text()))
    assert len(docs) == 1, "crd.yaml must be a single YAML document (the chart copies it)"
    return docs[0]


def version() -> dict[str, Any]:
    (v,) = load_crd()["spec"]["versions"]
    return v


def to_jsonschema(node: Any) -> Any:
    """openAPIV3Schema -> JSON schema: drop the x-kubernetes-* extensions jsonschema ignores anyway."""
    if isinstance(node, dict):
        return {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [to_jsonschema(v) for v in node]
    return node


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural-schema defaulting as the API server does it: absent fields with a default get it."""
    if not isinstance(obj, dict) or schema.get("type") != "object":
        return obj
    for key, sub in (schema.get("properties") or {}).items():
        if key not in obj and "default" in sub:
            obj[key] = copy.deepcopy(sub["default"])
        if key in obj:
            obj[key] = apply_defaults(sub, obj[key])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in obj:
            if key not in (schema.get("properties") or {}):
                obj[key] = apply_defaults(extra, obj[key])
    return obj


SCHEMA = version()["schema"]["openAPIV3Schema"]
VALIDATOR = jsonschema.Draft202012Validator(to_jsonschema(SCHEMA))


def admit(body: dict[str, Any]) -> dict[str, Any]:
    body = apply_defaults(SCHEMA, copy.deepcopy(body))
    VALIDATOR.validate(body)
    return body
