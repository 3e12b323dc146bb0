"""Names, labels and in-cluster URLs of an InferenceService's children."""

from __future__ import annotations

from inferstack.contract import http, queue
from inferstack_operator.config import (
    APP_NAME,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PART_OF,
    MANAGED_BY,
)

WEB = "web"
WORKER = "worker"
REDIS = "redis"
# Re-exported from the contract (older imports of these names keep working).
WEB_PORT = http.WEB_PORT
REDIS_PORT = http.REDIS_PORT
WEB_METRICS_PORT = http.WEB_METRICS_PORT
# The data plane's Redis key prefix (its INFERSTACK_QUEUE_PREFIX default): the ACL grants these keys.
QUEUE_PREFIX = queue.DEFAULT_PREFIX


def web_name(name: str) -> str:
    return f"{name}-web"


def worker_name(name: str) -> str:
    return f"{name}-worker"


def redis_name(name: str) -> str:
    return f"{name}-redis"


def config_name(name: str) -> str:
    return f"{name}-config"


def auth_secret_name(name: str) -> str:
    return f"{name}-redis-auth"


def selector_labels(name: str, component: str) -> dict[str, str]:
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name, LABEL_COMPONENT: component}


def labels(name: str, component: str | None) -> dict[str, str]:
    result = {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name}
    if component:
        result[LABEL_COMPONENT] = component
    result.update({LABEL_MANAGED_BY: MANAGED_BY, LABEL_PART_OF: APP_NAME})
    return result


def label_selector(name: str, component: str) -> str:
    """``selector_labels`` as a ``labelSelector`` query parameter."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(name, component).items())


def redis_host(name: str, namespace: str, cluster_domain: str) -> str:
    return f"{redis_name(name)}.{namespace}.svc.{cluster_domain}"


def service_url(name: str, namespace: str, cluster_domain: str, port: int) -> str:
    return f"http://{name}.{namespace}.svc.{cluster_domain}:{port}/predict"
