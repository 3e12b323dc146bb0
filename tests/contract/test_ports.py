"""Ports and port names: what a probe, a Service or a PodMonitor names is what the process listens on."""

from __future__ import annotations

import dataclasses
from typing import Any

from inferstack.contract import http
from inferstack.contract.settings import env_name
from inferstack_operator import builders, spec
from inferstack_operator.config import OperatorSettings
from inferstack_operator.credentials import RedisAuth

SERVED = {"monitoring.coreos.com/v1"}


def children(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    resolved = dataclasses.replace(spec.resolve("demo", "ml", body), redis_auth=RedisAuth.generate())
    return {f"{m['kind']}/{m['metadata']['name']}": m for _, m in builders.build_children(resolved, OperatorSettings(),
                                                                                           SERVED)}


def listen_port(container: dict[str, Any], port_name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port_name)


def env_value(container: dict[str, Any], field: str) -> str:
    return next(e["value"] for e in container["env"] if e["name"] == env_name(field))


def test_web_pod_monitor_scrapes_the_port_that_serves_metrics():
    objs = children({"monitoring": {"enabled": True}})
    web = objs["Deployment/demo-web"]["spec"]["template"]["spec"]["containers"][0]
    (endpoint,) = objs["PodMonitor/demo-web"]["spec"]["podMetricsEndpoints"]
    # The web process serves /metrics only on INFERSTACK_METRICS_PORT (inferstack_web.metrics.check_port):
    # the scraped port name must resolve to that number.
    assert endpoint["path"] == http.METRICS_PATH
    assert listen_port(web, endpoint["port"]) == int(env_value(web, "metrics_port")) == http.WEB_METRICS_PORT
    assert listen_port(web, endpoint["port"]) != int(env_value(web, "port"))


def test_worker_pod_monitor_scrapes_every_worker_container():
    objs = children({"monitoring": {"enabled": True}, "worker": {"gpu": 2}})
    containers = objs["Deployment/demo-worker"]["spec"]["template"]["spec"]["containers"]
    endpoints = objs["PodMonitor/demo-worker"]["spec"]["podMetricsEndpoints"]
    assert len(endpoints) == len(containers) == 2
    for index, (container, endpoint) in enumerate(zip(containers, endpoints)):
        assert listen_port(container, endpoint["port"]) == int(env_value(container, "metrics_port"))
        assert int(env_value(container, "metrics_port")) == http.worker_metrics_port(index)


def test_probes_and_front_service_use_the_public_port():
    objs = children({})
    web = objs["Deployment/demo-web"]["spec"]["template"]["spec"]["containers"][0]
    assert web["readinessProbe"]["httpGet"] == {"path": http.READYZ_PATH, "port": http.HTTP_PORT_NAME}
    assert web["livenessProbe"]["httpGet"] == {"path": http.HEALTHZ_PATH, "port": http.HTTP_PORT_NAME}
    assert listen_port(web, http.HTTP_PORT_NAME) == int(env_value(web, "port")) == http.WEB_PORT
    (front,) = objs["Service/demo"]["spec"]["ports"]
    assert front["targetPort"] == http.HTTP_PORT_NAME
