"""Pure builders: a ``Resolved`` spec in, the manifests of its children out.

Nothing here talks to Kubernetes, kopf, or the raw spec, so everything is testable as plain
data. ``CHILDREN`` lists every child kind with its builder, in creation order; a new kind
(a Secret, a NetworkPolicy, a KEDA ScaledObject) is one builder and one ``Child`` entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from inferstack.contract import http
from inferstack.contract.acl import HEALTH
from inferstack.contract.queue import FUNCTION_LIBRARY
from inferstack.contract.settings import Settings, env_name, web_memory_limit_bytes, web_tmp_bytes
from inferstack_operator import builders_autoscaling as autoscaling
from inferstack_operator import credentials as cred
from inferstack_operator.builders_security import (
    auth_of,
    build_redis_auth_secret,
    build_redis_network_policy,
    build_web_network_policy,
)
from inferstack_operator.config import AUTH_HASH_ANNOTATION, CONFIG_HASH_ANNOTATION, OperatorSettings
from inferstack_operator.names import (
    REDIS,
    WEB,
    WORKER,
    auth_secret_name,
    config_name,
    labels,
    redis_name,
    selector_labels,
    web_name,
    worker_name,
)
from inferstack_operator.spec import GPU_RESOURCE, Location, PodOptions, Resolved, quantity

Manifest = dict[str, Any]
EnvVar = dict[str, Any]

REDIS_UID = 999  # the uid of the "redis" user in the official images
APP_UID = 10001  # web and worker images run as this uid (numeric, so runAsNonRoot can verify it)
READY_FILE = "/tmp/inferstack-ready"
MODELS_MOUNT = "/mnt/models"
# A queued request is the decoded image at the model's input size: 224x224x3 bytes for most
# keras.applications models, up to ~512 KiB for the larger inputs. Budget that per slot.
QUEUE_SLOT_BYTES = 512 * 1024
REDIS_BASE_BYTES = 64 * 1024 * 1024  # replies, heartbeats, stream bookkeeping
ACL_DIR = "/etc/redis-acl"
# Redis' liveness PING gives up after this long (a Redis stuck in a script answers BUSY at once).
REDIS_PING_TIMEOUT_S = 3
# The start hook's attempts (one a second) at loading the function library while Redis starts
# (or reads a large AOF: LOADING).
REDIS_HOOK_TRIES = 300


# --- shared pieces --------------------------------------------------------------------------

def _object_meta(obj_name: str, r: Resolved, component: str | None) -> dict[str, Any]:
    return {"name": obj_name, "namespace": r.namespace, "labels": labels(r.name, component)}


def _pod_security(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _merge_resources(defaults: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """User values win per resource name; the defaults fill the rest."""
    result: dict[str, Any] = {}
    for part in ("requests", "limits"):
        merged = dict(defaults.get(part) or {})
        merged.update(override.get(part) or {})
        if merged:
            result[part] = merged
    return result


def _spread(r: Resolved, component: str) -> list[dict[str, Any]]:
    # Soft: spread replicas over nodes when possible, never block scheduling for it.
    return [{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": selector_labels(r.name, component)},
    }]


def config_data(r: Resolved) -> dict[str, str]:
    """The environment both web and worker pods read (envFrom the ConfigMap); no secrets."""
    return {
        env_name("max_queue"): str(r.max_queue),
        env_name("top_k"): str(r.top_k),
        env_name("model_name"): r.served_name,
    }


def config_hash(data: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()[:16]


def merge_env(ours: list[EnvVar], user: tuple[Mapping[str, Any], ...], reserved: Collection[str] = ()
              ) -> tuple[list[EnvVar], list[str]]:
    """Ours, then the user's entries whose names we do not set; and the names we dropped."""
    taken = {e["name"] for e in ours} | set(reserved)
    ignored = [e["name"] for e in user if e["name"] in taken]
    return ours + [dict(e) for e in user if e["name"] not in taken], ignored


def _env(field: str, value: object) -> EnvVar:
    """The env entry of a Settings field (names from the contract's settings table)."""
    return {"name": env_name(field), "value": str(value)}


def _secret_env(name: str, r: Resolved, key: str) -> EnvVar:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": auth_secret_name(r.name), "key": key}}}


def _pod_template(r: Resolved, component: str, options: PodOptions, pod_spec: dict[str, Any],
                  hashed: bool = True) -> dict[str, Any]:
    """The pod template: our labels over the user's, and the cluster settings every tier takes."""
    annotations = dict(options.annotations)
    if hashed:
        # envFrom is read only when a container starts: a config change must roll the pods.
        annotations[CONFIG_HASH_ANNOTATION] = config_hash(config_data(r))
    # Likewise the Redis passwords (env from the Secret; Redis reads its ACL file at start).
    annotations[AUTH_HASH_ANNOTATION] = auth_of(r).digest()
    if r.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in r.image_pull_secrets]
    if options.affinity:
        pod_spec["affinity"] = dict(options.affinity)
    if options.priority_class_name:
        pod_spec["priorityClassName"] = options.priority_class_name
    if options.runtime_class_name:
        pod_spec["runtimeClassName"] = options.runtime_class_name
    metadata: dict[str, Any] = {"labels": {**options.labels, **labels(r.name, component)}}
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": pod_spec}


def ignored_settings(r: Resolved, settings: OperatorSettings) -> list[str]:
    """User settings the operator overrides (env names and pod labels it sets itself)."""
    notes: list[str] = []
    for component, options, env_lists in (
        (WEB, r.web, [web_env(r)]),
        (WORKER, r.worker, [worker_env(r, i) for i in range(_worker_processes(r))]),
        (REDIS, r.redis, [redis_env(r)]),
    ):
        dropped = sorted({n for env in env_lists for n in merge_env(env, options.env, _reserved(component, r))[1]})
        if dropped:
            notes.append(f"spec.{component}.env {', '.join(dropped)} ignored: the operator sets it")
        clashing = sorted(set(options.labels) & set(labels(r.name, component)))
        if clashing:
            notes.append(f"spec.{component}.podLabels {', '.join(clashing)} ignored: the operator sets it")
    return notes


def _reserved(component: str, r: Resolved) -> Collection[str]:
    # envFrom entries lose to env entries of the same name: keep the ConfigMap's keys ours too.
    return config_data(r) if component in (WEB, WORKER) else ()


def _deployment(child: str, r: Resolved, component: str, replicas: int | None, rolling: dict[str, int],
                options: PodOptions, pod_spec: Manifest) -> Manifest:
    """``replicas`` None: an autoscaler owns the count, so it is neither applied nor drift-checked."""
    spec: dict[str, Any] = {} if replicas is None else {"replicas": replicas}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _object_meta(child, r, component),
        "spec": {
            **spec,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector_labels(r.name, component)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
            "template": _pod_template(r, component, options, pod_spec),
        },
    }


# --- children -------------------------------------------------------------------------------

def build_config_map(r: Resolved, settings: OperatorSettings) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _object_meta(config_name(r.name), r, None),
        "data": config_data(r),
    }


def web_env(r: Resolved) -> list[EnvVar]:
    return [
        _secret_env(env_name("redis_url"), r, cred.WEB_URL_KEY),
        _env("port", http.WEB_PORT),
        _env("metrics_port", http.WEB_METRICS_PORT),
        _env("request_timeout_s", r.request_timeout_s),
        _env("max_image_bytes", r.max_image_bytes),
        {"name": "HOME", "value": "/tmp"},
    ]


def build_web_deployment(r: Resolved, settings: OperatorSettings) -> Manifest:
    env, _ = merge_env(web_env(r), r.web.env, _reserved(WEB, r))
    container = {
        "name": "web",
        "image": r.web.image or settings.web_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["inferstack-web"],
        "ports": [{"name": http.HTTP_PORT_NAME, "containerPort": http.WEB_PORT, "protocol": "TCP"},
                  {"name": http.METRICS_PORT_NAME, "containerPort": http.WEB_METRICS_PORT, "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": config_name(r.name)}}],
        "env": env,
        "readinessProbe": {
            "httpGet": {"path": http.READYZ_PATH, "port": http.HTTP_PORT_NAME},
            "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": http.HEALTHZ_PATH, "port": http.HTTP_PORT_NAME},
            "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3,
        },
        "resources": _merge_resources(
            {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": web_memory_limit(r)}},
            r.web.resources),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(APP_UID),
        # In-flight requests may wait up to the request timeout for their answer.
        "terminationGracePeriodSeconds": r.request_timeout_s + 10,
        "topologySpreadConstraints": _spread(r, WEB),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": _mebibytes(web_tmp_bytes(web_settings(r)))}}],
    }
    replicas = None if r.web_autoscaling else r.web_replicas
    return _deployment(web_name(r.name), r, WEB, replicas, {"maxUnavailable": 0, "maxSurge": 1},
                       r.web, pod_spec)


def web_settings(r: Resolved) -> Settings:
    """The settings the web container runs with: the table's defaults, then the ConfigMap, then its
    env (ours over the user's spec.web.env). spec.resolve checked the user's settings values are
    literal and valid, so this is what the processes will read."""
    env, _ = merge_env(web_env(r), r.web.env, _reserved(WEB, r))
    values = dict(config_data(r))
    values.update({e["name"]: str(e.get("value", "")) for e in env if "valueFrom" not in e})
    return Settings.from_env(values)


def web_memory_limit(r: Resolved) -> str:
    """The web container's default memory limit: what bounded decoding guarantees a pod never exceeds."""
    return _mebibytes(web_memory_limit_bytes(web_settings(r)))


def _mebibytes(size: int) -> str:
    """A byte count as a quantity, rounded up to a whole MiB."""
    return f"{-(-size // 2**20)}Mi"


def _location_path(loc: Location) -> str:
    if loc.claim is None:
        return loc.path
    return f"{MODELS_MOUNT}/{loc.claim}/{loc.path}"


def _worker_processes(r: Resolved) -> int:
    """One worker container per GPU (each gets its own device from the device plugin); 1 on CPU."""
    return max(r.gpu, 1)


def ready_file(index: int) -> str:
    return READY_FILE if index == 0 else f"{READY_FILE}-{index}"


def worker_env(r: Resolved, index: int = 0) -> list[EnvVar]:
    """The environment of worker container ``index`` (one per GPU)."""
    env: list[EnvVar] = [
        _secret_env(env_name("redis_url"), r, cred.WORKER_URL_KEY),
        _env("model", _location_path(r.model) if r.model else r.model_name),
        _env("weights", _location_path(r.weights) if isinstance(r.weights, Location) else r.weights),
    ]
    if r.labels:
        env.append(_env("labels", _location_path(r.labels)))
    if r.runtime:
        env.append(_env("runtime", r.runtime))
    if r.precision:
        env.append(_env("precision", r.precision))
    if r.auto_int8:
        env.append(_env("auto_int8", 1))
    env += [_env("batch_size", r.batch_size), _env("max_batch_delay_ms", r.max_batch_delay_ms)]
    if index == 0:
        env.append({"name": env_name("worker_name"), "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    else:
        # Each container is its own Redis consumer: the pod name plus the GPU index.
        env += [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                _env("worker_name", f"$(POD_NAME)-gpu{index}")]
    env += [
        _env("ready_file", ready_file(index)),
        _env("metrics_port", http.worker_metrics_port(index)),
        # KERAS_HOME stays the image's (weights baked at /opt/keras); the worker links them into
        # the writable cache Keras falls back to under HOME=/tmp.
        {"name": "HOME", "value": "/tmp"},
    ]
    return env


def _worker_container(r: Resolved, settings: OperatorSettings, index: int, resources: dict[str, Any],
                      mounts: list[dict[str, Any]]) -> dict[str, Any]:
    ready = ready_file(index)
    heartbeat_fresh = f"test $(( $(date +%s) - $(stat -c %Y {ready}) )) -lt 60"
    env, _ = merge_env(worker_env(r, index), r.worker.env, _reserved(WORKER, r))
    return {
        "name": "worker" if index == 0 else f"worker-gpu{index}",
        "image": r.worker.image or (settings.worker_gpu_image if r.gpu else settings.worker_image),
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["inferstack-worker"],
        "ports": [{"name": http.worker_metrics_port_name(index), "containerPort": http.worker_metrics_port(index),
                   "protocol": "TCP"}],
        "envFrom": [{"configMapRef": {"name": config_name(r.name)}}],
        "env": env,
        # Model load (and a weights download) can take minutes: allow 10 before liveness applies.
        "startupProbe": {
            "exec": {"command": ["test", "-f", ready]},
            "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 60,
        },
        "readinessProbe": {
            "exec": {"command": ["test", "-f", ready]},
            "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3,
        },
        "livenessProbe": {
            "exec": {"command": ["sh", "-c", heartbeat_fresh]},
            "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 3,
        },
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }


def build_worker_deployment(r: Resolved, settings: OperatorSettings) -> Manifest:
    gpu = r.gpu > 0
    if gpu:
        defaults = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
    else:
        defaults = {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    resources = _merge_resources(defaults, r.worker.resources)
    if gpu:
        # Extended resources go in limits (requests default to the same value). One each.
        resources.setdefault("limits", {})[GPU_RESOURCE] = 1
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}]
    for index, claim in enumerate(r.claims):
        mounts.append({"name": f"models-{index}", "mountPath": f"{MODELS_MOUNT}/{claim}", "readOnly": True})
        volumes.append({"name": f"models-{index}",
                        "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    tolerations: list[dict[str, Any]] = []
    if gpu:
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    tolerations += [dict(t) for t in r.tolerations if dict(t) not in tolerations]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(APP_UID),
        # SIGTERM lets the worker finish its current batch; give it that long.
        "terminationGracePeriodSeconds": r.worker_grace_s,
        "topologySpreadConstraints": _spread(r, WORKER),
        "containers": [_worker_container(r, settings, i, resources, mounts) for i in range(_worker_processes(r))],
        "volumes": volumes,
    }
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(r.node_selector)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    # A GPU rollout cannot surge without a spare GPU: replace in place instead.
    rolling = {"maxUnavailable": 1, "maxSurge": 0} if gpu else {"maxUnavailable": 0, "maxSurge": 1}
    replicas = None if r.worker_autoscaling else r.worker_replicas
    return _deployment(worker_name(r.name), r, WORKER, replicas, rolling, r.worker, pod_spec)


def redis_memory(r: Resolved) -> tuple[int, int]:
    """(maxmemory, container memory limit) in bytes.

    From ``spec.redis.resources.limits.memory`` when given (maxmemory at 80% of it, leaving
    room for fragmentation and AOF rewrites), else sized for a full queue.
    """
    limit = (r.redis.resources.get("limits") or {}).get("memory")
    if limit is not None:
        limit_bytes = int(quantity(limit))
        return int(limit_bytes * 0.8), limit_bytes
    maxmemory = r.max_queue * QUEUE_SLOT_BYTES + REDIS_BASE_BYTES
    limit_mib = -(-maxmemory * 5 // 4 // 2**20)  # ceil(1.25 * maxmemory) in MiB
    return maxmemory, limit_mib * 2**20


def redis_env(r: Resolved) -> list[EnvVar]:
    # redis-cli reads the password from here: the readiness probe logs in as the PING-only user.
    return [_secret_env("REDISCLI_AUTH", r, cred.HEALTH_PASSWORD_KEY)]


def redis_liveness_script() -> str:
    """PING as the health user, bounded: BUSY (a script or function that never ends) or no answer
    fails, so the kubelet restarts Redis; LOADING (reading its AOF after a restart) is alive."""
    return (f'r=$(timeout {REDIS_PING_TIMEOUT_S} redis-cli --user {HEALTH} -p {http.REDIS_PORT} ping 2>&1); '
            'case "$r" in PONG|LOADING*) exit 0;; esac; echo "redis: $r"; exit 1')


def redis_load_functions_script() -> str:
    """The start hook: load the queue's Redis functions as soon as Redis answers, so the web tier can
    queue before any worker ran (workers load the same library themselves)."""
    library = f"{ACL_DIR}/{cred.FUNCTIONS_KEY}"
    return (f"for i in $(seq {REDIS_HOOK_TRIES}); do "
            f'redis-cli --user {HEALTH} -p {http.REDIS_PORT} -x FUNCTION LOAD REPLACE < {library} '
            f"| grep -qx {FUNCTION_LIBRARY} && exit 0; sleep 1; done; exit 1")


def redis_args(r: Resolved, maxmemory: int) -> list[str]:
    """redis-server's command line: ACL users, memory cap, and persistence when storage is set."""
    args = [
        "--port", str(http.REDIS_PORT),
        # Users and their rights from the Secret (the default user is off); protected mode stays on.
        "--aclfile", f"{ACL_DIR}/{cred.ACL_KEY}",
        "--protected-mode", "yes",
        "--maxmemory", str(maxmemory),
        "--maxmemory-policy", "noeviction",  # a queue must never drop requests silently
        "--dir", "/data",
    ]
    if r.redis_storage is not None:
        return args + ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    return args + ["--appendonly", "no", "--save", ""]


def _redis_container(r: Resolved, settings: OperatorSettings) -> dict[str, Any]:
    maxmemory, limit = redis_memory(r)
    limit_mib = f"{-(-limit // 2**20)}Mi"
    resources = _merge_resources(
        {"requests": {"cpu": "100m", "memory": limit_mib}, "limits": {"memory": limit_mib}}, r.redis.resources)
    env, _ = merge_env(redis_env(r), r.redis.env)
    return {
        "name": "redis",
        "image": settings.redis_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["redis-server"],
        "args": redis_args(r, maxmemory),
        "ports": [{"name": http.REDIS_PORT_NAME, "containerPort": http.REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "exec": {"command": ["sh", "-c", f"redis-cli --user health -p {http.REDIS_PORT} ping | grep -q PONG"]},
            "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3,
        },
        "livenessProbe": {
            "exec": {"command": ["sh", "-c", redis_liveness_script()]},
            "periodSeconds": 5, "timeoutSeconds": REDIS_PING_TIMEOUT_S + 2, "failureThreshold": 3,
        },
        "lifecycle": {"postStart": {"exec": {"command": ["sh", "-c", redis_load_functions_script()]}}},
        "resources": resources,
        "securityContext": _container_security(),
        "env": env,
        "volumeMounts": [{"name": "data", "mountPath": "/data"},
                         {"name": "acl", "mountPath": ACL_DIR, "readOnly": True}],
    }


def _redis_claim_template(r: Resolved) -> dict[str, Any]:
    """The data volume's claim, when spec.redis.storage asks for persistence."""
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": r.redis_storage}},
    }
    if r.redis_storage_class:
        claim_spec["storageClassName"] = r.redis_storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "labels": labels(r.name, REDIS)},
        "spec": claim_spec,
    }


def build_redis_statefulset(r: Resolved, settings: OperatorSettings) -> Manifest:
    # Readable by the redis group only (fsGroup), not world-readable.
    volumes: list[dict[str, Any]] = [{"name": "acl", "secret": {
        "secretName": auth_secret_name(r.name), "defaultMode": 0o440,
        "items": [{"key": cred.ACL_KEY, "path": cred.ACL_KEY},
                  {"key": cred.FUNCTIONS_KEY, "path": cred.FUNCTIONS_KEY}]}}]
    if r.redis_storage is None:
        volumes.append({"name": "data", "emptyDir": {}})
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(REDIS_UID),
        "terminationGracePeriodSeconds": 30,
        "containers": [_redis_container(r, settings)],
        "volumes": volumes,
    }
    spec: dict[str, Any] = {
        "replicas": 1,
        "serviceName": redis_name(r.name),
        "selector": {"matchLabels": selector_labels(r.name, REDIS)},
        "updateStrategy": {"type": "RollingUpdate"},
        "template": _pod_template(r, REDIS, r.redis, pod_spec, hashed=False),
    }
    if r.redis_storage is not None:
        spec["volumeClaimTemplates"] = [_redis_claim_template(r)]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _object_meta(redis_name(r.name), r, REDIS),
        "spec": spec,
    }


def build_redis_service(r: Resolved, settings: OperatorSettings) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _object_meta(redis_name(r.name), r, REDIS),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(r.name, REDIS),
            "ports": [{"name": http.REDIS_PORT_NAME, "port": http.REDIS_PORT, "targetPort": http.REDIS_PORT_NAME,
                       "protocol": "TCP"}],
        },
    }


def build_front_service(r: Resolved, settings: OperatorSettings) -> Manifest:
    meta = _object_meta(r.name, r, WEB)
    if r.service_annotations:
        meta["annotations"] = dict(r.service_annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": r.service_type,
            "selector": selector_labels(r.name, WEB),
            "ports": [{"name": http.HTTP_PORT_NAME, "port": r.service_port, "targetPort": http.HTTP_PORT_NAME,
                       "protocol": "TCP"}],
        },
    }


# --- the registry ---------------------------------------------------------------------------

Builder = Callable[[Resolved, OperatorSettings], "Manifest | None"]


@dataclass(frozen=True)
class Child:
    """One kind of child. ``build`` returns None when this spec does not want the child.

    ``component``: web/worker/redis workloads whose live status feeds the InferenceService's.
    ``requires``: an apiVersion outside core Kubernetes (e.g. ``keda.sh/v1alpha1``); the child
    is built only when the cluster serves it.
    ``name``: the child's name from the InferenceService's, for children a spec may stop
    wanting (autoscaling or monitoring turned off): the reconciler deletes those it owns.
    """

    kind: str
    build: Builder
    component: str | None = None
    requires: str | None = None
    name: Callable[[str], str] | None = None


CHILDREN: list[Child] = [
    Child("ConfigMap", build_config_map),
    Child("Secret", build_redis_auth_secret),
    Child("NetworkPolicy", build_redis_network_policy),
    Child("Service", build_redis_service),
    Child("StatefulSet", build_redis_statefulset, component=REDIS),
    Child("Deployment", build_worker_deployment, component=WORKER),
    Child("Deployment", build_web_deployment, component=WEB),
    Child("NetworkPolicy", build_web_network_policy),
    Child("Service", build_front_service),
    Child("TriggerAuthentication", autoscaling.build_trigger_authentication, requires=autoscaling.KEDA_API,
          name=worker_name),
    Child("ScaledObject", autoscaling.build_scaled_object, requires=autoscaling.KEDA_API, name=worker_name),
    Child("HorizontalPodAutoscaler", autoscaling.build_web_hpa, name=web_name),
    Child("PodMonitor", autoscaling.build_web_pod_monitor, requires=autoscaling.MONITORING_API, name=web_name),
    Child("PodMonitor", autoscaling.build_worker_pod_monitor, requires=autoscaling.MONITORING_API,
          name=worker_name),
]


def required_apis() -> set[str]:
    """The optional apiVersions some child needs (the reconciler asks the cluster about these)."""
    return {c.requires for c in CHILDREN if c.requires}


def served_spec(r: Resolved, served: Collection[str]) -> Resolved:
    """The spec the children are built from: without KEDA, autoscaled workers fall back to fixed ones."""
    return r if autoscaling.KEDA_API in served else autoscaling.without_keda(r)


def build_children(r: Resolved, settings: OperatorSettings, served: Collection[str] = ()
                   ) -> list[tuple[Child, Manifest]]:
    """Every wanted child of one InferenceService, in creation order, with its registry entry."""
    r = served_spec(r, served)
    result = []
    for child in CHILDREN:
        if child.requires and child.requires not in served:
            continue
        manifest = child.build(r, settings)
        if manifest is not None:
            result.append((child, manifest))
    return result


def unwanted_children(r: Resolved, settings: OperatorSettings, served: Collection[str] = ()
                      ) -> list[tuple[str, str]]:
    """(kind, name) of the prunable children this spec does not want, on APIs the cluster serves."""
    wanted = {(m["kind"], m["metadata"]["name"]) for _, m in build_children(r, settings, served)}
    found = []
    for child in CHILDREN:
        if child.name is None or (child.requires and child.requires not in served):
            continue
        key = (child.kind, child.name(r.name))
        if key not in wanted and key not in found:
            found.append(key)
    return found
