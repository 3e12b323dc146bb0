"""Names and settings of the inferstack operator.

The operator reads its settings from its own environment (the Helm chart sets them on the
operator Deployment). Every one is optional:

| variable | default | meaning |
| --- | --- | --- |
| ``INFERSTACK_WEB_IMAGE`` | ``ghcr.io/inferstack/web:0.1.0`` | web (gunicorn) image; ``spec.web.image`` overrides |
| ``INFERSTACK_WORKER_IMAGE`` | ``ghcr.io/inferstack/worker:0.1.0`` | CPU worker image (``spec.worker.gpu: 0``); ``spec.worker.image`` overrides |
| ``INFERSTACK_WORKER_GPU_IMAGE`` | ``ghcr.io/inferstack/worker-gpu:0.1.0`` | GPU worker image (``spec.worker.gpu > 0``); ``spec.worker.image`` overrides |
| ``INFERSTACK_REDIS_IMAGE`` | ``redis:7.4.6-alpine`` | Redis image (7.4.6: the 2025 Lua and stream fixes, CVE-2025-49844 and others) |
| ``INFERSTACK_IMAGE_PULL_POLICY`` | ``IfNotPresent`` | ``Always``, ``IfNotPresent`` or ``Never`` for every container |
| ``INFERSTACK_OPERATOR_RESYNC_SECONDS`` | ``60`` | period of the timer that repairs children and refreshes status |
| ``INFERSTACK_CLUSTER_DOMAIN`` | ``cluster.local`` | the cluster's DNS domain, for the Redis URL the pods get and ``status.url`` |
| ``INFERSTACK_KEDA_NAMESPACE`` | ``keda`` | the namespace of KEDA's operator: the Redis NetworkPolicy admits it when ``spec.worker.autoscaling`` is on |
| ``INFERSTACK_ALLOWED_IMAGES`` | (empty) | comma-separated image prefixes, matched at a path boundary (``registry.io/ml/`` allows ``registry.io/ml/web``, not ``registry.io/ml-evil/x``; ``repo:`` one repository; ``repo:tag``, ``repo@digest`` one image; see imagepolicy.py); a ``spec.web.image`` or ``spec.worker.image`` outside them, or a ``spec.*.env`` name that changes what code runs (``PYTHONPATH``, ``LD_PRELOAD``, ...), is ``InvalidSpec``. Empty: any image |
| ``INFERSTACK_OPERATOR_NAMESPACE`` | (empty) | ``inferstack-operator`` without ``--namespace``/``--all-namespaces``: watch this namespace (comma-separated for several); empty means all namespaces |
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from inferstack_operator import imagepolicy

GROUP = "inferstack.dev"
VERSION = "v1alpha1"
PLURAL = "inferenceservices"
KIND = "InferenceService"

# Identifies this operator as the owner of fields (server-side apply) and of objects (labels).
FIELD_MANAGER = "inferstack-operator"
MANAGED_BY = "inferstack-operator"
APP_NAME = "inferstack"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"

# On an InferenceService: no resync timer and no finalizer, so deleting it never waits for the
# operator (the chart's sample carries it, for `helm uninstall`). Any value counts.
EPHEMERAL_LABEL = "inferstack.dev/ephemeral"

# Pod template annotation: a digest of the shared ConfigMap, so a config change rolls the pods
# (envFrom is read only when a container starts).
CONFIG_HASH_ANNOTATION = "inferstack.dev/config-hash"
# Pod template annotation: a digest of the Redis passwords, so a rotation (the Secret deleted and
# issued again) rolls Redis (it reads its ACL file at start) and the pods that log in to it.
AUTH_HASH_ANNOTATION = "inferstack.dev/redis-auth-hash"

ENV_WEB_IMAGE = "INFERSTACK_WEB_IMAGE"
ENV_WORKER_IMAGE = "INFERSTACK_WORKER_IMAGE"
ENV_WORKER_GPU_IMAGE = "INFERSTACK_WORKER_GPU_IMAGE"
ENV_REDIS_IMAGE = "INFERSTACK_REDIS_IMAGE"
ENV_IMAGE_PULL_POLICY = "INFERSTACK_IMAGE_PULL_POLICY"
ENV_RESYNC_SECONDS = "INFERSTACK_OPERATOR_RESYNC_SECONDS"
ENV_WATCH_NAMESPACE = "INFERSTACK_OPERATOR_NAMESPACE"
ENV_CLUSTER_DOMAIN = "INFERSTACK_CLUSTER_DOMAIN"
ENV_KEDA_NAMESPACE = "INFERSTACK_KEDA_NAMESPACE"
ENV_ALLOWED_IMAGES = "INFERSTACK_ALLOWED_IMAGES"

# All the settings the operator reads, for the chart engineer.
OPERATOR_ENV = (
    ENV_WEB_IMAGE,
    ENV_WORKER_IMAGE,
    ENV_WORKER_GPU_IMAGE,
    ENV_REDIS_IMAGE,
    ENV_IMAGE_PULL_POLICY,
    ENV_RESYNC_SECONDS,
    ENV_WATCH_NAMESPACE,
    ENV_CLUSTER_DOMAIN,
    ENV_KEDA_NAMESPACE,
    ENV_ALLOWED_IMAGES,
)

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# kind -> (API group, version, plural) of everything the operator reads or writes; the client
# builds its URLs from this; the RBAC rules and the real-cluster tests check against it.
RESOURCES: dict[str, tuple[str, str, str]] = {
    "ConfigMap": ("", "v1", "configmaps"),
    "Service": ("", "v1", "services"),
    "PersistentVolumeClaim": ("", "v1", "persistentvolumeclaims"),
    "Pod": ("", "v1", "pods"),
    "Deployment": ("apps", "v1", "deployments"),
    "StatefulSet": ("apps", "v1", "statefulsets"),
    "Secret": ("", "v1", "secrets"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers"),
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
    "TriggerAuthentication": ("keda.sh", "v1alpha1", "triggerauthentications"),
    "PodMonitor": ("monitoring.coreos.com", "v1", "podmonitors"),
    KIND: (GROUP, VERSION, PLURAL),
}


class SettingsError(ValueError):
    """An operator setting (environment variable) holds a value we cannot use."""


@dataclass(frozen=True)
class OperatorSettings:
    web_image: str = "ghcr.io/inferstack/web:0.1.0"
    worker_image: str = "ghcr.io/inferstack/worker:0.1.0"
    worker_gpu_image: str = "ghcr.io/inferstack/worker-gpu:0.1.0"
    redis_image: str = "redis:7.4.6-alpine"
    image_pull_policy: str = "IfNotPresent"
    resync_seconds: float = 60.0
    cluster_domain: str = "cluster.local"
    watch_namespaces: tuple[str, ...] = ()
    keda_namespace: str = "keda"
    allowed_images: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        policy = env.get(ENV_IMAGE_PULL_POLICY) or cls.image_pull_policy
        if policy not in PULL_POLICIES:
            raise SettingsError(f"{ENV_IMAGE_PULL_POLICY} must be one of {', '.join(PULL_POLICIES)}, got {policy!r}")
        raw_resync = env.get(ENV_RESYNC_SECONDS) or str(cls.resync_seconds)
        try:
            resync = float(raw_resync)
        except ValueError:
            raise SettingsError(f"{ENV_RESYNC_SECONDS} must be a number of seconds, got {raw_resync!r}") from None
        if resync <= 0:
            raise SettingsError(f"{ENV_RESYNC_SECONDS} must be > 0, got {raw_resync!r}")
        domain = (env.get(ENV_CLUSTER_DOMAIN) or cls.cluster_domain).strip().rstrip(".").lower()
        if not DOMAIN.match(domain):
            raise SettingsError(f"{ENV_CLUSTER_DOMAIN} must be a DNS domain such as cluster.local, got {domain!r}")
        keda = (env.get(ENV_KEDA_NAMESPACE) or cls.keda_namespace).strip()
        if not NAMESPACE.match(keda) or len(keda) > 63:
            raise SettingsError(f"{ENV_KEDA_NAMESPACE} must be a namespace name, got {keda!r}")
        allowed = _names(env.get(ENV_ALLOWED_IMAGES))
        for entry in allowed:
            try:
                imagepolicy.parse_rule(entry)
            except ValueError as e:
                raise SettingsError(f"{ENV_ALLOWED_IMAGES}: {e}") from None
        return cls(
            web_image=env.get(ENV_WEB_IMAGE) or cls.web_image,
            worker_image=env.get(ENV_WORKER_IMAGE) or cls.worker_image,
            worker_gpu_image=env.get(ENV_WORKER_GPU_IMAGE) or cls.worker_gpu_image,
            redis_image=env.get(ENV_REDIS_IMAGE) or cls.redis_image,
            image_pull_policy=policy,
            resync_seconds=resync,
            cluster_domain=domain,
            watch_namespaces=_names(env.get(ENV_WATCH_NAMESPACE)),
            keda_namespace=keda,
            allowed_images=allowed,
        )


def _names(raw: str | None) -> tuple[str, ...]:
    """A comma-separated setting as a tuple, blanks dropped."""
    return tuple(n.strip() for n in (raw or "").split(",") if n.strip())
