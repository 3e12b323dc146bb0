"""The Grafana dashboard the chart ships: rendered on request, and it queries only metrics we export."""

from __future__ import annotations

import json
import re

from inferstack_operator import builders, builders_autoscaling
from tests.operator.kit import resolved
from inferstack_operator.config import OperatorSettings

from .conftest import REPO, find

DASHBOARD = REPO / "charts" / "inferstack" / "dashboards" / "inferstack.json"
# Web metrics (images/web/inferstack_web/metrics.py) and worker metrics (inferstack_worker/metrics.py).
WEB_METRICS = {"inferstack_requests_total", "inferstack_request_latency_seconds_bucket", "inferstack_queue_depth",
               "inferstack_live_workers"}


def worker_metric_names() -> set[str]:
    from inferstack_worker.metrics import WorkerMetrics

    metrics = WorkerMetrics("resnet50")
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_dashboard_configmap_only_when_enabled(rendered: dict) -> None:
    assert not [o for o in find(rendered["default"]["objects"], "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    (cm,) = [o for o in find(rendered["dashboard"]["objects"], "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["inferstack.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_queries_exported_metrics_with_the_podmonitor_labels() -> None:
    exported = WEB_METRICS | worker_metric_names()
    used = {m for e in exprs() for m in re.findall(r"\binferstack_[a-z_]+", e)}
    assert used - exported == set(), "the dashboard queries metrics nobody exports"
    for wanted in ("inferstack_batch_size_sum", "inferstack_queue_wait_seconds_bucket",
                   "inferstack_inference_seconds_bucket", "inferstack_queue_depth"):
        assert wanted in used
    # The queue depth is the same Redis value on every web pod: never summed.
    assert not [e for e in exprs() if re.search(r"sum[^(]*\(\s*inferstack_queue_depth", e)]
    # Series carry the labels the PodMonitors copy from the pods.
    r = resolved({"monitoring": {"enabled": True}})
    monitors = [m for _, m in builders.build_children(r, OperatorSettings(), {builders_autoscaling.MONITORING_API})
                if m["kind"] == "PodMonitor"]
    assert len(monitors) == 2
    for monitor in monitors:
        labels = {label.replace(".", "_").replace("/", "_").replace("-", "_") for label in monitor["spec"]["podTargetLabels"]}
        assert "app_kubernetes_io_instance" in labels
    assert all('app_kubernetes_io_instance="$service"' in e for e in exprs() if "inferstack_" in e)
