"""Settings read once from the environment (names are public: see the README)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


class ConfigError(ValueError):
    """An environment variable holds a value we cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {value}")
    return value


RUNTIMES = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    port: int = 5000
    model: str = "ResNet50"
    weights: str = "imagenet"
    labels: str | None = None
    batch_size: int = 32
    max_batch_delay_ms: float = 5.0
    max_queue: int = 1000
    request_timeout_s: float = 30.0
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    metrics_port: int = 0  # the worker's own /metrics port; 0 = not served
    top_k: int = 5
    # Key prefix lets several stacks share one Redis (tests, side-by-side benchmarks).
    queue_prefix: str = "inferstack"
    worker_name: str | None = None
    ready_file: str | None = None
    web_processes: int = 2
    web_threads: int = 32
    host: str = "0.0.0.0"
    access_log: str | None = None
    log_level: str = "INFO"
    baked_keras_home: str = "/opt/keras"
    # auto: OpenVINO on CPU when installed, Keras on GPU; precision auto: see the README runtime table.
    runtime: str = "auto"
    precision: str = "auto"
    calibration_dir: str | None = None
    cache_dir: str | None = None
    # The model's name in the Open Inference Protocol (v2) API; empty means derived from `model`.
    model_name: str = ""
    # Hardening (issue 13). Memory one decode may use (header-checked before decoding), how many
    # decodes a web process runs at once, and the web pod's memory baseline per process.
    max_decode_bytes: int = 128 * 1024 * 1024
    decode_concurrency: int = 2
    # gevent: an idle or slow connection costs a greenlet, not a thread. gthread stays available.
    web_worker_class: str = "gevent"
    web_connections: int = 1000
    # Longest a worker's main loop may go without progress (one batch) before it gives up its
    # batch and exits; 0 = derived at start-up from the measured batch time.
    stall_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.model_name:
            object.__setattr__(self, "model_name", default_model_name(self.model))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        return cls(
            redis_url=env.get("INFERSTACK_REDIS_URL") or cls.redis_url,
            port=_int(env, "INFERSTACK_PORT", cls.port, 1, 65535),
            model=env.get("INFERSTACK_MODEL") or cls.model,
            weights=env.get("INFERSTACK_WEIGHTS") or cls.weights,
            labels=env.get("INFERSTACK_LABELS") or None,
            batch_size=_int(env, "INFERSTACK_BATCH_SIZE", cls.batch_size, 1, 1024),
            max_batch_delay_ms=_float(env, "INFERSTACK_MAX_BATCH_DELAY_MS", cls.max_batch_delay_ms, 0.0),
            max_queue=_int(env, "INFERSTACK_MAX_QUEUE", cls.max_queue, 1),
            request_timeout_s=_float(env, "INFERSTACK_REQUEST_TIMEOUT_S", cls.request_timeout_s, 0.1),
            max_image_bytes=_int(env, "INFERSTACK_MAX_IMAGE_BYTES", cls.max_image_bytes, 1),
            max_image_pixels=_int(env, "INFERSTACK_MAX_IMAGE_PIXELS", cls.max_image_pixels, 1),
            metrics_port=_int(env, "INFERSTACK_METRICS_PORT", cls.metrics_port, 0, 65535),
            top_k=_int(env, "INFERSTACK_TOP_K", cls.top_k, 1, 1000),
            queue_prefix=env.get("INFERSTACK_QUEUE_PREFIX") or cls.queue_prefix,
            worker_name=env.get("INFERSTACK_WORKER_NAME") or None,
            ready_file=env.get("INFERSTACK_READY_FILE") or None,
            web_processes=_int(env, "INFERSTACK_WEB_PROCESSES", cls.web_processes, 1, 64),
            web_threads=_int(env, "INFERSTACK_WEB_THREADS", cls.web_threads, 1, 1024),
            host=env.get("INFERSTACK_HOST") or cls.host,
            access_log=env.get("INFERSTACK_ACCESS_LOG") or None,
            log_level=(env.get("INFERSTACK_LOG_LEVEL") or cls.log_level).upper(),
            baked_keras_home=env.get("INFERSTACK_BAKED_KERAS_HOME") or cls.baked_keras_home,
            runtime=_choice(env, "INFERSTACK_RUNTIME", cls.runtime, RUNTIMES),
            precision=_choice(env, "INFERSTACK_PRECISION", cls.precision, PRECISIONS),
            calibration_dir=env.get("INFERSTACK_CALIBRATION_DIR") or None,
            cache_dir=env.get("INFERSTACK_CACHE_DIR") or None,
            model_name=(env.get("INFERSTACK_MODEL_NAME") or "").strip(),
            max_decode_bytes=_int(env, "INFERSTACK_MAX_DECODE_BYTES", cls.max_decode_bytes, 1 << 20),
            decode_concurrency=_int(env, "INFERSTACK_DECODE_CONCURRENCY", cls.decode_concurrency, 1, 64),
            web_worker_class=_choice(env, "INFERSTACK_WEB_WORKER_CLASS", cls.web_worker_class, ("gevent", "gthread")),
            web_connections=_int(env, "INFERSTACK_WEB_CONNECTIONS", cls.web_connections, 1, 100_000),
            stall_timeout_s=_float(env, "INFERSTACK_STALL_TIMEOUT_S", cls.stall_timeout_s, 0.0),
        )


# Resident memory of one web process with nothing in flight (Python, Flask, NumPy, Pillow, redis).
WEB_PROCESS_BASELINE_BYTES = 96 * 1024 * 1024
# The gunicorn arbiter, for the whole pod.
WEB_POD_BASELINE_BYTES = 64 * 1024 * 1024
# Part of an upload held in memory while it is received; the rest waits in a file under /tmp.
UPLOAD_MEMORY_BYTES = 64 * 1024


def web_memory_limit_bytes(settings: Settings) -> int:
    """The web pod's memory limit that bounded decoding guarantees is never exceeded.

    Each decode slot holds at most the upload (max_image_bytes) and the decoded pixels
    (max_decode_bytes); a process runs decode_concurrency of them, and each of its open
    connections buffers at most UPLOAD_MEMORY_BYTES of an upload being received.
    """
    per_decode = settings.max_decode_bytes + settings.max_image_bytes
    connections = settings.web_connections if settings.web_worker_class == "gevent" else settings.web_threads
    per_process = (WEB_PROCESS_BASELINE_BYTES + settings.decode_concurrency * per_decode
                   + connections * UPLOAD_MEMORY_BYTES)
    return WEB_POD_BASELINE_BYTES + settings.web_processes * per_process


def default_model_name(model: str) -> str:
    """`ResNet50` -> `resnet50`; `/models/flowers.keras` -> `flowers`."""
    stem = os.path.basename(model.rstrip("/\\")) or model
    for suffix in (".keras", ".h5"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.lower()
