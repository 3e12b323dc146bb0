"""Prometheus metrics; works under one process or gunicorn's several (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from werkzeug.exceptions import NotFound

REQUESTS = Counter("inferstack_requests_total", "HTTP requests to /predict by status code", ["code"])
LATENCY = Histogram(
    "inferstack_request_latency_seconds",
    "Time from request arrival to response for /predict",
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60),
)
DECODE = Histogram(
    "inferstack_decode_seconds",
    "Time to decode and resize an upload in the web tier",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)


def check_port(metrics_port: int, server_port: str | None, path: str) -> None:
    """404 for /metrics on the public port and for anything else on the metrics port (when one
    is set: INFERSTACK_METRICS_PORT). SERVER_PORT is the listening socket's, not the Host header's."""
    if metrics_port and (server_port == str(metrics_port)) != (path == "/metrics"):
        raise NotFound()


def render(queue_depth: int | None, live_workers: int | None) -> bytes:
    """The exposition text; queue gauges are read from Redis at scrape time (shared by all pods)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        text = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        text = generate_latest(REGISTRY)
    extra = [
        "# HELP inferstack_redis_up 1 if this web process reached Redis during the scrape",
        "# TYPE inferstack_redis_up gauge",
        f"inferstack_redis_up {0 if queue_depth is None else 1}",
    ]
    if queue_depth is not None:
        extra += [
            "# HELP inferstack_queue_depth Requests queued or in flight in Redis; every web pod reports the same "
            "value, so aggregate with max(), not sum()",
            "# TYPE inferstack_queue_depth gauge",
            f"inferstack_queue_depth {queue_depth}",
        ]
    if live_workers is not None:
        extra += [
            "# HELP inferstack_live_workers Workers with a current heartbeat (same on every web pod: use max())",
            "# TYPE inferstack_live_workers gauge",
            f"inferstack_live_workers {live_workers}",
        ]
    return text + ("\n".join(extra) + "\n").encode()
