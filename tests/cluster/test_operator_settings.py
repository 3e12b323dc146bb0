"""Cluster settings, pod problems, credentials and the ephemeral sample, on a real API server."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import yaml

from inferstack_operator.config import AUTH_HASH_ANNOTATION
from tools import cluster
from tests.kubeplane import REPO, Kube, SessionOperator, wait_for
from tests.operator.netpol import admits

EXAMPLES = REPO / "operator" / "examples"
pytestmark = pytest.mark.usefixtures("operator")
TIERS = (("web", "Deployment"), ("worker", "Deployment"), ("redis", "StatefulSet"))
# kwok leaves the status of pods with this annotation to us.
KWOK_HANDS_OFF = cluster.KWOK_STATUS_ANNOTATION


def example(filename: str = "cpu-small.yaml", name: str | None = None) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / filename).read_text())
    if name:
        body["metadata"]["name"] = name
    return body


def apply(kube: Kube, ns: str, body: dict[str, Any]) -> None:
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))


def patch_isvc(kube: Kube, ns: str, name: str, spec: dict[str, Any]) -> None:
    kube.kubectl("patch", "infsvc", name, "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec}))


def template(kube: Kube, ns: str, kind: str, name: str) -> dict[str, Any]:
    obj = kube.get(kind, ns, name)
    assert obj is not None, name
    return obj["spec"]["template"]


def tier_settings(prefix: str) -> dict[str, Any]:
    return {"env": [{"name": "EXTRA", "value": prefix}], "podAnnotations": {"example.com/note": prefix},
            "podLabels": {"team": prefix}, "priorityClassName": f"{prefix}-priority",
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": [prefix]}]}]}}}}


def observed(kube: Kube, ns: str) -> dict[str, Any]:
    found = {}
    for tier, kind in TIERS:
        t = template(kube, ns, kind, f"mobilenet-{tier}")
        pod, container = t["spec"], t["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        terms = (pod.get("affinity") or {}).get("nodeAffinity", {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms") or [{}]
        found[tier] = (pod.get("imagePullSecrets"), env.get("EXTRA"),
                       (t["metadata"].get("annotations") or {}).get("example.com/note"),
                       t["metadata"]["labels"].get("team"), pod.get("priorityClassName"),
                       (terms[0].get("matchExpressions") or [{}])[0].get("values"),
                       pod.get("runtimeClassName"))
    return found


def expected(prefix: str | None) -> dict[str, Any]:
    return {tier: ([{"name": f"{prefix}-regcred"}] if prefix else None, prefix, prefix, prefix,
                   f"{prefix}-priority" if prefix else None, [prefix] if prefix else None,
                   f"{prefix}-runtime" if prefix and tier == "worker" else None) for tier, _ in TIERS}


def test_cluster_settings_are_applied_changed_and_removed(control_plane: Kube, namespace: str) -> None:
    def spec(prefix: str) -> dict[str, Any]:
        return {"imagePullSecrets": [{"name": f"{prefix}-regcred"}], "web": tier_settings(prefix),
                "worker": {**tier_settings(prefix), "runtimeClassName": f"{prefix}-runtime"},
                "redis": tier_settings(prefix)}

    body = example()
    for key, value in spec("one").items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    apply(control_plane, namespace, body)
    wait_for(lambda: observed(control_plane, namespace) == expected("one"), timeout=60, what="settings applied")
    patch_isvc(control_plane, namespace, "mobilenet", spec("two"))
    wait_for(lambda: observed(control_plane, namespace) == expected("two"), what="settings changed")
    removed = {"imagePullSecrets": None, **{tier: {key: None for key in tier_settings("x")} for tier in ("web", "redis")},
               "worker": {**{key: None for key in tier_settings("x")}, "runtimeClassName": None}}
    patch_isvc(control_plane, namespace, "mobilenet", removed)
    wait_for(lambda: observed(control_plane, namespace) == expected(None), what="settings removed")
    wait_for(lambda: control_plane.isvc(namespace, "mobilenet")["status"]["observedGeneration"] == 3,
             what="generation 3 observed")


def test_env_clash_keeps_ours_and_says_so(control_plane: Kube, namespace: str) -> None:
    body = example()
    body["spec"]["web"]["env"] = [{"name": "INFERSTACK_PORT", "value": "1"}, {"name": "MINE", "value": "2"}]
    apply(control_plane, namespace, body)
    wait_for(lambda: control_plane.get("Deployment", namespace, "mobilenet-web"), what="the web Deployment")
    env = {e["name"]: e.get("value") for e in
           template(control_plane, namespace, "Deployment", "mobilenet-web")["spec"]["containers"][0]["env"]}
    assert env["INFERSTACK_PORT"] == "8080" and env["MINE"] == "2"
    cond = wait_for(lambda: (c := control_plane.condition(namespace, "mobilenet")) and "ignored" in c["message"] and c,
                    what="a note in Ready")
    assert "spec.web.env INFERSTACK_PORT ignored: the operator sets it" in cond["message"]
    wait_for(lambda: any(e["reason"] == "IgnoredSettings" and e["type"] == "Warning"
                         for e in control_plane.events(namespace, "mobilenet")), what="an IgnoredSettings event")


def test_pod_problems_show_in_the_ready_condition(control_plane: Kube, namespace: str) -> None:
    body = example()
    body["spec"]["worker"]["podAnnotations"] = KWOK_HANDS_OFF
    body["spec"]["web"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["nowhere"]}]}]}}}
    apply(control_plane, namespace, body)
    # The scheduler's own words for the web pod that fits no node...
    cond = wait_for(lambda: (c := control_plane.condition(namespace, "mobilenet")).get("reason") == "PodsFailing"
                    and "didn't match Pod's node affinity/selector" in c["message"] and c, timeout=60,
                    what="the scheduler's reason in Ready")
    assert "is Pending (Unschedulable): 0/1 nodes are available" in cond["message"]
    # ...and a worker container crashing (its status written as a kubelet would; kwok keeps out).
    worker = wait_for(lambda: [p for p in control_plane.list("Pod", namespace, "app.kubernetes.io/component=worker")
                               if p["spec"].get("nodeName")], what="a scheduled worker pod")[0]
    name = worker["metadata"]["name"]
    control_plane.patch("Pod", namespace, name, {"status": {"phase": "Running", "containerStatuses": [{
        "name": "worker", "ready": False, "restartCount": 4, "image": "x", "imageID": "", "started": False,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}}}]}}, sub="status")
    wait_for(lambda: f"pod {name} container worker: CrashLoopBackOff (last exit code 2)"
             in control_plane.condition(namespace, "mobilenet").get("message", ""), what="CrashLoopBackOff in Ready")


def secret_text(kube: Kube, ns: str, name: str = "mobilenet") -> dict[str, str]:
    secret = kube.get("Secret", ns, f"{name}-redis-auth")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_secret_is_kept_across_resyncs_and_used_by_reference(control_plane: Kube, namespace: str) -> None:
    apply(control_plane, namespace, example())
    control_plane.kubectl("wait", "--for=condition=Ready", "infsvc/mobilenet", "-n", namespace, "--timeout=120s")
    version = control_plane.get("Secret", namespace, "mobilenet-redis-auth")["metadata"]["resourceVersion"]
    first = secret_text(control_plane, namespace)
    # A spec change makes the operator apply every child again; the passwords stay as they were.
    patch_isvc(control_plane, namespace, "mobilenet", {"worker": {"replicas": 3}})
    wait_for(lambda: control_plane.isvc(namespace, "mobilenet")["status"]["observedGeneration"] == 2,
             what="the change reconciled")
    assert control_plane.get("Secret", namespace, "mobilenet-redis-auth")["metadata"]["resourceVersion"] == version
    assert secret_text(control_plane, namespace) == first
    for tier in ("web", "worker"):
        for c in template(control_plane, namespace, "Deployment", f"mobilenet-{tier}")["spec"]["containers"]:
            (url,) = [e for e in c["env"] if e["name"] == "INFERSTACK_REDIS_URL"]
            assert url["valueFrom"]["secretKeyRef"]["name"] == "mobilenet-redis-auth"
    config = control_plane.get("ConfigMap", namespace, "mobilenet-config")
    assert not any(first["web-url"] in v for v in config["data"].values())
    hashes = {template(control_plane, namespace, kind, f"mobilenet-{tier}")["metadata"]["annotations"]
              [AUTH_HASH_ANNOTATION] for tier, kind in TIERS}
    assert len(hashes) == 1


def test_network_policy_admits_only_this_instances_pods(control_plane: Kube, namespace: str) -> None:
    apply(control_plane, namespace, example())
    apply(control_plane, namespace, example(name="other"))
    for name in ("mobilenet", "other"):
        wait_for(lambda: control_plane.get("Deployment", namespace, f"{name}-worker"), what=f"{name}'s children")
    policy = control_plane.get("NetworkPolicy", namespace, "mobilenet-redis")
    redis = template(control_plane, namespace, "StatefulSet", "mobilenet-redis")["metadata"]["labels"]

    def reaches(labels: dict[str, str]) -> bool:
        return admits(policy, target=redis, source=labels, source_namespace=namespace, port=6379)

    labels = {n: template(control_plane, namespace, "Deployment", n)["metadata"]["labels"]
              for n in ("mobilenet-web", "mobilenet-worker", "other-web", "other-worker")}
    assert reaches(labels["mobilenet-web"]) and reaches(labels["mobilenet-worker"])
    assert not reaches(labels["other-web"]) and not reaches(labels["other-worker"]) and not reaches({})
    assert secret_text(control_plane, namespace)["web-url"] != secret_text(control_plane, namespace, "other")["web-url"]


def test_ephemeral_sample_is_deleted_without_the_operator(control_plane: Kube, namespace: str,
                                                          operator: SessionOperator) -> None:
    """The chart's sample (labelled ephemeral) has no finalizer: `helm uninstall` cannot leave it stuck."""
    sample = example()
    sample["metadata"]["labels"] = {"inferstack.dev/ephemeral": "true"}
    regular = example(name="regular")
    apply(control_plane, namespace, sample)
    apply(control_plane, namespace, regular)
    wait_for(lambda: control_plane.get("Deployment", namespace, "mobilenet-worker")
             and control_plane.get("Deployment", namespace, "regular-worker"), what="both services' children")
    wait_for(lambda: control_plane.isvc(namespace, "regular")["metadata"].get("finalizers"), what="a finalizer")
    assert not control_plane.isvc(namespace, "mobilenet")["metadata"].get("finalizers")
    operator.stop()  # as after `helm uninstall` removed the operator's Deployment
    try:
        control_plane.kubectl("delete", "infsvc", "mobilenet", "-n", namespace, "--timeout=30s")
        wait_for(lambda: not control_plane.get("Deployment", namespace, "mobilenet-worker"), timeout=60,
                 what="the sample's children collected")
        control_plane.kubectl("delete", "infsvc", "regular", "-n", namespace, "--wait=false")
        assert control_plane.isvc(namespace, "regular")["metadata"]["deletionTimestamp"]  # held by its finalizer
    finally:
        operator.start()
    wait_for(lambda: control_plane.isvc(namespace, "regular") is None, timeout=60,
             what="the regular one released once the operator is back")


def test_image_allowlist_refuses_code_loading_env_and_sizes_web_from_its_settings(
        control_plane: Kube, namespace: str, operator: SessionOperator, run_operator: Any) -> None:
    from kubernetes.utils import parse_quantity

    from inferstack.contract.settings import Settings, web_memory_limit_bytes, web_tmp_bytes

    def ready() -> dict[str, Any]:
        return control_plane.condition(namespace, "mobilenet")

    operator.stop()  # the session's operator has no allowlist; this one serves only this namespace
    guarded = run_operator(f"--namespace={namespace}", env={"INFERSTACK_ALLOWED_IMAGES": "registry.io/inferstack"})
    try:
        body = example()
        body["spec"]["worker"]["env"] = [{"name": "PYTHONPATH", "value": "/mnt/models"}]
        apply(control_plane, namespace, body)
        cond = wait_for(lambda: (c := ready()).get("reason") == "InvalidSpec" and c, timeout=60,
                        what="InvalidSpec for PYTHONPATH")
        assert cond["status"] == "False" and cond["message"].startswith(
            "spec.worker.env sets PYTHONPATH: with an image allowlist"), cond
        assert control_plane.get("Deployment", namespace, "mobilenet-worker") is None  # nothing was created
        # A name that only starts like an allowed prefix is another repository.
        patch_isvc(control_plane, namespace, "mobilenet", {"worker": {"env": None,
                                                                      "image": "registry.io/inferstack-evil/x:1"}})
        wait_for(lambda: "spec.worker.image 'registry.io/inferstack-evil/x:1' is not allowed" in ready()["message"],
                 what="InvalidSpec for the look-alike image")
        # Allowed: the web pod is sized from its effective settings (the CR's field and its env).
        big = 50 * 1024 * 1024
        patch_isvc(control_plane, namespace, "mobilenet", {
            "worker": {"image": "registry.io/inferstack/worker:1"},
            "web": {"maxImageBytes": big, "env": [{"name": "INFERSTACK_DECODE_CONCURRENCY", "value": "3"}]}})
        web = wait_for(lambda: control_plane.get("Deployment", namespace, "mobilenet-web"), what="the web Deployment")
        pod = web["spec"]["template"]["spec"]
        effective = Settings(max_image_bytes=big, decode_concurrency=3)
        limit = parse_quantity(pod["containers"][0]["resources"]["limits"]["memory"])
        (tmp,) = [v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "tmp"]
        assert 0 <= limit - web_memory_limit_bytes(effective) < 2**20
        assert 0 <= parse_quantity(tmp) - web_tmp_bytes(effective) < 2**20 and parse_quantity(tmp) > 256 * 2**20
        # Read before the stop: a resync timer that fires during shutdown may log the closed client.
        log = guarded.log.read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
    finally:
        guarded.stop()
        operator.start()
