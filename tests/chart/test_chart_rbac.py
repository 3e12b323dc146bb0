"""The chart's RBAC grants exactly what the operator declares, and covers what it really does.

Three sources, checked against the rendered (Cluster)Roles with RBAC's own matching rules:
- declared: ``inferstack_operator.rbac.RULES`` (must equal what the chart grants);
- observed: every HTTP request the operator's client sends while it reconciles the shipped
  examples against a small in-memory API server: reconcile (create, then drift repair) and
  the child-status watch handler (reads the owner, writes its status);
- framework: what kopf itself does for the handlers registered in ``inferstack_operator.handlers``
  (list/watch what they observe, patch what they track, post Events, scan CRDs and namespaces).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re

import kopf
import pytest
import yaml
from aiohttp import web  # kopf's HTTP client library, hence the operator's too
from aiohttp.test_utils import TestServer
from kopf._core.intents import registries
from kopf._core.intents.handlers import WatchingHandler

from inferstack_operator import handlers, rbac, reconcile
from inferstack_operator.config import OperatorSettings
from inferstack_operator.kube import KubeClient

from .conftest import NAMESPACE, REPO, find

Perm = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces"}
EXAMPLES = sorted((REPO / "operator" / "examples").glob("*.yaml"))
APP_NS = "prod"


def triples(rules: list[dict]) -> set[Perm]:
    out = set()
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], f"wildcard in {rule}"
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def authorized(objs: list[dict], namespace: str | None, perm: Perm, sa: str = "inferstack") -> bool:
    """RBAC's decision for the operator's ServiceAccount; namespace None means a cluster-scoped object."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs
             if o["kind"] in ("Role", "ClusterRole")}
    for binding in find(objs, "ClusterRoleBinding") + find(objs, "RoleBinding"):
        if {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} not in binding["subjects"]:
            continue
        bound_ns = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        if bound_ns is not None and bound_ns != namespace:
            continue  # a RoleBinding grants only in its own namespace, never cluster-scoped objects
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], bound_ns if ref["kind"] == "Role" else None, ref["name"]))
        if role and perm in triples(role["rules"]):
            return True
    return False


# --- observed: the operator's own client against an in-memory API ---------------------------

PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                  r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")


def to_perm(method: str, path: str, query: dict[str, str]) -> tuple[str | None, Perm]:
    m = PATH.match(path)
    assert m, f"not a resource path: {path}"
    group = m["group"] or ""
    resource = m["resource"] + (f"/{m['sub']}" if m["sub"] else "")
    if method == "GET":
        verb = "get" if m["name"] else ("watch" if query.get("watch") in ("true", "1") else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
    return m["ns"], (group, resource, verb)


DISCOVERY = re.compile(r"^/(api/v1|apis/[^/]+/[^/]+)$")


class FakeAPI:
    """Stores what it is sent; GET answers from the store (or 404), like an API server would."""

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        if request.method == "GET" and DISCOVERY.match(path):
            # Every optional API is served; discovery needs no RBAC (system:discovery).
            return web.json_response({"kind": "APIResourceList", "groupVersion": path.split("/apis/")[-1]})
        self.requests.append((request.method, path, dict(request.query)))
        if request.method == "PATCH" and not path.endswith("/status") and path not in self.objects:
            # A server-side apply that creates the object is authorized as create too.
            self.requests.append(("POST", path.rsplit("/", 1)[0], {}))
        if request.method == "GET":
            obj = self.objects.get(path)
            return web.json_response(obj) if obj else web.json_response({"kind": "Status", "code": 404}, status=404)
        body = await request.json()
        for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("blockOwnerDeletion"):
                # OwnerReferencesPermissionEnforcement: setting it needs update on the owner's finalizers.
                owner = f"/apis/{ref['apiVersion']}/namespaces/{path.split('/')[-3]}/inferenceservices/{ref['name']}"
                self.requests.append(("PUT", f"{owner}/finalizers", {}))
        if request.method == "POST":
            obj = copy.deepcopy(body)
            obj["metadata"]["uid"] = f"uid-{len(self.objects)}"
            self.objects[f"{path}/{obj['metadata']['name']}"] = obj
            return web.json_response(obj, status=201)
        if request.method == "PATCH" and path.endswith("/status"):
            self.objects.setdefault(path[: -len("/status")], {}).update(status=body["status"])
            return web.json_response(self.objects[path[: -len("/status")]])
        self.objects[path] = copy.deepcopy(body)
        return web.json_response(body)


async def exercise(example: dict) -> list[tuple[str, str, dict[str, str]]]:
    api = FakeAPI()
    server = TestServer(api.app)
    await server.start_server()
    kube = KubeClient()
    kube.login(kopf.ConnectionInfo(server=str(server.make_url("")).rstrip("/")))
    raw = copy.deepcopy(example)
    raw["metadata"].update(namespace=APP_NS, uid="owner-uid", generation=1)
    name = raw["metadata"]["name"]
    # Any pvc:// location the example names exists (check_claims reads it first).
    for claim in set(re.findall(r"pvc://([^/]+)/", yaml.safe_dump(raw["spec"]))):
        api.objects[f"/api/v1/namespaces/{APP_NS}/persistentvolumeclaims/{claim}"] = {"metadata": {"name": claim}}
    settings = OperatorSettings()
    try:
        body = kopf.Body(raw)
        first = await reconcile.reconcile(body, kube, settings)
        assert first.created, "nothing created on an empty cluster"
        # Hand-edit every Deployment: the next pass must re-apply them (server-side apply).
        for path, obj in api.objects.items():
            if obj.get("kind") == "Deployment":
                obj["spec"]["revisionHistoryLimit"] = 42
        second = await reconcile.reconcile(body, kube, settings)
        assert second.updated, "drift was not repaired"
        # A child's status changed: the watch handler reads the owner and its children, writes status.
        api.objects[f"/apis/inferstack.dev/v1alpha1/namespaces/{APP_NS}/inferenceservices/{name}"] = raw
        child = next(o for o in api.objects.values() if o.get("kind") == "Deployment")
        memo = kopf.Memo(kube=kube, locks={})
        await handlers.child_changed(body=kopf.Body(child), memo=memo, logger=logging.getLogger(__name__))
        assert api.objects[f"/apis/inferstack.dev/v1alpha1/namespaces/{APP_NS}/inferenceservices/{name}"].get(
            "status"), "child_changed wrote no status"
    finally:
        await kube.close()
        await server.close()
    return api.requests


@pytest.fixture(scope="module")
def observed() -> set[tuple[str | None, Perm]]:
    assert EXAMPLES, "operator/examples/*.yaml: nothing to reconcile"
    out = set()
    for path in EXAMPLES:
        for method, req_path, query in asyncio.run(exercise(yaml.safe_load(path.read_text()))):
            out.add(to_perm(method, req_path, query))
    return out


# --- framework: what kopf does for the registered handlers ----------------------------------

def framework_perms(clusterwide: bool) -> set[Perm]:
    registry = registries.get_default_registry()
    assert handlers.reconcile_stack  # the module is imported: its decorators have registered
    perms: set[Perm] = set()
    for hd in registry._watching.get_all_handlers() + registry._changing.get_all_handlers() \
            + registry._spawning.get_all_handlers() + registry._indexing.get_all_handlers():
        sel = hd.selector
        resource = sel.plural or sel.any_name
        perms |= {(sel.group or "", resource, "list"), (sel.group or "", resource, "watch")}
        if not isinstance(hd, WatchingHandler):
            # Change-tracking handlers and timers store progress/diff-base/finalizers on the object.
            perms.add((sel.group or "", resource, "patch"))
    settings = kopf.OperatorSettings()
    if settings.posting.enabled:
        perms.add(("", "events", "create"))
    if not settings.scanning.disabled:
        perms |= {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                  ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
        if not clusterwide:
            perms |= {("", "namespaces", "list"), ("", "namespaces", "watch")}
    return perms


# --- the tests ------------------------------------------------------------------------------

def test_chart_grants_exactly_the_declared_rules(rendered: dict) -> None:
    declared = triples(rbac.RULES)
    objs = rendered["default"]["objects"]
    (cluster_role,) = find(objs, "ClusterRole")
    # All namespaces: one ClusterRole; kopf never lists namespaces then, so that rule is left out.
    assert triples(cluster_role["rules"]) == {p for p in declared if p[1] != "namespaces"}
    assert find(objs, "Role") == []

    objs = rendered["namespaced"]["objects"]
    (cluster_role,) = find(objs, "ClusterRole")
    assert triples(cluster_role["rules"]) == {p for p in declared if p[1] in rbac.CLUSTER_SCOPED_RESOURCES}
    roles = find(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert triples(role["rules"]) == {p for p in declared if p[1] not in rbac.CLUSTER_SCOPED_RESOURCES}
    assert sorted(b["metadata"]["namespace"] for b in find(objs, "RoleBinding")) == ["team-a", "team-b"]


def test_declared_cluster_scoped_resources() -> None:
    assert rbac.CLUSTER_SCOPED_RESOURCES == CLUSTER_SCOPED


def test_every_observed_request_is_allowed(rendered: dict, observed: set) -> None:
    kinds = {perm[1] for _, perm in observed}
    # The walk reached every kind of child and the status subresource.
    assert {"deployments", "statefulsets", "services", "configmaps", "secrets", "networkpolicies",
            "inferenceservices/status", "inferenceservices", "inferenceservices/finalizers"} <= kinds, kinds
    assert {perm[2] for _, perm in observed} >= {"get", "create", "patch"}
    for ns, perm in sorted(observed, key=str):
        assert ns == APP_NS, f"request outside the resource's namespace: {perm}"
        assert perm in triples(rbac.RULES), f"operator sends {perm} but rbac.RULES lacks it"
        assert authorized(rendered["default"]["objects"], ns, perm), f"all-namespaces chart forbids {perm}"
        namespaced = rendered["namespaced"]["objects"]
        assert authorized(namespaced, "team-a", perm), f"namespaced chart forbids {perm} in team-a"
        assert not authorized(namespaced, APP_NS, perm), f"namespaced chart leaks {perm} to {APP_NS}"


@pytest.mark.parametrize("mode", ["default", "namespaced"])
def test_kopf_framework_calls_are_allowed(rendered: dict, mode: str) -> None:
    objs = rendered[mode]["objects"]
    namespace = "team-b" if mode == "namespaced" else APP_NS
    for perm in sorted(framework_perms(clusterwide=mode == "default")):
        assert perm in triples(rbac.RULES), f"kopf needs {perm} but rbac.RULES lacks it"
        scope = None if perm[1] in CLUSTER_SCOPED else namespace
        assert authorized(objs, scope, perm), f"{mode}: kopf needs {perm}"


def test_no_rbac_without_rbac_create(rendered: dict) -> None:
    objs = rendered["paused-no-rbac"]["objects"]
    assert not authorized(objs, APP_NS, ("apps", "deployments", "create"))


def test_bindings_follow_a_custom_service_account(rendered: dict) -> None:
    objs = rendered["custom-images"]["objects"]
    assert authorized(objs, APP_NS, ("apps", "deployments", "create"), sa="ml-operator")
    assert not authorized(objs, APP_NS, ("apps", "deployments", "create"), sa="inferstack")
