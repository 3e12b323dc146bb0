"""A real Kubernetes control plane for the chart and operator tests (a pytest plugin).

By default one local control plane (tools/cluster.py: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok) runs for the whole session. Set
``INFERSTACK_TEST_KUBECONFIG`` to run the same tests against any cluster instead; then the
checks that read the API server's audit log cannot run and say so.

Fixtures: ``control_plane`` (a ``Kube`` client as cluster admin), ``namespace`` (a fresh one
per test), ``operator_release`` (the chart installed once), ``run_operator`` (starts
``inferstack-operator`` as the chart's ServiceAccount, so RBAC is the API server's).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import yaml

from inferstack_operator import config as opconfig
from tests import helpers
from tools import cluster

REPO = pathlib.Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "inferstack"
DRIVER = REPO / "tools" / "helm_driver.py"
HELM_PYTHON = pathlib.Path(os.environ.get("INFERSTACK_HELM_PYTHON", REPO / ".venv-helm" / "bin" / "python"))
EXTERNAL_KUBECONFIG = os.environ.get("INFERSTACK_TEST_KUBECONFIG")
OPERATOR_NAMESPACE = "inferstack-system"
# The session's operator release; tests/chart installs its cases as "inferstack" beside it.
RELEASE = "ops"
ACCOUNT = f"{RELEASE}-inferstack"  # the chart's full name: its ServiceAccount, Deployment and ClusterRole
ISVC_API = f"{opconfig.GROUP}/{opconfig.VERSION}"
CRD_NAME = f"{opconfig.PLURAL}.{opconfig.GROUP}"

# kind -> (apiVersion, plural, namespaced), beyond the operator's own table.
KINDS: dict[str, tuple[str, str, bool]] = {
    **{kind: (f"{g}/{v}" if g else v, plural, True) for kind, (g, v, plural) in opconfig.RESOURCES.items()},
    "Namespace": ("v1", "namespaces", False),
    "Node": ("v1", "nodes", False),
    "PersistentVolume": ("v1", "persistentvolumes", False),
    "Event": ("v1", "events", True),
    "ServiceAccount": ("v1", "serviceaccounts", True),
    "ReplicaSet": ("apps/v1", "replicasets", True),
    "Role": ("rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "CustomResourceDefinition": ("apiextensions.k8s.io/v1", "customresourcedefinitions", False),
}


class ApiError(Exception):
    def __init__(self, code: int, body: dict[str, Any]) -> None:
        super().__init__(f"{code}: {body.get('message', body)}")
        self.code, self.body = code, body


@dataclass
class Kube:
    """A small REST client for tests: paths from kinds, JSON in and out, errors as ApiError."""

    kubeconfig: pathlib.Path
    audit_log: pathlib.Path | None = None
    kubectl_bin: str = "kubectl"
    session: requests.Session = field(init=False)
    server: str = field(init=False)

    def __post_init__(self) -> None:
        from kubernetes import client as kclient
        from kubernetes import config as kconfig

        cfg = kclient.Configuration()
        kconfig.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        self.server = cfg.host.rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the cluster's CA
        self.session.verify = cfg.ssl_ca_cert if cfg.verify_ssl else False
        if cfg.cert_file:
            self.session.cert = (cfg.cert_file, cfg.key_file)
        if cfg.api_key.get("authorization"):
            self.session.headers["Authorization"] = cfg.api_key["authorization"]

    # ------------------------------------------------------------ paths and verbs

    def path(self, kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None,
             api_version: str | None = None) -> str:
        version, plural, namespaced = KINDS[kind]
        version = api_version or version
        base = f"/api/{version}" if "/" not in version else f"/apis/{version}"
        if namespaced and namespace:
            base += f"/namespaces/{namespace}"
        return base + f"/{plural}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                params: dict[str, str] | None = None) -> dict[str, Any]:
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        rsp = self.session.request(method, self.server + path, data=data, params=params, timeout=30,
                                   headers={"Content-Type": content_type})
        payload = rsp.json() if rsp.content else {}
        if rsp.status_code >= 400:
            raise ApiError(rsp.status_code, payload)
        return payload

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None = None, selector: str = "") -> list[dict[str, Any]]:
        return self.request("GET", self.path(kind, namespace), params={"labelSelector": selector})["items"]

    def create(self, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        return self.request("POST", self.path(body["kind"], namespace or body["metadata"].get("namespace")), body)

    def apply(self, body: dict[str, Any], namespace: str | None = None, manager: str = "tests",
              force: bool = False) -> dict[str, Any]:
        ns = namespace or body["metadata"].get("namespace")
        params = {"fieldManager": manager, **({"force": "true"} if force else {})}
        return self.request("PATCH", self.path(body["kind"], ns, body["metadata"]["name"]), body,
                            "application/apply-patch+yaml", params)

    def patch(self, kind: str, namespace: str | None, name: str, body: dict[str, Any], sub: str | None = None,
              manager: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", self.path(kind, namespace, name, sub), body, "application/merge-patch+json",
                            {"fieldManager": manager} if manager else None)

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.request("DELETE", self.path(kind, namespace, name), {"propagationPolicy": "Background"})

    # ------------------------------------------------------------ conveniences

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args], input=input, text=True,
                              capture_output=True, timeout=300)  # beyond any --timeout a test passes
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def isvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(opconfig.KIND, namespace, name)

    def condition(self, namespace: str, name: str, kind: str = "Ready") -> dict[str, Any]:
        for cond in ((self.isvc(namespace, name) or {}).get("status") or {}).get("conditions") or []:
            if cond["type"] == kind:
                return cond
        return {}

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [e for e in self.list("Event", namespace) if e["involvedObject"].get("name") == name]

    def token_kubeconfig(self, service_account: str, namespace: str, path: pathlib.Path) -> pathlib.Path:
        """A kubeconfig that authenticates as ``service_account`` (a TokenRequest token)."""
        token = self.kubectl("create", "token", service_account, "-n", namespace, "--duration=4h").stdout.strip()
        ca = self.session.verify if isinstance(self.session.verify, str) else None
        cluster_entry = {"server": self.server, **({"certificate-authority": ca} if ca else
                                                   {"insecure-skip-tls-verify": True})}
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "c", "cluster": cluster_entry}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "c", "user": service_account,
                                                    "namespace": namespace}}]}))
        return path

    def audit(self) -> list[dict[str, Any]]:
        if self.audit_log is None:
            pytest.skip("the audit log is only readable on the local control plane (INFERSTACK_TEST_KUBECONFIG is set)")
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str | Callable[[], str] = "condition",
             interval: float = 0.2) -> Any:
    """``tests.helpers.wait_for`` for objects that may not be there yet: an error reading one
    (a missing key, a 404) counts as "not yet". A callable ``what`` says what it saw at the end."""
    errors: list[BaseException] = []

    def attempt() -> Any:
        try:
            return check()
        except (AssertionError, KeyError, TypeError, IndexError, ApiError) as e:
            errors[:] = [e]
            return None

    def explain() -> str:
        return (what() if callable(what) else "") + (f" (last error: {errors[0]!r})" if errors else "")

    return helpers.wait_for(attempt, timeout=timeout, what=what if isinstance(what, str) else "it",
                            interval=interval, explain=explain)


# ---------------------------------------------------------------- helm


def helm(job: dict[str, Any], kube: Kube, tmp: pathlib.Path) -> dict[str, Any]:
    """Run tools/helm_driver.py (helm-sdkpy, Python 3.12) against ``kube``'s cluster."""
    if not HELM_PYTHON.exists():
        # Fail, never skip: a missing venv would silently drop the chart checks in CI.
        pytest.fail(f"{HELM_PYTHON} not found: create it with `make .venv-helm/.stamp` "
                    "(or set INFERSTACK_HELM_PYTHON).", pytrace=False)
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp / "cache"), "HELM_CONFIG_HOME": str(tmp / "config"),
           "HELM_DATA_HOME": str(tmp / "data")}
    env.pop("KUBECONFIG", None)
    proc = subprocess.run([str(HELM_PYTHON), str(DRIVER)], input=json.dumps({"kubeconfig": str(kube.kubeconfig), **job}),
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp)
    assert proc.returncode == 0, f"helm driver failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    if EXTERNAL_KUBECONFIG:
        yield Kube(pathlib.Path(EXTERNAL_KUBECONFIG))
        return
    binaries = cluster.build()
    plane = cluster.ControlPlane(state=tmp_path_factory.mktemp("control-plane"), binaries=binaries)
    try:
        plane.start()
        plane.add_node("kwok-cpu-0")
        plane.wait_node_ready("kwok-cpu-0")
        yield Kube(plane.kubeconfig, audit_log=plane.audit_log, kubectl_bin=cluster.kubectl_path(binaries))
    except BaseException:
        for name, tail in cluster.logs(plane.state):
            print(f"--- {name}\n{tail}", file=sys.stderr)
        raise
    finally:
        plane.stop()


@pytest.fixture()
def namespace(control_plane: Kube) -> Iterator[str]:
    """A fresh namespace, deleted (with everything in it) after the test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    control_plane.delete("Namespace", None, name)


@pytest.fixture(scope="session")
def operator_release(control_plane: Kube, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The chart installed once (cluster-wide mode), as `helm install` does it."""
    report = helm({"steps": [{"action": "install", "release": RELEASE, "namespace": OPERATOR_NAMESPACE,
                              "chart": str(CHART)}]}, control_plane, tmp_path_factory.mktemp("helm"))
    (step,) = report["steps"]
    assert step["error"] is None, step["error"]
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in
                         control_plane.get("CustomResourceDefinition", None, CRD_NAME)["status"]["conditions"]), what="the CRD Established")
    return step


@dataclass
class OperatorProcess:
    proc: subprocess.Popen
    log: pathlib.Path

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def run_operator(control_plane: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., OperatorProcess]]:
    """Start ``inferstack-operator ARGS`` as a ServiceAccount; every process is stopped at the end."""
    started: list[OperatorProcess] = []
    tmp = tmp_path_factory.mktemp("operator")

    def start(*args: str, service_account: str = ACCOUNT, sa_namespace: str = OPERATOR_NAMESPACE,
              env: dict[str, str] | None = None) -> OperatorProcess:
        n = len(started)
        kubeconfig = control_plane.token_kubeconfig(service_account, sa_namespace, tmp / f"sa-{n}.kubeconfig")
        log = tmp / f"operator-{n}.log"
        proc = subprocess.Popen(
            [str(pathlib.Path(sys.executable).with_name("inferstack-operator")), *args],
            env={**os.environ, "KUBECONFIG": str(kubeconfig), **(env or {})},
            stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append(OperatorProcess(proc, log))
        return started[-1]

    yield start
    for op in started:
        op.stop()


@dataclass
class SessionOperator:
    """The session's cluster-wide operator; tests may stop, kill and start it again."""

    launch: Callable[..., OperatorProcess]
    current: OperatorProcess | None = None

    def start(self) -> OperatorProcess:
        assert self.current is None or self.current.proc.poll() is not None, "already running"
        self.current = self.launch("--all-namespaces")
        return self.current

    def stop(self) -> str:
        log = self.current.stop() if self.current else ""
        self.current = None
        return log

    def kill(self) -> None:
        """SIGKILL, as a node failure or an OOM kill would end it: no cleanup of any kind."""
        assert self.current is not None
        self.current.proc.kill()
        self.current.proc.wait()
        self.current = None


@pytest.fixture(scope="session")
def operator(operator_release: dict[str, Any], run_operator: Callable[..., OperatorProcess]) -> SessionOperator:
    """One cluster-wide operator for the session, as the chart's ServiceAccount (RBAC enforced)."""
    handle = SessionOperator(run_operator)
    handle.start()
    return handle


@pytest.fixture(scope="module")
def keda_and_prometheus(control_plane: Kube) -> Iterator[Kube]:
    """KEDA's and the Prometheus Operator's CRDs (tests/cluster/crds) for one module, removed after it."""
    files = sorted((REPO / "tests" / "cluster" / "crds").glob("*.yaml"))
    control_plane.kubectl("apply", "--server-side", *[a for f in files for a in ("-f", str(f))])
    names = [d["metadata"]["name"] for f in files for d in yaml.safe_load_all(f.read_text())]
    for name in names:
        control_plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    yield control_plane
    control_plane.kubectl("delete", "--wait=true", "--timeout=60s", *[f"crd/{n}" for n in names])
