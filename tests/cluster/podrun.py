"""Run a pod template the API server holds as local processes: kwok runs no containers, we do.

For each container: its command and args, its env with Secret, ConfigMap and field references
resolved from the live objects, ``$(VAR)`` expanded. What differs from a kubelet, and why:
- volume mounts become temporary folders (Secret volumes hold their keys as files), and every
  path under a mount point in args, env and probe commands is rewritten to that folder;
- every container port is remapped to a free loopback port (pods of one node would collide on
  127.0.0.1), rewritten wherever the number stands alone in args, env and probe commands;
- cluster DNS names of Services (``<svc>.<ns>.svc.<domain>:<port>``) become 127.0.0.1 and the
  remapped port of the process behind the Service's targetPort;
- commands come from this machine (the venv's console scripts, Debian's redis-server), not the
  images; users, capabilities and resource limits are not applied.
"""

from __future__ import annotations

import base64
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from tests.kubeplane import Kube
from tools import cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Container:
    pod: str
    spec: dict[str, Any]
    ports: dict[str | int, int]  # container port number and name -> the loopback port
    mounts: dict[str, pathlib.Path]  # mountPath -> local folder
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log: pathlib.Path | None = None

    def rewrite(self, text: str) -> str:
        """Container ports, then mount paths, each in one pass (a local folder may hold either)."""
        for port, local in self.ports.items():
            if isinstance(port, int):
                text = re.sub(rf"(?<![\w.:/-]){port}(?![\w.])", str(local), text)
        if self.mounts:
            pattern = "|".join(re.escape(m) for m in sorted(self.mounts, key=len, reverse=True))
            text = re.sub(rf"(?<![\w/])({pattern})(?=/|\b|$)", lambda m: str(self.mounts[m.group(1)]), text)
        return text

    def port(self, ref: str | int) -> int:
        return self.ports[ref]


class PodRunner:
    """Starts the containers of pod templates read from the API server, in a namespace."""

    def __init__(self, kube: Kube, namespace: str, workdir: pathlib.Path, cluster_domain: str = cluster.CLUSTER_DOMAIN):
        self.kube, self.namespace, self.workdir, self.domain = kube, namespace, workdir, cluster_domain
        self.containers: list[Container] = []
        self.remapped: dict[str, str] = {}  # what a test may print: host:port as the pod saw it -> here

    # ------------------------------------------------------------ preparing

    def add(self, template: dict[str, Any], pod_name: str) -> list[Container]:
        """Prepare every container of ``template`` (a Deployment/StatefulSet pod template)."""
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        added = []
        for c in spec["containers"]:
            ports: dict[str | int, int] = {}
            for p in c.get("ports", []):
                ports[p["containerPort"]] = ports[p.get("name", p["containerPort"])] = free_port()
            mounts = {m["mountPath"]: self._volume(volumes.get(m["name"]), pod_name, m) for m in c.get("volumeMounts", [])}
            container = Container(pod_name, c, ports, mounts, dict(template["metadata"].get("labels", {})))
            self.containers.append(container)
            added.append(container)
        return added

    def _volume(self, volume: dict[str, Any] | None, pod: str, mount: dict[str, Any]) -> pathlib.Path:
        folder = pathlib.Path(tempfile.mkdtemp(prefix=f"{pod}-{mount['name']}-", dir=self.workdir))
        if volume and "secret" in volume:
            secret = self.kube.get("Secret", self.namespace, volume["secret"]["secretName"])
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in secret["data"]]
            for item in items:
                (folder / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
        return folder

    def _env(self, container: Container) -> dict[str, str]:
        spec, env = container.spec, {}
        for source in spec.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.kube.get("ConfigMap", self.namespace, source["configMapRef"]["name"])["data"])
        for var in spec.get("env", []):
            if "value" in var:
                value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
            else:
                value = self._value_from(var["valueFrom"], container.pod)
            env[var["name"]] = value
        return {k: self._services(container.rewrite(v)) for k, v in env.items()}

    def _value_from(self, ref: dict[str, Any], pod: str) -> str:
        if "secretKeyRef" in ref:
            secret = self.kube.get("Secret", self.namespace, ref["secretKeyRef"]["name"])
            return base64.b64decode(secret["data"][ref["secretKeyRef"]["key"]]).decode()
        if "configMapKeyRef" in ref:
            return self.kube.get("ConfigMap", self.namespace, ref["configMapKeyRef"]["name"])["data"][
                ref["configMapKeyRef"]["key"]]
        if ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            return pod
        raise AssertionError(f"unsupported valueFrom {ref}")

    def _services(self, text: str) -> str:
        """Cluster DNS names of this namespace's Services -> 127.0.0.1 and the process's port."""
        for svc in self.kube.list("Service", self.namespace):
            host = f"{svc['metadata']['name']}.{self.namespace}.svc.{self.domain}"
            for port in svc["spec"]["ports"]:
                target = self.backend(svc, port)
                if target is not None and f"{host}:{port['port']}" in text:
                    self.remapped[f"{host}:{port['port']}"] = f"127.0.0.1:{target}"
                    text = text.replace(f"{host}:{port['port']}", f"127.0.0.1:{target}")
        return text

    def backend(self, svc: dict[str, Any], port: dict[str, Any]) -> int | None:
        """The local port of the process behind a Service port (its selector and targetPort)."""
        selector = svc["spec"].get("selector") or {}
        for c in self.containers:
            if selector.items() <= c.labels.items() and port.get("targetPort", port["port"]) in c.ports:
                return c.ports[port.get("targetPort", port["port"])]
        return None

    # ------------------------------------------------------------ running

    def start(self, bin_dirs: list[pathlib.Path]) -> None:
        path = os.pathsep.join([*map(str, bin_dirs), os.environ.get("PATH", "")])
        for c in self.containers:
            c.env = self._env(c)
            argv = [self._services(c.rewrite(a)) for a in [*c.spec.get("command", []), *c.spec.get("args", [])]]
            argv = [re.sub(r"\$\((\w+)\)", lambda m: c.env.get(m.group(1), m.group(0)), a) for a in argv]
            argv[0] = shutil.which(argv[0], path=path) or argv[0]
            c.log = self.workdir / f"{c.pod}-{c.spec['name']}.log"
            base = {k: v for k, v in os.environ.items() if not k.startswith("INFERSTACK_")}
            c.proc = subprocess.Popen(argv, env={**base, "PATH": path, **c.env}, stdout=c.log.open("wb"),
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir)

    def stop(self) -> None:
        for c in reversed(self.containers):
            if c.proc and c.proc.poll() is None:
                c.proc.terminate()
        for c in self.containers:
            if c.proc:
                try:
                    c.proc.wait(30)
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {c.pod}/{c.spec['name']}\n" + "\n".join(
            c.log.read_text(errors="replace").splitlines()[-25:]) for c in self.containers if c.log)

    def exec_probe(self, c: Container, command: list[str]) -> bool:
        argv = [self._services(c.rewrite(a)) for a in command]
        proc = subprocess.run(argv, env={**os.environ, **c.env}, capture_output=True, timeout=10, cwd=self.workdir)
        return proc.returncode == 0


def python_bin() -> pathlib.Path:
    return pathlib.Path(sys.executable).parent
