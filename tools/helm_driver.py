"""Lint and render the chart with helm-sdkpy (embedded Helm v4), no cluster needed.

Runs under .venv-helm (Python 3.12), not the project venv: the tests call it as a
subprocess with a JSON job on stdin and read a JSON report on stdout.

helm-sdkpy has no `helm template`; it exposes `install`, whose release carries the
rendered manifest and NOTES. So this script serves a tiny in-memory Kubernetes API
(discovery, 404 on GET, 201 on POST) for Helm to install into, with HELM_DRIVER=memory
so no release Secret is stored. That is a real `helm install`: CRDs from crds/ go first,
values are checked against values.schema.json, every object must map to a served
resource, and we record exactly what Helm POSTs.

Modes: `helm_driver.py` (JSON job on stdin, JSON report on stdout, for the tests),
`helm_driver.py lint CHART` and `helm_driver.py package CHART DEST` (for make; exit 1 on failure).

Job:    {"lint": ["<chart dir>", ...],
         "render": [{"release": "r", "namespace": "ns", "chart": "<dir>", "values": {...}}, ...]}
Report: {"version": "...", "lint": [{"chart", "result"|"error"}],
         "render": [{"manifest", "notes", "posted": [{"path", "body"}], "error"}]}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import helm_sdkpy

KUBE_VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"}

# (group, version) -> [(plural, kind, namespaced)]: the kinds the chart may create.
RESOURCES = {
    ("", "v1"): [
        ("serviceaccounts", "ServiceAccount", True),
        ("services", "Service", True),
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("events", "Event", True),
        ("namespaces", "Namespace", False),
        ("pods", "Pod", True),
    ],
    ("apps", "v1"): [
        ("deployments", "Deployment", True),
        ("statefulsets", "StatefulSet", True),
    ],
    ("rbac.authorization.k8s.io", "v1"): [
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
    ("apiextensions.k8s.io", "v1"): [
        ("customresourcedefinitions", "CustomResourceDefinition", False),
    ],
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


class FakeAPI:
    """Just enough of an API server for `helm install` with client-side apply."""

    def __init__(self) -> None:
        self.posted: list[dict] = []
        self.resources = {k: list(v) for k, v in RESOURCES.items()}
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep stdout for the JSON report
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                code, body = api.get(self.path.split("?", 1)[0])
                self._send(code, body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code, body = api.post(self.path.split("?", 1)[0], json.loads(raw or b"{}"))
                self._send(code, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.posted = []
            self.resources = {k: list(v) for k, v in RESOURCES.items()}

    def get(self, path: str) -> tuple[int, dict]:
        with self.lock:
            groups = dict(self.resources)
        if path == "/version":
            return 200, KUBE_VERSION
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"],
                         "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if path == "/apis":
            items = []
            for (group, version) in groups:
                if group:
                    gv = {"groupVersion": f"{group}/{version}", "version": version}
                    items.append({"name": group, "versions": [gv], "preferredVersion": gv})
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": items}
        for (group, version), res in groups.items():
            prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
            if path == prefix:
                return 200, {
                    "kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": f"{group}/{version}" if group else version,
                    "resources": [{"name": p, "singularName": k.lower(), "namespaced": n, "kind": k, "verbs": VERBS}
                                  for p, k, n in res],
                }
        # Every object is absent: Helm checks for conflicts before it creates.
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                     "reason": "NotFound", "code": 404, "message": f"{path} not found"}

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.posted.append({"path": path, "body": body})
            if body.get("kind") == "CustomResourceDefinition":
                # Serve the new kind, as the real API server does once the CRD is established.
                spec = body["spec"]
                for v in spec["versions"]:
                    if v.get("served"):
                        self.resources.setdefault((spec["group"], v["name"]), []).append(
                            (spec["names"]["plural"], spec["names"]["kind"], spec["scope"] == "Namespaced"))
        created = dict(body)
        created["metadata"] = {**body.get("metadata", {}), "uid": f"uid-{len(self.posted)}",
                               "resourceVersion": "1", "creationTimestamp": "2025-01-01T00:00:00Z"}
        if body.get("kind") == "CustomResourceDefinition":
            created["status"] = {"conditions": [
                {"type": "Established", "status": "True"}, {"type": "NamesAccepted", "status": "True"}]}
        return 201, created


def kubeconfig(url: str, directory: str) -> str:
    path = os.path.join(directory, "kubeconfig")
    with open(path, "w") as fh:
        json.dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }, fh)
    return path


async def main() -> dict:
    job = json.load(sys.stdin)
    report: dict = {"version": helm_sdkpy.__version__, "lint": [], "render": []}
    api = FakeAPI()
    with tempfile.TemporaryDirectory() as tmp:
        kc = kubeconfig(api.url, tmp)
        for chart in job.get("lint", []):
            config = helm_sdkpy.Configuration(namespace="default", kubeconfig=kc)
            try:
                report["lint"].append({"chart": chart, "result": await helm_sdkpy.Lint(config).run(chart)})
            except helm_sdkpy.HelmError as exc:
                report["lint"].append({"chart": chart, "error": str(exc)})
        for case in job.get("render", []):
            api.reset()
            config = helm_sdkpy.Configuration(namespace=case.get("namespace", "default"), kubeconfig=kc)
            out: dict = {"manifest": "", "notes": "", "posted": [], "error": None}
            try:
                release = await helm_sdkpy.Install(config).run(
                    case.get("release", "inferstack"), case["chart"], values=case.get("values") or None,
                    wait=False, timeout=60)
                out["manifest"] = release.get("manifest", "")
                out["notes"] = (release.get("info") or {}).get("notes", "")
            except helm_sdkpy.HelmError as exc:
                out["error"] = str(exc)
            out["posted"] = api.posted
            report["render"].append(out)
    api.server.shutdown()
    return report


SEVERITIES = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


async def lint_cli(chart: str) -> int:
    """`helm lint` for make: warnings count as failures, like `helm lint --strict`."""
    result = await helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(chart)
    worst = 0
    for msg in result.get("Messages") or []:
        worst = max(worst, msg["Severity"])
        print(f"[{SEVERITIES.get(msg['Severity'], msg['Severity'])}] {msg['Path']}: {msg.get('Err')}")
    for err in result.get("Errors") or []:
        worst = 3
        print(f"[ERROR] {err}")
    print(f"{chart}: {'failed' if worst >= 2 else 'ok'} ({result.get('TotalChartsLinted')} chart linted)")
    return 1 if worst >= 2 else 0


async def package_cli(chart: str, dest: str) -> int:
    os.makedirs(dest, exist_ok=True)
    print(await helm_sdkpy.Package(helm_sdkpy.Configuration()).run(chart, dest_dir=dest))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["lint"]:
        sys.exit(asyncio.run(lint_cli(sys.argv[2])))
    if sys.argv[1:2] == ["package"]:
        sys.exit(asyncio.run(package_cli(sys.argv[2], sys.argv[3])))
    json.dump(asyncio.run(main()), sys.stdout)
