"""KEDA and the Prometheus Operator: with their CRDs served, the optional children are accepted and follow the spec."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.kubeplane import REPO, Kube, wait_for

NAME = "resnet50-elastic"
pytestmark = pytest.mark.usefixtures("operator")


def autoscaled() -> dict[str, Any]:
    body = yaml.safe_load((REPO / "operator" / "examples" / "resnet50-autoscaled.yaml").read_text())
    body["spec"]["worker"]["gpu"] = 0  # the CPU node serves it; the GPU path has its own test
    return body


def apply(kube: Kube, namespace: str, body: dict[str, Any]) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def test_autoscalers_and_monitors_are_accepted_and_pruned(keda_and_prometheus: Kube, namespace: str) -> None:
    kube = keda_and_prometheus
    apply(kube, namespace, autoscaled())
    wait_for(lambda: all(kube.get(kind, namespace, name) for kind, name in (
        ("ScaledObject", f"{NAME}-worker"), ("TriggerAuthentication", f"{NAME}-worker"),
        ("HorizontalPodAutoscaler", f"{NAME}-web"), ("PodMonitor", f"{NAME}-web"), ("PodMonitor", f"{NAME}-worker"))),
        timeout=60, what="the ScaledObject, TriggerAuthentication, HPA and PodMonitors")
    cond = wait_for(lambda: (c := kube.condition(namespace, NAME, "Autoscaling")).get("status") == "True" and c,
                    what="Autoscaling=True")
    assert cond["reason"] == "AutoscalingActive"
    scaled = kube.get("ScaledObject", namespace, f"{NAME}-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == f"{NAME}-worker" and scaled["triggers"][0]["type"] == "redis-streams"

    # Each PodMonitor endpoint names a port of the pods it selects (tests/cluster/test_pods_run.py
    # checks that the process behind that port answers /metrics).
    for component in ("web", "worker"):
        monitor = kube.get("PodMonitor", namespace, f"{NAME}-{component}")["spec"]
        deploy = kube.get("Deployment", namespace, f"{NAME}-{component}")
        assert monitor["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
        ports = {p["name"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {e["port"] for e in monitor["podMetricsEndpoints"]} <= ports, component

    # Autoscaling off: the autoscalers go, the operator owns the worker's replicas again.
    kube.kubectl("patch", "infsvc", NAME, "-n", namespace, "--type=json", "-p", json.dumps([
        {"op": "remove", "path": "/spec/worker/autoscaling"}, {"op": "remove", "path": "/spec/web/autoscaling"}]))
    wait_for(lambda: not any(kube.get(kind, namespace, name) for kind, name in (
        ("ScaledObject", f"{NAME}-worker"), ("TriggerAuthentication", f"{NAME}-worker"),
        ("HorizontalPodAutoscaler", f"{NAME}-web"))), timeout=60, what="the autoscalers pruned")
    wait_for(lambda: kube.get("Deployment", namespace, f"{NAME}-worker")["spec"]["replicas"] == 1,
             what="worker replicas from the spec")


def test_replicas_written_through_the_scale_subresource_survive_resyncs(keda_and_prometheus: Kube,
                                                                      namespace: str) -> None:
    kube = keda_and_prometheus
    apply(kube, namespace, autoscaled())
    wait_for(lambda: kube.get("ScaledObject", namespace, f"{NAME}-worker"), timeout=60, what="the ScaledObject")
    # As KEDA's HPA does: the scale subresource, under its own field manager.
    kube.patch("Deployment", namespace, f"{NAME}-worker", {"spec": {"replicas": 3}}, sub="scale",
               manager="horizontal-pod-autoscaler")
    kube.kubectl("patch", "infsvc", NAME, "-n", namespace, "--type=merge",
                 "-p", json.dumps({"spec": {"worker": {"batchSize": 16}}}))
    wait_for(lambda: {e["name"]: e.get("value") for e in kube.get("Deployment", namespace, f"{NAME}-worker")
                      ["spec"]["template"]["spec"]["containers"][0]["env"]}["INFERSTACK_BATCH_SIZE"] == "16",
             what="the batch size change applied")
    # That apply came after the scale write and left the replicas alone, as every resync does.
    assert kube.get("Deployment", namespace, f"{NAME}-worker")["spec"]["replicas"] == 3
