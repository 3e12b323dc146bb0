"""Fixtures for the operator tests: a kmock-based API server with the fidelity kopf needs."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import pathlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jsonpatch
import kmock
import pytest
import pytest_asyncio
import yaml

# The 1 s test timer interval is set in tests/conftest.py, before anything imports the handlers.

from kmock._internal import dicts as kmock_dicts  # noqa: E402  (merge-patch semantics kmock uses)

REPO = pathlib.Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "operator" / "inferstack_operator" / "crd.yaml"
EXAMPLES = REPO / "operator" / "examples"
NAMESPACE = "ml"
ISVC = "/apis/inferstack.dev/v1alpha1/namespaces/ml/inferenceservices"


RESOURCES: dict[str, dict[str, Any]] = {
    "inferstack.dev/v1alpha1/inferenceservices": dict(
        kind="InferenceService", singular="inferenceservice", namespaced=True, shortnames={"infsvc"},
        subresources={"status"}),
    "apps/v1/deployments": dict(kind="Deployment", singular="deployment", namespaced=True,
                                subresources={"status", "scale"}),
    "autoscaling/v2/horizontalpodautoscalers": dict(kind="HorizontalPodAutoscaler", singular="horizontalpodautoscaler",
                                                    namespaced=True, subresources={"status"}),
    "apps/v1/statefulsets": dict(kind="StatefulSet", singular="statefulset", namespaced=True,
                                 subresources={"status", "scale"}),
    "v1/services": dict(kind="Service", singular="service", namespaced=True, subresources={"status"}),
    "v1/configmaps": dict(kind="ConfigMap", singular="configmap", namespaced=True),
    "v1/secrets": dict(kind="Secret", singular="secret", namespaced=True),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy", singular="networkpolicy", namespaced=True),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", singular="persistentvolumeclaim",
                                      namespaced=True, subresources={"status"}),
    "v1/pods": dict(kind="Pod", singular="pod", namespaced=True, subresources={"status"}),
    "v1/events": dict(kind="Event", singular="event", namespaced=True),
    "v1/namespaces": dict(kind="Namespace", singular="namespace", namespaced=False, subresources={"status"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
        subresources={"status"}),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


class Cluster(kmock.KubernetesEmulator):
    """kmock's emulator plus what kopf and our assertions rely on.

    Added: uid/creationTimestamp/resourceVersion/generation (bumped on spec changes),
    the status subresource (status writes only touch status, main writes never do),
    JSON-patch ``test`` failures as HTTP 422, and a garbage collector for ownerReferences.
    Server-side apply, for one field manager per object: an apply-patch to a missing object
    creates it, and fields of the previous apply that the next one omits are removed (maps
    only; lists are replaced whole).
    Not emulated: admission/defaulting/validation, field ownership across managers,
    controllers (no pods, no status: tests write those).
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)
        self._rv = 0
        self._applied: dict[Any, Any] = {}  # (resource, namespace, name) -> the last apply body

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        payload["metadata"]["resourceVersion"] = str(self._rv)
        # Equality-based labelSelector ("a=b,c=d"), which kmock ignores.
        wanted = dict(term.split("=", 1) for term in request.params.get("labelSelector", "").split(",") if term)
        if wanted:
            payload["items"] = [item for item in payload["items"]
                                if wanted.items() <= (item.get("metadata", {}).get("labels") or {}).items()]
        return payload

    async def _serve_watch(self, request: kmock.Request) -> Any:
        # kmock replays every existing object as ADDED on each watch; a real server sends only
        # what changed after the listed resourceVersion. Duplicates made kopf race itself.
        since = request.params.get("resourceVersion", "")
        async for event in super()._serve_watch(request):
            if since.isdigit() and isinstance(event, dict) and event.get("type") in ("ADDED", "MODIFIED"):
                rv = event.get("object", {}).get("metadata", {}).get("resourceVersion", "")
                if rv.isdigit() and int(rv) <= int(since):
                    continue
            yield event

    def _has_status(self, resource: Any) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    def _live(self, resource: Any, namespace: str | None, name: str) -> Any | None:
        key = (resource, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key]
        return None

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.name and \
                request.headers.get("Content-Type", "").startswith("application/apply-patch"):
            self._server_side_apply(request)
        if request.resource is not None:
            self._prepare(request)
        response = await super()._handle(request)
        # A DELETE, or a PATCH that released the last finalizer, may have removed an owner.
        if request.action in (kmock.action.DELETE, kmock.action.UPDATE) and request.name:
            if self._live(request.resource, request.namespace, request.name) is None:
                await self._collect_garbage()
        return response

    def _server_side_apply(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        body = request.data
        previous = self._applied.get(key) if self._live(*key) is not None else None
        self._applied[key] = copy.deepcopy(body)
        if self._live(*key) is None:
            # Apply creates what is missing (kmock's requests are frozen; this one is ours to route).
            object.__setattr__(request, "action", kmock.action.CREATE)
            body.setdefault("metadata", {}).pop("resourceVersion", None)
        elif previous is not None:
            _null_removed(previous, body)

    def _prepare(self, request: kmock.Request) -> None:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("namespace", request.namespace)
            if meta.get("namespace") is None:
                del meta["namespace"]
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = self._next_rv()
            meta["generation"] = 1
            meta["creationTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        elif request.action == kmock.action.UPDATE and request.name is not None:
            obj = self._live(request.resource, request.namespace, request.name)
            if obj is None:
                return  # kmock answers 404
            old = copy.deepcopy(obj.raw)
            status_only = request.subresource == "status"
            if isinstance(data, dict):
                if status_only:
                    for key in [k for k in data if k != "status"]:
                        del data[key]
                elif self._has_status(request.resource):
                    data.pop("status", None)
                new = kmock_dicts.merge_patch_dict(old, data)
            elif isinstance(data, list):
                keep = [op for op in data if (op.get("path", "").startswith("/status")) == status_only
                        or op.get("op") == "test" or not self._has_status(request.resource)]
                data[:] = keep
                try:
                    new = jsonpatch.apply_patch(old, data, in_place=False)
                except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as e:
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e
            else:
                return
            rv = self._next_rv()
            generation = old.get("metadata", {}).get("generation", 1)
            if new.get("spec") != old.get("spec"):
                generation += 1
            if isinstance(data, dict):
                data.setdefault("metadata", {}).update({"resourceVersion": rv, "generation": generation})
            else:
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
                data.append({"op": "add", "path": "/metadata/generation", "value": generation})

    async def _collect_garbage(self) -> None:
        # Like the cluster's garbage collector (background propagation): dependents of a gone owner go too.
        while True:
            alive = {o.raw["metadata"].get("uid") for o in self.objects.values() if not o.deleted}
            orphans = [
                (key, obj) for key, obj in self.objects.items()
                if not obj.deleted and (refs := obj.raw.get("metadata", {}).get("ownerReferences"))
                and not any(ref.get("uid") in alive for ref in refs)
            ]
            if not orphans:
                return
            async with self._lock:
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})


def _null_removed(previous: dict[str, Any], body: dict[str, Any]) -> None:
    """Set to None (merge-patch delete) the keys the previous apply had and this one lacks."""
    for key, value in previous.items():
        if key not in body:
            body[key] = None
        elif isinstance(value, dict) and isinstance(body[key], dict):
            _null_removed(value, body[key])


def kubeconfig_text(url: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        "current-context": "emulator",
    })


async def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy without raising."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return result
            last = None
        except (AssertionError, KeyError, ValueError, TypeError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f": {last!r}" if last else ""))
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture()
async def cluster(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with Cluster() as emulator, kmock.Server(emulator) as server:
        path = tmp_path / "kubeconfig"
        path.write_text(kubeconfig_text(str(server.url).rstrip("/")))
        monkeypatch.setenv("KUBECONFIG", str(path))
        # The official client fixes its default kubeconfig path at import time.
        import kubernetes.config.kube_config as kube_config
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
        crd = yaml.safe_load(CRD_PATH.read_text())
        rsp = await emulator.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd)
        assert rsp.status == 200, await rsp.text()
        # No Namespace object: kmock cannot parse /api/v1/namespaces (it reads "namespaces" as the
        # namespace prefix), and in --all-namespaces mode kopf does not list namespaces anyway.
        yield emulator


@contextlib.asynccontextmanager
async def running_operator(cluster: Cluster) -> AsyncIterator[Cluster]:
    """The real operator (handlers module, kopf's reactor) running against ``cluster`` inside the block.

    kopf gets its own thread and event loop, as in production: in the test's loop, its
    shutdown would cancel every task started after it (pytest-asyncio's teardown included).
    """
    import kopf

    import inferstack_operator.handlers  # noqa: F401  (registers the handlers)

    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready))
        except BaseException as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, ready.wait, 15), f"operator did not start: {errors}"
    try:
        yield cluster
    finally:
        stop.set()
        await loop.run_in_executor(None, thread.join, 20)
        assert not thread.is_alive(), "operator did not stop"
        assert not errors, errors


@pytest_asyncio.fixture()
async def operator(cluster: Cluster) -> AsyncIterator[Cluster]:
    """The real operator running against ``cluster`` for the whole test."""
    async with running_operator(cluster):
        yield cluster
