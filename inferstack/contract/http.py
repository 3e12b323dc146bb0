"""Ports, port names and HTTP paths that the web tier, the workers, the operator and the chart share."""

from __future__ import annotations

# Listen ports. The local run (make run) serves on LOCAL_WEB_PORT; pods listen on WEB_PORT.
LOCAL_WEB_PORT = 5000
WEB_PORT = 8080
# The web pods' /metrics listener: off the public port, so the Service never exposes it.
WEB_METRICS_PORT = 9090
# Worker container i serves Prometheus metrics on WORKER_METRICS_PORT + i (one process per GPU).
WORKER_METRICS_PORT = 9102
REDIS_PORT = 6379

# Container port names (probes, Services and PodMonitors refer to ports by these).
HTTP_PORT_NAME = "http"
METRICS_PORT_NAME = "metrics"
REDIS_PORT_NAME = "redis"

# Paths of the web tier.
PREDICT_PATH = "/predict"
HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
METRICS_PATH = "/metrics"
OPENAPI_PATH = "/openapi.json"
V2_PREFIX = "/v2"
# The multipart field (and the JSON key) that carries the image in a /predict request.
IMAGE_FIELD = "image"


def worker_metrics_port(index: int) -> int:
    """The metrics port of worker container ``index``."""
    return WORKER_METRICS_PORT + index


def worker_metrics_port_name(index: int) -> str:
    """The name of worker container ``index``'s metrics port (port names are unique per pod)."""
    return METRICS_PORT_NAME if index == 0 else f"{METRICS_PORT_NAME}-gpu{index}"
