"""A local Kubernetes control plane, the way controller-runtime's envtest and kwok run one.

Real etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built from the pinned
modules in ``cluster/go.mod`` (kwok from ``cluster/kwok/go.mod``), started on free loopback ports
with generated certificates, ``--authorization-mode=Node,RBAC``, service-account token signing
and an audit log. No kubelet: kwok plays the nodes, so pods scheduled on them become Running and
Ready, and Deployments report ready replicas. Nothing runs in the pods.

``python -m tools.cluster`` (``make cluster``) runs one in the foreground and writes an admin
kubeconfig to ``.cluster/kubeconfig``; Ctrl-C stops it all. The tests start one per session
(``tests/cluster/conftest.py``) through ``ControlPlane``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import ipaddress
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from inferstack_operator.config import OperatorSettings

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "cluster"
KWOK_DIR = MODULE_DIR / "kwok"
DEFAULT_STATE = REPO / ".cluster"
# Binaries are cached outside the checkout so every clone on the machine shares one build.
CACHE_ENV = "INFERSTACK_CLUSTER_CACHE"
DEFAULT_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "inferstack" / "cluster"
K8S_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
BINARIES = (*K8S_COMMANDS, "etcd", "kwok")
# The machine's kubectl is the one users have; only where there is none do we build the pinned one.
KUBECTL_ENV = "INFERSTACK_KUBECTL"

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"  # kwok hands out pod IPs from here; nothing listens on them
# The operator's default domain, so in-cluster names it writes resolve as in a default cluster.
CLUSTER_DOMAIN = OperatorSettings.cluster_domain
SA_ISSUER = f"https://kubernetes.default.svc.{CLUSTER_DOMAIN}"
# kwok only manages nodes carrying this annotation (kwok's own convention).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# Pods with this annotation keep the status a test writes (kwok leaves them alone).
KWOK_STATUS_ANNOTATION = {"kwok.x-k8s.io/status": "custom"}
GPU_RESOURCE = "nvidia.com/gpu"


def pinned_versions() -> dict[str, str]:
    """The versions ``cluster/go.mod`` pins: kubernetes, etcd and kwok."""
    main, kwok = (MODULE_DIR / "go.mod").read_text(), (KWOK_DIR / "go.mod").read_text()

    def version(text: str, module: str) -> str:
        match = re.search(rf"^(?:require)?\s*{re.escape(module)} (v\S+)", text, re.MULTILINE)
        assert match, f"{module} is not pinned"
        return match.group(1)

    return {"kubernetes": version(main, "k8s.io/kubernetes"), "etcd": version(main, "go.etcd.io/etcd/server/v3"),
            "kwok": version(kwok, "sigs.k8s.io/kwok")}


# ---------------------------------------------------------------- build


def _build_key() -> str:
    digest = hashlib.sha256()
    for path in (MODULE_DIR / "go.mod", MODULE_DIR / "go.sum", MODULE_DIR / "etcd" / "main.go",
                 KWOK_DIR / "go.mod", KWOK_DIR / "go.sum"):
        digest.update(path.read_bytes())
    digest.update(subprocess.run(["go", "version"], capture_output=True, text=True, check=True).stdout.encode())
    return digest.hexdigest()[:16]


def _version_ldflags(version: str) -> str:
    # Without these the binaries report v0.0.0 and clients (helm's kubeVersion check) refuse them.
    major, minor = version.lstrip("v").split(".")[:2]
    stamp = {"gitVersion": version, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"}
    flags = [f"-X k8s.io/{pkg}/version.{key}={value}"
             for pkg in ("component-base", "client-go/pkg") for key, value in stamp.items()]
    return " ".join(["-s", "-w", *flags])


def build(cache: pathlib.Path | None = None, log: Any = sys.stderr) -> pathlib.Path:
    """Build (once per pinned go.mod and Go version) and return the folder holding the binaries."""
    cache = pathlib.Path(os.environ.get(CACHE_ENV) or cache or DEFAULT_CACHE)
    versions = pinned_versions()
    out = cache / f"k8s-{versions['kubernetes']}-{_build_key()}"
    commands = list(K8S_COMMANDS) + ([] if shutil.which("kubectl") else ["kubectl"])
    if all((out / name).is_file() for name in BINARIES) and (shutil.which("kubectl") or (out / "kubectl").is_file()):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="build-", dir=cache))
    started = time.monotonic()
    print(f"building the control plane {versions} into {out} (once; Go's build cache serves rebuilds)",
          file=log, flush=True)
    env = dict(os.environ)
    subprocess.run(["go", "build", "-trimpath", "-buildvcs=false", "-ldflags", _version_ldflags(versions["kubernetes"]), "-o", f"{tmp}/",
                    *(f"k8s.io/kubernetes/cmd/{name}" for name in commands), "./etcd"],
                   cwd=MODULE_DIR, env=env, check=True)
    subprocess.run(["go", "build", "-trimpath", "-buildvcs=false", "-ldflags", "-s -w", "-o", f"{tmp}/", "sigs.k8s.io/kwok/cmd/kwok"],
                   cwd=KWOK_DIR, env=env, check=True)
    if out.exists():  # an earlier build (or a concurrent one): keep it, add what this one adds
        for path in tmp.iterdir():
            if not (out / path.name).exists():
                path.rename(out / path.name)
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    print(f"built in {time.monotonic() - started:.0f} s", file=log, flush=True)
    return out


# ---------------------------------------------------------------- certificates


@dataclass
class Pki:
    """A CA, the API server's serving certificate, client certificates and the SA signing key."""

    folder: pathlib.Path

    def create(self) -> Pki:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        self.folder.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        self._write_key("ca", ca_key)
        self._write_cert("ca", self._cert("inferstack-local-ca", [], ca_key, ca_key, None, ca=True))
        hosts = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 f"kubernetes.default.svc.{CLUSTER_DOMAIN}", "127.0.0.1",
                 str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))]
        self._issue("apiserver", "kube-apiserver", [], ca_key, hosts)
        for name, cn, orgs in (("admin", "kubernetes-admin", ["system:masters"]),
                               ("controller-manager", "system:kube-controller-manager", []),
                               ("scheduler", "system:kube-scheduler", []),
                               ("kwok", "kwok-controller", ["system:masters"])):
            self._issue(name, cn, orgs, ca_key, [])
        self._write_key("sa", rsa.generate_private_key(public_exponent=65537, key_size=2048), public=True)
        return self

    def path(self, name: str) -> pathlib.Path:
        return self.folder / name

    def _issue(self, name: str, cn: str, orgs: list[str], ca_key: Any, hosts: list[str]) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        self._write_key(name, key)
        self._write_cert(name, self._cert(cn, orgs, key, ca_key, hosts, ca=False))

    def _cert(self, cn: str, orgs: list[str], key: Any, ca_key: Any, hosts: list[str] | None, ca: bool) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
                            + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer = subject if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inferstack-local-ca")])
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=7))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                            critical=True)
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if hosts:
            names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def _write_key(self, name: str, key: Any, public: bool = False) -> None:
        from cryptography.hazmat.primitives import serialization

        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self.path(f"{name}.key").write_bytes(pem)
        self.path(f"{name}.key").chmod(0o600)
        if public:
            self.path(f"{name}.pub").write_bytes(key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _write_cert(self, name: str, cert: Any) -> None:
        from cryptography.hazmat.primitives import serialization

        self.path(f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def kubeconfig(server: str, ca: pathlib.Path, user: dict[str, str], name: str = "inferstack-local") -> str:
    """A kubeconfig for ``server``; ``user`` is a kubeconfig user entry (client cert or token)."""
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    })


def kubectl_path(binaries: pathlib.Path) -> str:
    """``$INFERSTACK_KUBECTL``, else the machine's kubectl, else the one ``build`` made."""
    return os.environ.get(KUBECTL_ENV) or shutil.which("kubectl") or str(binaries / "kubectl")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- processes


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
    "omitStages": ["RequestReceived"],
    # Metadata is who, what and the answer's code: enough to prove least privilege.
    "rules": [{"level": "Metadata"}],
}


@dataclass
class ControlPlane:
    """One local control plane. ``start()``, then ``kubeconfig`` (admin) and ``server``."""

    state: pathlib.Path
    binaries: pathlib.Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.state / "kubeconfig"

    @property
    def audit_log(self) -> pathlib.Path:
        return self.state / "audit.log"

    @property
    def ca(self) -> pathlib.Path:
        return self.state / "pki" / "ca.crt"

    def start(self, timeout: float = 120.0) -> ControlPlane:
        self.state.mkdir(parents=True, exist_ok=True)
        pki = Pki(self.state / "pki").create()
        self.ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver")}
        for name in ("admin", "controller-manager", "scheduler", "kwok"):
            path = self.state / ("kubeconfig" if name == "admin" else f"{name}.kubeconfig")
            path.write_text(kubeconfig(self.server, pki.path("ca.crt"), {
                "client-certificate": str(pki.path(f"{name}.crt")), "client-key": str(pki.path(f"{name}.key"))}))
        try:
            self._spawn("etcd", self._etcd_args())
            self._spawn("kube-apiserver", self._apiserver_args(pki))
            self._wait_healthy(timeout)
            self._spawn("kube-controller-manager", self._controller_manager_args(pki))
            self._spawn("kube-scheduler", self._scheduler_args())
            self._spawn("kwok", self._kwok_args())
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.state / f"{name}.log").open("ab")
        # A session of its own: Ctrl-C in `make cluster` reaches us, and we stop them in order.
        self.procs[name] = subprocess.Popen([str(self.binaries / name), *args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def _etcd_args(self) -> list[str]:
        client, peer = f"http://127.0.0.1:{self.ports['etcd']}", f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return ["--name=local", f"--data-dir={self.state / 'etcd'}", f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}", f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=local={peer}",
                "--unsafe-no-fsync=true",  # a throwaway test store: durability buys nothing
                "--log-level=warn"]

    def _apiserver_args(self, pki: Pki) -> list[str]:
        policy = self.state / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        return [f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                f"--tls-cert-file={pki.path('apiserver.crt')}", f"--tls-private-key-file={pki.path('apiserver.key')}",
                f"--client-ca-file={pki.path('ca.crt')}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki.path('sa.pub')}",
                f"--service-account-signing-key-file={pki.path('sa.key')}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                "--audit-log-maxsize=0",  # one file: the tests read all of it
                "--allow-privileged=true",
                # Checks the operator may set blockOwnerDeletion on its children (a rule the chart grants).
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                f"--cert-dir={self.state / 'pki'}"]

    def _controller_manager_args(self, pki: Pki) -> list[str]:
        kube = self.state / "controller-manager.kubeconfig"
        return [f"--kubeconfig={kube}", f"--authentication-kubeconfig={kube}", f"--authorization-kubeconfig={kube}",
                "--use-service-account-credentials=true",  # each controller as its own account, as in a cluster
                f"--service-account-private-key-file={pki.path('sa.key')}", f"--root-ca-file={pki.path('ca.crt')}",
                f"--cluster-cidr={POD_CIDR}", f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
                "--concurrent-gc-syncs=5",
                # kwok heartbeats its nodes every 20-45 s (55 s seen under load), past the default 50 s grace:
                # the node flapped NotReady for 5 s each minute, and each flap marked every pod on it not
                # ready for good (kwok does not re-mark them), failing whichever test then waited for one.
                "--node-monitor-grace-period=10m",
                # Tests create and delete many namespaces: the default 20 requests/s fell behind.
                "--kube-api-qps=200", "--kube-api-burst=400"]

    def _scheduler_args(self) -> list[str]:
        kube = self.state / "scheduler.kubeconfig"
        return [f"--kubeconfig={kube}", f"--authentication-kubeconfig={kube}", f"--authorization-kubeconfig={kube}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}"]

    def _kwok_args(self) -> list[str]:
        return [f"--kubeconfig={self.state / 'kwok.kubeconfig'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                # Pods so annotated keep the status a test writes (a crash loop, an image pull error).
                "--disregard-status-with-annotation-selector=" + ",".join(f"{k}={v}" for k, v in KWOK_STATUS_ANNOTATION.items()),
                f"--cidr={POD_CIDR.replace('.0/16', '.1/16')}", "--node-ip=10.244.0.1",
                f"--server-address=127.0.0.1:{free_port()}"]

    def _wait_healthy(self, timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(self.state / "pki" / "admin.crt", self.state / "pki" / "admin.key")
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.state / (name + '.log')}")
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=context, timeout=5) as rsp:
                    if rsp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.25)
        raise TimeoutError(f"kube-apiserver not ready after {timeout:.0f} s: {last}")

    def stop(self) -> None:
        for name in ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ------------------------------------------------------------ nodes

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([kubectl_path(self.binaries), f"--kubeconfig={self.kubeconfig}", *args], input=input,
                              text=True,
                              capture_output=True, check=check)

    def add_node(self, name: str, cpu: str = "1000", memory: str = "4Ti", gpus: int = 0,
                 labels: dict[str, str] | None = None) -> None:
        """A fake node that kwok keeps Ready and whose pods kwok runs (room for many test namespaces)."""
        node = node_manifest(name, cpu, memory, gpus, labels)
        self.kubectl("apply", "-f", "-", input=json.dumps(node))

    def wait_node_ready(self, name: str, timeout: float = 60) -> None:
        self.kubectl("wait", "--for=condition=Ready", f"node/{name}", f"--timeout={int(timeout)}s")


def node_manifest(name: str, cpu: str = "1000", memory: str = "4Ti", gpus: int = 0,
                  labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A Node object kwok manages: Ready, and the pods scheduled on it Running."""
    capacity = {"cpu": cpu, "memory": memory, "pods": "1000", **({GPU_RESOURCE: str(gpus)} if gpus else {})}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                         "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                    "type": "kwok", **(labels or {})}},
            "spec": {},
            "status": {"capacity": capacity, "allocatable": capacity}}


def logs(state: pathlib.Path) -> Iterator[tuple[str, str]]:
    """The tail of each component's log (for a failing test's report)."""
    for path in sorted(state.glob("*.log")):
        if path.name != "audit.log":
            yield path.stem, "\n".join(path.read_text(errors="replace").splitlines()[-20:])


# ---------------------------------------------------------------- make cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=pathlib.Path, default=DEFAULT_STATE,
                        help="folder for certificates, logs, etcd data and the kubeconfig (default .cluster/)")
    parser.add_argument("--gpu-node", action="store_true", help="also start a fake node with 4 nvidia.com/gpu")
    parser.add_argument("--build-only", action="store_true", help="build (or find cached) binaries, print where, exit")
    args = parser.parse_args(argv)
    binaries = build()
    if args.build_only:
        print(binaries)
        return 0
    shutil.rmtree(args.state, ignore_errors=True)
    plane = ControlPlane(state=args.state, binaries=binaries)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        plane.start()
        plane.add_node("kwok-cpu-0")
        if args.gpu_node:
            plane.add_node("kwok-gpu-0", gpus=4, labels={"nvidia.com/gpu.present": "true"})
        plane.wait_node_ready("kwok-cpu-0")
        print(f"control plane ready: {plane.server} (Kubernetes {pinned_versions()['kubernetes']})")
        print(f"export KUBECONFIG={plane.kubeconfig.resolve()}")
        print(plane.kubeconfig.read_text(), flush=True)
        print("Ctrl-C stops it all.", flush=True)
        while not stop["now"]:
            for name, proc in plane.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited ({proc.returncode}); see {args.state / (name + '.log')}", file=sys.stderr)
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        plane.stop()
        print("control plane stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
