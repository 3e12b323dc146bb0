"""A small async Kubernetes API client for the children, on the credentials kopf logs in with.

kopf has no public client for arbitrary objects; the official client is synchronous and its
generated API changes between releases. A second async client (lightkube, kr8s,
kubernetes_asyncio) would log in on its own, in parallel to kopf: two credential paths to keep
in step (exec plugins, token refresh) where this one reuses kopf's, which re-logs in on 401.
Plain JSON over aiohttp (already a kopf dependency) does the handful of calls we need: get,
list, discovery, delete, server-side apply (which also creates, so one field manager owns every field
we set, and a field we stop sending is removed), merge-patch status. TLS: the server CA from
the kubeconfig or service account, client certificates, and verification always on unless
the kubeconfig says insecure-skip-tls-verify.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from inferstack_operator.config import FIELD_MANAGER, RESOURCES


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def api_prefix(group: str, version: str) -> str:
    return f"/apis/{group}/{version}" if group else f"/api/{version}"


def object_path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    group, version, plural = RESOURCES[kind]
    path = f"{api_prefix(group, version)}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def _as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif info.ca_path or info.ca_data:
        cadata = None
        if info.ca_data:
            raw = _as_bytes(info.ca_data)
            # kubeconfigs carry base64; some loaders hand over the PEM itself.
            cadata = raw.decode() if raw.lstrip().startswith(b"-----") else base64.b64decode(raw).decode()
        ctx = ssl.create_default_context(cafile=os.fspath(info.ca_path) if info.ca_path else None, cadata=cadata)
    else:
        ctx = ssl.create_default_context()
    cert, key = info.certificate_path, info.private_key_path
    tmp: list[str] = []
    try:
        for data, is_cert in ((info.certificate_data, True), (info.private_key_data, False)):
            if data:
                raw = _as_bytes(data)
                pem = raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)
                fd, path = tempfile.mkstemp(prefix="inferstack-")
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                tmp.append(path)
                if is_cert:
                    cert = path
                else:
                    key = path
        if cert:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
    finally:
        for path in tmp:
            os.unlink(path)
    return ctx


class KubeClient:
    """JSON calls against the API server kopf is logged in to (``credentials`` set by login)."""

    def __init__(self) -> None:
        self.credentials: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_for: kopf.ConnectionInfo | None = None

    def login(self, info: kopf.ConnectionInfo) -> None:
        self.credentials = info

    async def _get_session(self) -> tuple[aiohttp.ClientSession, kopf.ConnectionInfo]:
        info = self.credentials
        if info is None:
            raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=5)
        if self._session is None or self._session.closed or self._session_for is not info:
            # Swap before awaiting anything: concurrent handlers must not each open a session.
            old = self._session
            self._session = aiohttp.ClientSession(
                base_url=info.server.rstrip("/") + "/",
                connector=aiohttp.TCPConnector(ssl=_ssl_context(info), limit=20),
                headers={"Accept": "application/json", "User-Agent": FIELD_MANAGER, **info.as_http_headers()},
                timeout=aiohttp.ClientTimeout(total=30),
            )
            self._session_for = info
            if old is not None:
                await old.close()
        return self._session, info

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """The decoded response; None for 404. Other errors raise ``ApiError``."""
        session, _ = await self._get_session()
        headers = {"Content-Type": content_type} if body is not None else {}
        async with session.request(method, path.lstrip("/"), json=body, params=params, headers=headers) as rsp:
            if rsp.status == 404:
                return None
            if rsp.status >= 400:
                try:
                    payload = await rsp.json(content_type=None)
                    message = payload.get("message") or str(payload)
                except (ValueError, aiohttp.ContentTypeError, AttributeError):
                    message = await rsp.text()
                raise ApiError(rsp.status, message)
            result: dict[str, Any] = await rsp.json(content_type=None)
            return result

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.request("GET", object_path(kind, namespace, name))

    async def list_objects(self, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        result = await self.request("GET", object_path(kind, namespace), params={"labelSelector": label_selector})
        return list((result or {}).get("items") or [])

    async def served(self, api_version: str) -> bool:
        """Whether the cluster serves ``group/version`` (e.g. a CRD's API is installed)."""
        group, _, version = api_version.rpartition("/")
        return await self.request("GET", api_prefix(group, version)) is not None

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply (creates when missing): we own exactly the fields we send; fields we
        stop sending go away."""
        meta = manifest["metadata"]
        result = await self.request(
            "PATCH", object_path(manifest["kind"], meta["namespace"], meta["name"]),
            body=manifest,  # JSON is YAML, which apply-patch+yaml accepts
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )
        if result is None:
            raise ApiError(404, f"{manifest['kind']} {meta['name']!r} disappeared while being updated")
        return result

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete one object (its dependents go with it, in the background); gone already is fine."""
        await self.request("DELETE", object_path(kind, namespace, name))

    async def patch_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        await self.request("PATCH", object_path(kind, namespace, name, "status"), body={"status": dict(status)},
                           content_type="application/merge-patch+json")
