"""The pod specs the operator wrote actually run: probes, Service ports and PodMonitor ports are answered.

The web, worker and Redis pod templates are read back from the API server and started as local
processes (tests/cluster/podrun.py says what a kubelet would do differently). Then every probe,
every Service targetPort and every PodMonitor endpoint is asked, and a /predict through the
web process is answered by the worker process through the Redis process.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.cluster.podrun import Container, PodRunner, python_bin
from tests.helpers import DIGIT_LABELS, digit_images, png_bytes
from tests.kubeplane import ISVC_API, Kube, wait_for

NAME = "digits"
pytestmark = pytest.mark.usefixtures("operator")


def service_spec() -> dict[str, Any]:
    return {"apiVersion": ISVC_API, "kind": "InferenceService", "metadata": {"name": NAME},
            "spec": {"model": {"uri": "pvc://models/digits/model.keras", "labels": "pvc://models/digits/labels.txt",
                               "runtime": "keras", "precision": "fp32"},
                     "web": {"replicas": 1}, "worker": {"replicas": 1, "gpu": 0, "batchSize": 8},
                     "monitoring": {"enabled": True}}}


@pytest.fixture()
def running(keda_and_prometheus: Kube, namespace: str, digits_model: dict[str, Any],
            tmp_path: pathlib.Path) -> Iterator[PodRunner]:
    kube = keda_and_prometheus
    kube.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
                 "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}}}, namespace)
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(service_spec()))
    # The claim has no volume here, so kwok's pods never start: only the templates matter.
    wait_for(lambda: all(kube.get(kind, namespace, f"{NAME}-{tier}") for kind, tier in (
        ("StatefulSet", "redis"), ("Deployment", "worker"), ("Deployment", "web"), ("PodMonitor", "web"),
        ("PodMonitor", "worker"))), timeout=60, what="the children")
    runner = PodRunner(kube, namespace, tmp_path)
    runner.add(kube.get("StatefulSet", namespace, f"{NAME}-redis")["spec"]["template"], f"{NAME}-redis-0")
    (worker,) = runner.add(kube.get("Deployment", namespace, f"{NAME}-worker")["spec"]["template"], f"{NAME}-worker-0")
    runner.add(kube.get("Deployment", namespace, f"{NAME}-web")["spec"]["template"], f"{NAME}-web-0")
    # The claim's content: what a user copies onto the volume before applying the resource.
    claim = worker.mounts["/mnt/models/models"] / "digits"
    claim.mkdir()
    shutil.copy(digits_model["path"], claim / "model.keras")
    shutil.copy(digits_model["labels"], claim / "labels.txt")
    runner.start([python_bin()])
    try:
        yield runner
    finally:
        runner.stop()


def answered(runner: PodRunner, c: Container, probe: dict[str, Any]) -> bool:
    if "httpGet" in probe:
        get = probe["httpGet"]
        try:
            return requests.get(f"http://127.0.0.1:{c.port(get['port'])}{get['path']}", timeout=3).status_code == 200
        except requests.ConnectionError:
            return False
    if "tcpSocket" in probe:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", c.port(probe["tcpSocket"]["port"]))) == 0
    return runner.exec_probe(c, probe["exec"]["command"])


def test_probes_services_and_monitors_are_answered_and_predict_works(running: PodRunner, namespace: str,
                                                                    in_process: Any) -> None:
    kube = running.kube
    for c in running.containers:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in c.spec:
                wait_for(lambda: answered(running, c, c.spec[kind]), timeout=120,
                         what=f"{c.pod}/{c.spec['name']} {kind}\n{running.logs()}")

    # Every Service port reaches a process that answers on it.
    for svc in kube.list("Service", namespace):
        for port in svc["spec"]["ports"]:
            local = running.backend(svc, port)
            assert local is not None, f"Service {svc['metadata']['name']} port {port} selects no container port"
            with socket.create_connection(("127.0.0.1", local), timeout=5):
                pass

    # Every PodMonitor endpoint names a port whose process serves Prometheus metrics there.
    for monitor in kube.list("PodMonitor", namespace):
        selector = monitor["spec"]["selector"]["matchLabels"]
        (c,) = [c for c in running.containers if selector.items() <= c.labels.items()]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            rsp = requests.get(f"http://127.0.0.1:{c.port(endpoint['port'])}{endpoint['path']}", timeout=5)
            assert rsp.status_code == 200 and "# TYPE" in rsp.text, (monitor["metadata"]["name"], endpoint)

    # A request through the web process, answered by the worker process through Redis.
    images, _ = digit_images()
    expected = DIGIT_LABELS[int(in_process(png_bytes(images[1500])).argmax())]
    (web,) = [c for c in running.containers if c.labels.get("app.kubernetes.io/component") == "web"]
    rsp = requests.post(f"http://127.0.0.1:{web.port('http')}/predict", files={"image": png_bytes(images[1500])},
                        timeout=60)
    assert rsp.status_code == 200, (rsp.text, running.logs())
    body = rsp.json()
    assert body["success"] is True and body["predictions"][0]["label"] == expected
    print("remapped for local processes:", running.remapped)
