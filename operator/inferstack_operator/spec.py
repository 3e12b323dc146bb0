"""The InferenceService spec in, a frozen ``Resolved`` out: the only module that reads ``spec``.

``resolve()`` applies the CRD defaults (the API server does it too, but the operator must not
depend on it) and the checks the schema cannot express; it raises ``SpecError`` with a message
a user can act on. Everything downstream (builders, status) takes the ``Resolved``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import PurePosixPath
from typing import Any

from kubernetes.utils import parse_quantity

from inferstack.contract.settings import BY_ENV, PRECISIONS, RUNTIMES, ConfigError, Settings
from inferstack.contract.settings import default as setting_default
from inferstack_operator import imagepolicy, names
from inferstack_operator.credentials import RedisAuth
from inferstack_operator.reasons import SpecError

__all__ = ["Location", "PodOptions", "Resolved", "SpecError", "check_images", "parse_location", "quantity", "resolve"]

GPU_RESOURCE = "nvidia.com/gpu"
# Longer than Kubernetes' own derived names allow: the StatefulSet pod "<name>-redis-0" and its
# "controller-revision-hash" label "<name>-redis-<10 chars>" must fit in 63 characters.
MAX_NAME_LENGTH = 40
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity ("512Mi", "1.5", "250m", 3) in base units; ValueError if it is none."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    try:
        result: Decimal = parse_quantity(value)
    except (ValueError, InvalidOperation):
        raise ValueError(f"not a quantity: {value!r}") from None
    return result


@dataclass(frozen=True)
class Location:
    """Where the worker finds a file: a path in its image, or a path on a mounted claim."""

    path: str
    claim: str | None = None


@dataclass(frozen=True)
class PodOptions:
    """Per-tier pod settings a cluster may need (spec.web / spec.worker / spec.redis)."""

    env: tuple[Mapping[str, Any], ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    affinity: Mapping[str, Any] | None = None
    priority_class_name: str | None = None
    runtime_class_name: str | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    image: str | None = None


@dataclass(frozen=True)
class WorkerAutoscaling:
    """spec.worker.autoscaling: KEDA scales the workers on the request queue."""

    min_replicas: int
    max_replicas: int
    target_queue_length: int  # queued requests per worker replica before KEDA adds one
    cooldown_s: int


@dataclass(frozen=True)
class WebAutoscaling:
    """spec.web.autoscaling: a HorizontalPodAutoscaler scales the web tier on CPU."""

    min_replicas: int
    max_replicas: int
    target_cpu_percent: int


@dataclass(frozen=True)
class Resolved:
    """The spec with defaults applied and values checked, plus where it lives."""

    name: str
    namespace: str
    cluster_domain: str
    model_name: str
    model: Location | None
    weights: str | Location
    labels: Location | None
    top_k: int
    runtime: str | None
    precision: str | None
    auto_int8: bool
    web_replicas: int
    request_timeout_s: int
    max_image_bytes: int
    worker_replicas: int
    batch_size: int
    max_batch_delay_ms: int
    gpu: int
    worker_grace_s: int
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    redis_storage: str | None
    redis_storage_class: str | None
    max_queue: int
    service_type: str
    service_port: int
    service_annotations: Mapping[str, str]
    image_pull_secrets: tuple[str, ...]
    web: PodOptions
    worker: PodOptions
    redis: PodOptions
    # spec.networkPolicy.web.from: who may reach the web port (None: no policy on the web pods)
    web_ingress_from: tuple[Mapping[str, Any], ...] | None = None
    # spec.worker.autoscaling is on: KEDA's scaler must reach Redis too
    keda_reaches_redis: bool = False
    # Set by the reconciler (read from the live Secret, or generated), never from the spec.
    redis_auth: RedisAuth | None = field(default=None, repr=False)
    worker_autoscaling: WorkerAutoscaling | None = None
    web_autoscaling: WebAutoscaling | None = None
    monitoring: bool = False

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

    @property
    def served_name(self) -> str:
        """The name clients use for the model (v2 API): architecture or file stem, lower-cased."""
        return (PurePosixPath(self.model.path).stem if self.model else self.model_name).lower()

    @property
    def url(self) -> str:
        return names.service_url(self.name, self.namespace, self.cluster_domain, self.service_port)


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


def _choice(section: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str | None:
    value = _str(section, key, where)
    if value is not None and value not in choices:
        raise SpecError(f"{where}.{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _bool(section: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = section.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _dns_name(section: Mapping[str, Any], key: str, where: str) -> str | None:
    value = _str(section, key, where)
    if value is not None and (len(value) > 253 or not DNS_SUBDOMAIN.match(value)):
        raise SpecError(f"{where}.{key}: {value!r} is not a valid object name (lowercase letters, digits, '-', '.')")
    return value


def _section(spec: Mapping[str, Any], key: str, where: str = "spec") -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}.{key} must be an object, got {value!r}")
    return value


def _string_map(section: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    value = section.get(key) or {}
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise SpecError(f"{where}.{key} must map names to string values")
    return {str(k): v for k, v in value.items()}


def parse_location(value: str, where: str) -> Location:
    """An absolute path in the worker image, or ``pvc://<claim>/<path>`` on a claim."""
    if value.startswith("/"):
        if "/../" in value + "/":
            raise SpecError(f"{where} must not contain '..', got {value!r}")
        return Location(path=value)
    if value.startswith("pvc://"):
        claim, _, rest = value[len("pvc://"):].partition("/")
        rest = rest.strip("/")
        if not claim or not DNS_SUBDOMAIN.match(claim) or len(claim) > 253:
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
                quantity(qty)
            except ValueError:
                raise SpecError(f"{where}.resources.{part}.{key}: {qty!r} is not a quantity (e.g. 500m, 2Gi)") from None
    return value


def _env(section: Mapping[str, Any], where: str) -> tuple[Mapping[str, Any], ...]:
    value = section.get("env") or []
    if not isinstance(value, list):
        raise SpecError(f"{where}.env must be a list of {{name, value}} or {{name, valueFrom}}")
    for index, item in enumerate(value):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            raise SpecError(f"{where}.env[{index}] needs a name")
        if "value" in item and "valueFrom" in item:
            raise SpecError(f"{where}.env[{index}] ({item['name']}) sets both value and valueFrom")
    return tuple(dict(item) for item in value)


def _pod_options(section: Mapping[str, Any], where: str, *, image: bool = True, runtime_class: bool = False
                 ) -> PodOptions:
    affinity = section.get("affinity")
    if affinity is not None and not isinstance(affinity, Mapping):
        raise SpecError(f"{where}.affinity must be a Pod affinity object")
    return PodOptions(
        env=_env(section, where),
        annotations=_string_map(section, "podAnnotations", where),
        labels=_string_map(section, "podLabels", where),
        affinity=dict(affinity) if affinity else None,
        priority_class_name=_dns_name(section, "priorityClassName", where),
        runtime_class_name=_dns_name(section, "runtimeClassName", where) if runtime_class else None,
        resources=_resources(section, where),
        image=_str(section, "image", where) if image else None,
    )


def _min_max(section: Mapping[str, Any], where: str, lo: int, default_min: int) -> tuple[int, int]:
    if section.get("maxReplicas") is None:
        raise SpecError(f"{where}.maxReplicas is required: the most replicas the autoscaler may run")
    low = _int(section, "minReplicas", where, default_min, lo, 1000)
    high = _int(section, "maxReplicas", where, 1, 1, 1000)
    if low > high:
        raise SpecError(f"{where}.minReplicas ({low}) must not exceed {where}.maxReplicas ({high})")
    return low, high


def _worker_autoscaling(worker: Mapping[str, Any], batch_size: int) -> WorkerAutoscaling | None:
    where = "spec.worker.autoscaling"
    if worker.get("autoscaling") is None:
        return None
    section = _section(worker, "autoscaling", "spec.worker")
    low, high = _min_max(section, where, 0, 1)
    return WorkerAutoscaling(
        min_replicas=low,
        max_replicas=high,
        # Two full batches waiting per worker: one more worker would fill its first batch at once.
        target_queue_length=_int(section, "targetQueueLength", where, 2 * batch_size, 1, 1_000_000),
        cooldown_s=_int(section, "cooldownSeconds", where, 300, 0, 86400),
    )


def _web_autoscaling(web: Mapping[str, Any]) -> WebAutoscaling | None:
    where = "spec.web.autoscaling"
    if web.get("autoscaling") is None:
        return None
    section = _section(web, "autoscaling", "spec.web")
    # A HorizontalPodAutoscaler cannot go below 1 (HPAScaleToZero is an alpha feature gate).
    low, high = _min_max(section, where, 1, 1)
    return WebAutoscaling(min_replicas=low, max_replicas=high,
                          target_cpu_percent=_int(section, "targetCPUUtilization", where, 70, 1, 1000))


def _monitoring(spec: Mapping[str, Any]) -> bool:
    enabled = _section(spec, "monitoring").get("enabled", False)
    if not isinstance(enabled, bool):
        raise SpecError(f"spec.monitoring.enabled must be true or false, got {enabled!r}")
    return enabled


def _pull_secrets(spec: Mapping[str, Any]) -> tuple[str, ...]:
    value = spec.get("imagePullSecrets") or []
    if not isinstance(value, list):
        raise SpecError("spec.imagePullSecrets must be a list of {name: <Secret>}")
    result = []
    for index, item in enumerate(value):
        secret = _dns_name(item, "name", f"spec.imagePullSecrets[{index}]") if isinstance(item, Mapping) else None
        if secret is None:
            raise SpecError(f"spec.imagePullSecrets[{index}] must be {{name: <Secret>}}")
        result.append(secret)
    return tuple(result)


def _web_ingress(spec: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...] | None:
    policy = _section(spec, "networkPolicy")
    if policy.get("web") is None:
        return None
    peers = _section(policy, "web", "spec.networkPolicy").get("from")
    # An empty "from" would admit everyone in a NetworkPolicy: refuse it rather than guess.
    if not isinstance(peers, list) or not peers or not all(isinstance(p, Mapping) and p for p in peers):
        raise SpecError("spec.networkPolicy.web.from must list at least one NetworkPolicy peer "
                        "(podSelector, namespaceSelector or ipBlock)")
    return tuple(dict(p) for p in peers)


def check_images(r: Resolved, allowed_prefixes: tuple[str, ...]) -> None:
    """With an operator allowlist, every spec.*.image must be on it (imagepolicy.py says how an entry
    matches), and no tier's env may change what code the allowed images run."""
    if not allowed_prefixes:
        return
    rules = tuple(imagepolicy.parse_rule(p) for p in allowed_prefixes)
    for where, image in (("spec.web.image", r.web.image), ("spec.worker.image", r.worker.image)):
        if image is not None and not imagepolicy.image_allowed(image, rules):
            raise SpecError(f"{where} {image!r} is not allowed by this operator: images must be under "
                            f"{' or '.join(repr(p) for p in allowed_prefixes)} (see INFERSTACK_ALLOWED_IMAGES)")
    for where, options in (("spec.web.env", r.web), ("spec.worker.env", r.worker), ("spec.redis.env", r.redis)):
        refused = imagepolicy.refused_env(options.env)
        if refused:
            raise SpecError(f"{where} sets {', '.join(refused)}: with an image allowlist, env that changes what "
                            f"code the image runs (module or library search paths, preloads, start-up "
                            f"files) is not allowed; bake it into an allowed image instead")


# Spec defaults that are also process settings: one value, from the contract's settings table.
DEFAULT_MODEL: str = setting_default("model")
DEFAULT_WEIGHTS: str = setting_default("weights")
DEFAULT_TOP_K: int = setting_default("top_k")
DEFAULT_REQUEST_TIMEOUT_S = int(setting_default("request_timeout_s"))
DEFAULT_MAX_IMAGE_BYTES: int = setting_default("max_image_bytes")
DEFAULT_BATCH_SIZE: int = setting_default("batch_size")
DEFAULT_MAX_BATCH_DELAY_MS = int(setting_default("max_batch_delay_ms"))
DEFAULT_MAX_QUEUE: int = setting_default("max_queue")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")


def _check_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH or not DNS_LABEL.match(name):
        raise SpecError(f"metadata.name {name!r} must be at most {MAX_NAME_LENGTH} characters of lowercase "
                        f"letters, digits and '-', starting with a letter (it names Services and pods)")


def _model_fields(model: Mapping[str, Any]) -> dict[str, Any]:
    """spec.model: what the workers load, and how."""
    uri = _str(model, "uri", "spec.model")
    labels = _str(model, "labels", "spec.model")
    model_loc = parse_location(uri, "spec.model.uri") if uri else None
    labels_loc = parse_location(labels, "spec.model.labels") if labels else None
    if model_loc and not labels_loc:
        raise SpecError("spec.model.uri is a custom model, so spec.model.labels is required: point it at a "
                        "labels file (one class name per line, in output order), e.g. pvc://models/labels.txt")
    weights_raw = _str(model, "weights", "spec.model", DEFAULT_WEIGHTS) or DEFAULT_WEIGHTS
    weights: str | Location = weights_raw
    if weights_raw not in ("imagenet", "none"):
        weights = parse_location(weights_raw, "spec.model.weights")
    return {
        "model_name": _str(model, "name", "spec.model", DEFAULT_MODEL) or DEFAULT_MODEL,
        "model": model_loc,
        "weights": weights,
        "labels": labels_loc,
        "top_k": _int(model, "topK", "spec.model", DEFAULT_TOP_K, 1, 1000),
        "runtime": _choice(model, "runtime", "spec.model", RUNTIMES),
        "precision": _choice(model, "precision", "spec.model", PRECISIONS),
        "auto_int8": _auto_int8(model),
    }


def _check_settings_env(env: tuple[Mapping[str, Any], ...], where: str) -> None:
    """The web pod's memory limit and /tmp size follow its settings, so a settings variable in its
    env must be a literal the operator can read, and a valid one (else the pods would crash-loop)."""
    literal: dict[str, str] = {}
    for item in env:
        name = item["name"]
        if name not in BY_ENV:
            continue
        if "valueFrom" in item:
            raise SpecError(f"{where} {name} uses valueFrom; give it a literal value: the operator sizes the "
                            f"web pod's memory and /tmp from its settings")
        literal[name] = str(item.get("value", ""))
    try:
        Settings.from_env(literal)
    except ConfigError as e:
        raise SpecError(f"{where}: {e}") from None


def _auto_int8(model: Mapping[str, Any]) -> bool:
    """spec.model.autoInt8: only meaningful where the worker measures (precision auto, OpenVINO)."""
    on = _bool(model, "autoInt8", "spec.model", False)
    if on and model.get("precision") not in (None, "auto"):
        raise SpecError(f"spec.model.autoInt8 needs spec.model.precision auto (or absent), got {model['precision']!r}")
    if on and model.get("runtime") == "keras":
        raise SpecError("spec.model.autoInt8 quantizes with OpenVINO; spec.model.runtime keras cannot run int8")
    return on


def _web_fields(web: Mapping[str, Any]) -> dict[str, Any]:
    """spec.web: the gunicorn tier."""
    options = _pod_options(web, "spec.web")
    _check_settings_env(options.env, "spec.web.env")
    return {
        "web_replicas": _int(web, "replicas", "spec.web", 2, 0, 1000),
        "request_timeout_s": _int(web, "requestTimeoutSeconds", "spec.web", DEFAULT_REQUEST_TIMEOUT_S, 1, 3600),
        "max_image_bytes": _int(web, "maxImageBytes", "spec.web", DEFAULT_MAX_IMAGE_BYTES, 1024, 100 * 1024 * 1024),
        "web": options,
        "web_autoscaling": _web_autoscaling(web),
    }


def _worker_fields(worker: Mapping[str, Any]) -> dict[str, Any]:
    """spec.worker: the batching model servers."""
    options = _pod_options(worker, "spec.worker", runtime_class=True)
    for part in ("limits", "requests"):
        if GPU_RESOURCE in (options.resources.get(part) or {}):
            raise SpecError(f"spec.worker.resources.{part} sets {GPU_RESOURCE}; set spec.worker.gpu instead "
                            f"(0 runs the CPU worker image)")
    tolerations = worker.get("tolerations") or []
    if not isinstance(tolerations, list) or not all(isinstance(t, Mapping) for t in tolerations):
        raise SpecError("spec.worker.tolerations must be a list of Pod tolerations")
    batch_size = _int(worker, "batchSize", "spec.worker", DEFAULT_BATCH_SIZE, 1, 1024)
    return {
        "worker_replicas": _int(worker, "replicas", "spec.worker", 1, 0, 1000),
        "batch_size": batch_size,
        "max_batch_delay_ms": _int(worker, "maxBatchDelayMs", "spec.worker", DEFAULT_MAX_BATCH_DELAY_MS, 0, 10000),
        "gpu": _int(worker, "gpu", "spec.worker", 1, 0, 16),
        "worker_grace_s": _int(worker, "terminationGracePeriodSeconds", "spec.worker", 60, 10, 3600),
        "node_selector": _string_map(worker, "nodeSelector", "spec.worker"),
        "tolerations": tuple(dict(t) for t in tolerations),
        "worker": options,
        "keda_reaches_redis": worker.get("autoscaling") is not None,
        "worker_autoscaling": _worker_autoscaling(worker, batch_size),
    }


def _redis_fields(redis: Mapping[str, Any]) -> dict[str, Any]:
    """spec.redis: the queue's size and storage."""
    storage = _str(redis, "storage", "spec.redis")
    if storage is not None:
        try:
            if quantity(storage) <= 0:
                raise ValueError(storage)
        except ValueError:
            raise SpecError(f"spec.redis.storage must be a positive size such as 1Gi, got {storage!r}") from None
    return {
        "redis_storage": storage,
        "redis_storage_class": _str(redis, "storageClassName", "spec.redis"),
        "max_queue": _int(redis, "maxQueue", "spec.redis", DEFAULT_MAX_QUEUE, 1, 1_000_000),
        "redis": _pod_options(redis, "spec.redis", image=False),  # the operator's Redis image only
    }


def _service_fields(service: Mapping[str, Any]) -> dict[str, Any]:
    """spec.service: the front door."""
    return {
        "service_type": _choice(service, "type", "spec.service", SERVICE_TYPES) or "ClusterIP",
        "service_port": _int(service, "port", "spec.service", 80, 1, 65535),
        "service_annotations": _string_map(service, "annotations", "spec.service"),
    }


def resolve(name: str, namespace: str, spec: Mapping[str, Any] | None,
            cluster_domain: str = "cluster.local") -> Resolved:
    """Defaults and cross-field checks for one InferenceService; raises ``SpecError``."""
    _check_name(name)
    spec = spec or {}
    return Resolved(
        name=name,
        namespace=namespace,
        cluster_domain=cluster_domain,
        **_model_fields(_section(spec, "model")),
        **_web_fields(_section(spec, "web")),
        **_worker_fields(_section(spec, "worker")),
        **_redis_fields(_section(spec, "redis")),
        **_service_fields(_section(spec, "service")),
        image_pull_secrets=_pull_secrets(spec),
        web_ingress_from=_web_ingress(spec),
        monitoring=_monitoring(spec),
    )
