"""Pure builders: an InferenceService spec in, the manifests of its children out.

Nothing here talks to Kubernetes or to kopf, so everything is testable as plain data.
``resolve()`` applies the CRD defaults (the API server does it too, but the operator must not
depend on it) and the checks the schema cannot express; it raises ``SpecError`` with a
message a user can act on. ``build_children()`` returns every child, in creation order.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from inferstack_operator.config import (
    APP_NAME,
    CONFIG_HASH_ANNOTATION,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PART_OF,
    MANAGED_BY,
    OperatorSettings,
)

Manifest = dict[str, Any]

WEB_PORT = 8080
REDIS_PORT = 6379
REDIS_UID = 999  # the uid of the "redis" user in the official images
APP_UID = 10001  # web and worker images run as this uid (numeric, so runAsNonRoot can verify it)
READY_FILE = "/tmp/inferstack-ready"
MODELS_MOUNT = "/mnt/models"
GPU_RESOURCE = "nvidia.com/gpu"
# Longer than Kubernetes' own derived names allow: the StatefulSet pod "<name>-redis-0" and its
# "controller-revision-hash" label "<name>-redis-<10 chars>" must fit in 63 characters.
MAX_NAME_LENGTH = 40
# A queued request is the decoded image at the model's input size: 224x224x3 bytes for most
# keras.applications models, up to ~512 KiB for the larger inputs. Budget that per slot.
QUEUE_SLOT_BYTES = 512 * 1024
REDIS_BASE_BYTES = 64 * 1024 * 1024  # replies, heartbeats, stream bookkeeping
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CLAIM_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1, "k": 10**3,
            "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")


class SpecError(ValueError):
    """The spec cannot be served; the message tells the user what to change."""


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("512Mi", "1.5", "250m", 3) as a number of base units."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = Decimal(match.group(1)), match.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        return number * (Decimal(10) ** int(suffix[1:]))
    return number * Decimal(_DECIMAL[suffix])


@dataclass(frozen=True)
class Location:
    """Where the worker finds a file: a path in its image, or a path on a mounted claim."""

    path: str
    claim: str | None = None


@dataclass(frozen=True)
class Resolved:
    """The spec with defaults applied and values checked."""

    model_name: str
    model: Location | None
    weights: str | Location
    labels: Location | None
    top_k: int
    web_replicas: int
    web_image: str | None
    web_resources: Mapping[str, Any]
    request_timeout_s: int
    max_image_bytes: int
    worker_replicas: int
    batch_size: int
    max_batch_delay_ms: int
    gpu: int
    worker_grace_s: int
    node_selector: Mapping[str, str]
    tolerations: list[Mapping[str, Any]]
    worker_resources: Mapping[str, Any]
    worker_image: str | None
    redis_storage: str | None
    redis_storage_class: str | None
    max_queue: int
    redis_resources: Mapping[str, Any]
    service_type: str
    service_port: int
    service_annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def claims(self) -> list[str]:
        """Distinct PersistentVolumeClaims the worker mounts, in a stable order."""
        found: list[str] = []
        for loc in (self.model, self.weights, self.labels):
            if isinstance(loc, Location) and loc.claim and loc.claim not in found:
                found.append(loc.claim)
        return found

    @property
    def model_display(self) -> str:
        return self.model.path if self.model else self.model_name


def _int(section: Mapping[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    value = section.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}.{key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(f"{where}.{key} must be between {lo} and {hi}, got {value}")
    return value


def _str(section: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str | None:
    value = section.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}.{key} must be a non-empty string, got {value!r}")
    return value.strip()


def _section(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"spec.{key} must be an object, got {value!r}")
    return value


def parse_location(value: str, where: str) -> Location:
    """An absolute path in the worker image, or ``pvc://<claim>/<path>`` on a claim."""
    if value.startswith("/"):
        if "/../" in value + "/":
            raise SpecError(f"{where} must not contain '..', got {value!r}")
        return Location(path=value)
    if value.startswith("pvc://"):
        claim, _, rest = value[len("pvc://"):].partition("/")
        rest = rest.strip("/")
        if not claim or not CLAIM_NAME.match(claim) or len(claim) > 253:
            raise SpecError(f"{where}: {claim!r} is not a valid PersistentVolumeClaim name "
                            f"(use pvc://<claim>/<path>, e.g. pvc://models/resnet/model.keras)")
        if not rest:
            raise SpecError(f"{where} must name a file on the claim: pvc://{claim}/<path>, got {value!r}")
        if ".." in rest.split("/"):
            raise SpecError(f"{where} must not contain '..', got {value!r}")
        return Location(path=rest, claim=claim)
    scheme = value.split("://", 1)[0] + "://" if "://" in value else None
    what = f"the {scheme} scheme is not supported" if scheme else "a relative path is not supported"
    raise SpecError(f"{where}: {what} ({value!r}); use an absolute path inside the worker image "
                    f"or pvc://<claim>/<path> on a PersistentVolumeClaim in this namespace")


def _resources(section: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    value = section.get("resources") or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}.resources must be an object with limits/requests")
    for part in value:
        if part not in ("limits", "requests"):
            raise SpecError(f"{where}.resources.{part} is not supported; use limits and requests")
        items = value[part] or {}
        if not isinstance(items, Mapping):
            raise SpecError(f"{where}.resources.{part} must map resource names to quantities")
        for key, qty in items.items():
            try:
                parse_quantity(qty)
            except (ValueError, InvalidOperation):
                raise SpecError(f"{where}.resources.{part}.{key}: {qty!r} is not a quantity (e.g. 500m, 2Gi)") from None
    return value


def resolve(name: str, spec: Mapping[str, Any] | None) -> Resolved:
    """Defaults and cross-field checks for one InferenceService; raises ``SpecError``."""
    if len(name) > MAX_NAME_LENGTH or not DNS_LABEL.match(name):
        raise SpecError(f"metadata.name {name!r} must be at most {MAX_NAME_LENGTH} characters of lowercase "
                        f"letters, digits and '-', starting with a letter (it names Services and pods)")
    spec = spec or {}
    model = _section(spec, "model")
    web = _section(spec, "web")
    worker = _section(spec, "worker")
    redis = _section(spec, "redis")
    service = _section(spec, "service")

    model_name = _str(model, "name", "spec.model", "ResNet50") or "ResNet50"
    uri = _str(model, "uri", "spec.model")
    labels = _str(model, "labels", "spec.model")
    model_loc = parse_location(uri, "spec.model.uri") if uri else None
    labels_loc = parse_location(labels, "spec.model.labels") if labels else None
    if model_loc and not labels_loc:
        raise SpecError("spec.model.uri is a custom model, so spec.model.labels is required: point it at a "
                        "labels file (one class name per line, in output order), e.g. pvc://models/labels.txt")
    weights_raw = _str(model, "weights", "spec.model", "imagenet") or "imagenet"
    weights: str | Location = weights_raw
    if weights_raw not in ("imagenet", "none"):
        weights = parse_location(weights_raw, "spec.model.weights")

    gpu = _int(worker, "gpu", "spec.worker", 1, 0, 16)
    worker_resources = _resources(worker, "spec.worker")
    for part in ("limits", "requests"):
        if GPU_RESOURCE in (worker_resources.get(part) or {}):
            raise SpecError(f"spec.worker.resources.{part} sets {GPU_RESOURCE}; set spec.worker.gpu instead "
                            f"(0 runs the CPU worker image)")
    tolerations = worker.get("tolerations") or []
    if not isinstance(tolerations, list) or not all(isinstance(t, Mapping) for t in tolerations):
        raise SpecError("spec.worker.tolerations must be a list of Pod tolerations")
    node_selector = worker.get("nodeSelector") or {}
    if not isinstance(node_selector, Mapping) or not all(isinstance(v, str) for v in node_selector.values()):
        raise SpecError("spec.worker.nodeSelector must map label names to string values")

    storage = _str(redis, "storage", "spec.redis")
    if storage is not None:
        try:
            if parse_quantity(storage) <= 0:
                raise ValueError(storage)
        except (ValueError, InvalidOperation):
            raise SpecError(f"spec.redis.storage must be a positive size such as 1Gi, got {storage!r}") from None

    service_type = _str(service, "type", "spec.service", "ClusterIP") or "ClusterIP"
    if service_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise SpecError(f"spec.service.type must be ClusterIP, NodePort or LoadBalancer, got {service_type!r}")
    annotations = service.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise SpecError("spec.service.annotations must map names to string values")

    return Resolved(
        model_name=model_name,
        model=model_loc,
        weights=weights,
        labels=labels_loc,
        top_k=_int(model, "topK", "spec.model", 5, 1, 1000),
        web_replicas=_int(web, "replicas", "spec.web", 2, 0, 1000),
        web_image=_str(web, "image", "spec.web"),
        web_resources=_resources(web, "spec.web"),
        request_timeout_s=_int(web, "requestTimeoutSeconds", "spec.web", 30, 1, 3600),
        max_image_bytes=_int(web, "maxImageBytes", "spec.web", 10 * 1024 * 1024, 1024, 100 * 1024 * 1024),
        worker_replicas=_int(worker, "replicas", "spec.worker", 1, 0, 1000),
        batch_size=_int(worker, "batchSize", "spec.worker", 32, 1, 1024),
        max_batch_delay_ms=_int(worker, "maxBatchDelayMs", "spec.worker", 5, 0, 10000),
        gpu=gpu,
        worker_grace_s=_int(worker, "terminationGracePeriodSeconds", "spec.worker", 60, 10, 3600),
        node_selector=dict(node_selector),
        tolerations=[dict(t) for t in tolerations],
        worker_resources=worker_resources,
        worker_image=_str(worker, "image", "spec.worker"),
        redis_storage=storage,
        redis_storage_class=_str(redis, "storageClassName", "spec.redis"),
        max_queue=_int(redis, "maxQueue", "spec.redis", 1000, 1, 1_000_000),
        redis_resources=_resources(redis, "spec.redis"),
        service_type=service_type,
        service_port=_int(service, "port", "spec.service", 80, 1, 65535),
        service_annotations={str(k): str(v) for k, v in annotations.items()},
    )


# --- names & labels -------------------------------------------------------------------------

def web_name(name: str) -> str:
    return f"{name}-web"


def worker_name(name: str) -> str:
    return f"{name}-worker"


def redis_name(name: str) -> str:
    return f"{name}-redis"


def config_name(name: str) -> str:
    return f"{name}-config"


def selector_labels(name: str, component: str) -> dict[str, str]:
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name, LABEL_COMPONENT: component}


def labels(name: str, component: str | None) -> dict[str, str]:
    result = {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name}
    if component:
        result[LABEL_COMPONENT] = component
    result.update({LABEL_MANAGED_BY: MANAGED_BY, LABEL_PART_OF: APP_NAME})
    return result


def redis_url(name: str, namespace: str) -> str:
    return f"redis://{redis_name(name)}.{namespace}.svc.cluster.local:{REDIS_PORT}/0"


def service_url(name: str, namespace: str, port: int) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:{port}/predict"


def _object_meta(obj_name: str, instance: str, namespace: str, component: str | None) -> dict[str, Any]:
    return {"name": obj_name, "namespace": namespace, "labels": labels(instance, component)}


# --- pod pieces -----------------------------------------------------------------------------

def _pod_security(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _merge_resources(defaults: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """User values win per resource name; the defaults fill the rest."""
    result: dict[str, Any] = {}
    for part in ("requests", "limits"):
        merged = dict(defaults.get(part) or {})
        merged.update(override.get(part) or {})
        if merged:
            result[part] = merged
    return result


def _spread(name: str, component: str) -> list[dict[str, Any]]:
    # Soft: spread replicas over nodes when possible, never block scheduling for it.
    return [{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": selector_labels(name, component)},
    }]


def config_data(name: str, namespace: str, r: Resolved) -> dict[str, str]:
    """The environment both web and worker pods read (envFrom the ConfigMap)."""
    return {
        "INFERSTACK_REDIS_URL": redis_url(name, namespace),
        "INFERSTACK_MAX_QUEUE": str(r.max_queue),
        "INFERSTACK_TOP_K": str(r.top_k),
    }


def config_hash(data: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()[:16]


def build_config_map(name: str, namespace: str, r: Resolved) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _object_meta(config_name(name), name, namespace, None),
        "data": config_data(name, namespace, r),
    }


def _pod_template(name: str, namespace: str, component: str, r: Resolved,
                  pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "labels": labels(name, component),
            "annotations": {CONFIG_HASH_ANNOTATION: config_hash(config_data(name, namespace, r))},
        },
        "spec": pod_spec,
    }


def build_web_deployment(name: str, namespace: str, r: Resolved, settings: OperatorSettings) -> Manifest:
    container = {
        "name": "web",
        "image": r.web_image or settings.web_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["inferstack-web"],
        "ports": [{"name": "http", "containerPort": WEB_PORT, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": config_name(name)}}],
        "env": [
            {"name": "INFERSTACK_PORT", "value": str(WEB_PORT)},
            {"name": "INFERSTACK_REQUEST_TIMEOUT_S", "value": str(r.request_timeout_s)},
            {"name": "INFERSTACK_MAX_IMAGE_BYTES", "value": str(r.max_image_bytes)},
            {"name": "HOME", "value": "/tmp"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3,
        },
        "resources": _merge_resources(
            {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}, r.web_resources),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(APP_UID),
        # In-flight requests may wait up to the request timeout for their answer.
        "terminationGracePeriodSeconds": r.request_timeout_s + 10,
        "topologySpreadConstraints": _spread(name, "web"),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
    }
    return _deployment(web_name(name), name, namespace, "web", r, r.web_replicas,
                       {"maxUnavailable": 0, "maxSurge": 1}, pod_spec)


def _deployment(child: str, name: str, namespace: str, component: str, r: Resolved, replicas: int,
                rolling: dict[str, int], pod_spec: Manifest) -> Manifest:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _object_meta(child, name, namespace, component),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector_labels(name, component)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
            "template": _pod_template(name, namespace, component, r, pod_spec),
        },
    }


def _location_path(loc: Location) -> str:
    if loc.claim is None:
        return loc.path
    return f"{MODELS_MOUNT}/{loc.claim}/{loc.path}"


def worker_env(r: Resolved) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "INFERSTACK_MODEL", "value": _location_path(r.model) if r.model else r.model_name},
        {"name": "INFERSTACK_WEIGHTS",
         "value": _location_path(r.weights) if isinstance(r.weights, Location) else r.weights},
    ]
    if r.labels:
        env.append({"name": "INFERSTACK_LABELS", "value": _location_path(r.labels)})
    env += [
        {"name": "INFERSTACK_BATCH_SIZE", "value": str(r.batch_size)},
        {"name": "INFERSTACK_MAX_BATCH_DELAY_MS", "value": str(r.max_batch_delay_ms)},
        {"name": "INFERSTACK_WORKER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "INFERSTACK_READY_FILE", "value": READY_FILE},
        # KERAS_HOME stays the image's (weights baked at /opt/keras); the worker links them into
        # the writable cache Keras falls back to under HOME=/tmp.
        {"name": "HOME", "value": "/tmp"},
    ]
    return env


def build_worker_deployment(name: str, namespace: str, r: Resolved, settings: OperatorSettings) -> Manifest:
    gpu = r.gpu > 0
    if gpu:
        defaults = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
    else:
        defaults = {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    resources = _merge_resources(defaults, r.worker_resources)
    if gpu:
        # Extended resources go in limits (requests default to the same value).
        resources.setdefault("limits", {})[GPU_RESOURCE] = r.gpu
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}]
    for index, claim in enumerate(r.claims):
        mounts.append({"name": f"models-{index}", "mountPath": f"{MODELS_MOUNT}/{claim}", "readOnly": True})
        volumes.append({"name": f"models-{index}",
                        "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    heartbeat_fresh = f"test $(( $(date +%s) - $(stat -c %Y {READY_FILE}) )) -lt 60"
    container = {
        "name": "worker",
        "image": r.worker_image or (settings.worker_gpu_image if gpu else settings.worker_image),
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["inferstack-worker"],
        "envFrom": [{"configMapRef": {"name": config_name(name)}}],
        "env": worker_env(r),
        # Model load (and a weights download) can take minutes: allow 10 before liveness applies.
        "startupProbe": {
            "exec": {"command": ["test", "-f", READY_FILE]},
            "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 60,
        },
        "readinessProbe": {
            "exec": {"command": ["test", "-f", READY_FILE]},
            "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3,
        },
        "livenessProbe": {
            "exec": {"command": ["sh", "-c", heartbeat_fresh]},
            "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 3,
        },
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    tolerations: list[dict[str, Any]] = []
    if gpu:
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    tolerations += [dict(t) for t in r.tolerations if dict(t) not in tolerations]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(APP_UID),
        # SIGTERM lets the worker finish its current batch; give it that long.
        "terminationGracePeriodSeconds": r.worker_grace_s,
        "topologySpreadConstraints": _spread(name, "worker"),
        "containers": [container],
        "volumes": volumes,
    }
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(r.node_selector)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    # A GPU rollout cannot surge without a spare GPU: replace in place instead.
    rolling = {"maxUnavailable": 1, "maxSurge": 0} if gpu else {"maxUnavailable": 0, "maxSurge": 1}
    return _deployment(worker_name(name), name, namespace, "worker", r, r.worker_replicas, rolling, pod_spec)


def redis_memory(r: Resolved) -> tuple[int, int]:
    """(maxmemory, container memory limit) in bytes.

    From ``spec.redis.resources.limits.memory`` when given (maxmemory at 80% of it, leaving
    room for fragmentation and AOF rewrites), else sized for a full queue.
    """
    limit = (r.redis_resources.get("limits") or {}).get("memory")
    if limit is not None:
        limit_bytes = int(parse_quantity(limit))
        return int(limit_bytes * 0.8), limit_bytes
    maxmemory = r.max_queue * QUEUE_SLOT_BYTES + REDIS_BASE_BYTES
    limit_mib = -(-maxmemory * 5 // 4 // 2**20)  # ceil(1.25 * maxmemory) in MiB
    return maxmemory, limit_mib * 2**20


def build_redis_statefulset(name: str, namespace: str, r: Resolved, settings: OperatorSettings) -> Manifest:
    maxmemory, limit = redis_memory(r)
    persistent = r.redis_storage is not None
    args = [
        "--port", str(REDIS_PORT),
        "--protected-mode", "no",  # reachable only through the cluster network and Services
        "--maxmemory", str(maxmemory),
        "--maxmemory-policy", "noeviction",  # a queue must never drop requests silently
        "--dir", "/data",
    ]
    if persistent:
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    else:
        args += ["--appendonly", "no", "--save", ""]
    limit_mib = f"{-(-limit // 2**20)}Mi"
    resources = _merge_resources(
        {"requests": {"cpu": "100m", "memory": limit_mib}, "limits": {"memory": limit_mib}}, r.redis_resources)
    container = {
        "name": "redis",
        "image": settings.redis_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["redis-server"],
        "args": args,
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "exec": {"command": ["sh", "-c", "redis-cli -p 6379 ping | grep -q PONG"]},
            "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3,
        },
        "livenessProbe": {
            "tcpSocket": {"port": "redis"},
            "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6,
        },
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(REDIS_UID),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
    }
    spec: dict[str, Any] = {
        "replicas": 1,
        "serviceName": redis_name(name),
        "selector": {"matchLabels": selector_labels(name, "redis")},
        "updateStrategy": {"type": "RollingUpdate"},
        "template": {"metadata": {"labels": labels(name, "redis")}, "spec": pod_spec},
    }
    if persistent:
        claim_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": r.redis_storage}},
        }
        if r.redis_storage_class:
            claim_spec["storageClassName"] = r.redis_storage_class
        spec["volumeClaimTemplates"] = [{
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "labels": labels(name, "redis")},
            "spec": claim_spec,
        }]
    else:
        pod_spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _object_meta(redis_name(name), name, namespace, "redis"),
        "spec": spec,
    }


def build_redis_service(name: str, namespace: str, r: Resolved) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _object_meta(redis_name(name), name, namespace, "redis"),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(name, "redis"),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def build_front_service(name: str, namespace: str, r: Resolved) -> Manifest:
    meta = _object_meta(name, name, namespace, "web")
    if r.service_annotations:
        meta["annotations"] = dict(r.service_annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": r.service_type,
            "selector": selector_labels(name, "web"),
            "ports": [{"name": "http", "port": r.service_port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_children(name: str, namespace: str, spec: Mapping[str, Any] | None,
                   settings: OperatorSettings) -> list[Manifest]:
    """All children of one InferenceService, in creation order. Raises ``SpecError``."""
    r = resolve(name, spec)
    return [
        build_config_map(name, namespace, r),
        build_redis_service(name, namespace, r),
        build_redis_statefulset(name, namespace, r, settings),
        build_worker_deployment(name, namespace, r, settings),
        build_web_deployment(name, namespace, r, settings),
        build_front_service(name, namespace, r),
    ]


# --- drift ----------------------------------------------------------------------------------

def _same_scalar(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    # The API server canonicalises quantities ("0.5" -> "500m", 2 -> "2").
    numeric = (str, int, float)
    if isinstance(want, numeric) and isinstance(have, numeric) and not isinstance(want, bool) \
            and not isinstance(have, bool):
        try:
            return parse_quantity(want) == parse_quantity(have)
        except (ValueError, InvalidOperation):
            return False
    return False


def drifted_paths(want: Any, have: Any, path: str = "") -> list[str]:
    """Where ``have`` (a live object) differs from ``want`` in the fields ``want`` sets.

    Fields only the live object has (server defaults, status, fields of other managers)
    are ignored; lists must match item by item.
    """
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return [path or "."]
        found: list[str] = []
        for key, value in want.items():
            found += drifted_paths(value, have.get(key), f"{path}.{key}")
        return found
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return [path or "."]
        found = []
        for index, (a, b) in enumerate(zip(want, have)):
            found += drifted_paths(a, b, f"{path}[{index}]")
        return found
    return [] if _same_scalar(want, have) else [path or "."]


# Fields the API server refuses to change once the object exists.
IMMUTABLE = {
    "StatefulSet": ("spec.selector", "spec.serviceName", "spec.volumeClaimTemplates"),
    "Deployment": ("spec.selector",),
}


def immutable_drift(want: Manifest, have: Manifest) -> list[str]:
    """Immutable fields whose wanted value differs from the live one (the object must be recreated)."""
    found: list[str] = []
    for dotted in IMMUTABLE.get(want.get("kind", ""), ()):
        a: Any = want
        b: Any = have
        for part in dotted.split("."):
            a = a.get(part) if isinstance(a, Mapping) else None
            b = b.get(part) if isinstance(b, Mapping) else None
        if (a is None) != (b is None) or (a is not None and drifted_paths(a, b)):
            found.append(dotted)
    return found
