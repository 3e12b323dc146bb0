"""The one table of settings the web and worker processes read from the environment.

Each ``Setting`` names its environment variable, type, default, bounds and a one-line doc;
``Settings`` takes its defaults from the table and ``Settings.from_env`` reads it. The CRD
defaults, the operator's spec defaults and docs/configuration.md are checked against it by tests
(``python -m inferstack.contract.settings`` prints the docs table).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from inferstack.contract import http, queue


class ConfigError(ValueError):
    """An environment variable holds a value we cannot use."""


RUNTIMES = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
WEB_WORKER_CLASSES = ("gevent", "gthread")


@dataclass(frozen=True)
class Setting:
    """One environment variable: ``kind`` is str, optional (str or None), int, float or choice."""

    field: str
    env: str
    kind: str
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    shown: str | None = None  # the default as the docs show it, when the value alone says too little
    crd: str | None = None  # the CRD field that sets it, whose default must be the same
    normalize: Callable[[str], str] | None = None

    def read(self, env: Mapping[str, str]) -> Any:
        raw = env.get(self.env)
        if self.kind in ("int", "float"):
            return self._number(raw)
        if self.kind == "choice":
            value = (raw or "").strip().lower()
            if not value:
                return self.default
            if value not in self.choices:
                raise ConfigError(f"{self.env} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if not raw:
            return self.default
        return self.normalize(raw) if self.normalize else raw

    def _number(self, raw: str | None) -> int | float:
        if raw is None or raw.strip() == "":
            return self.default
        parse, what = (int, "an integer") if self.kind == "int" else (float, "a number")
        try:
            value = parse(raw)
        except ValueError:
            raise ConfigError(f"{self.env} must be {what}, got {raw!r}") from None
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            bound = f"between {self.lo} and {self.hi}" if self.hi is not None else f">= {self.lo}"
            raise ConfigError(f"{self.env} must be {bound}, got {value}")
        return value

    def doc_row(self) -> str:
        default = self.shown or ("unset" if self.default is None else f"`{self.default}`")
        return f"| `{self.env}` | {default} | {self.doc} |"


def _s(env: str, field: str, kind: str, default: Any, doc: str, **options: Any) -> Setting:
    # Spelled out in full so that a search for the name finds its one definition.
    assert env == "INFERSTACK_" + field.upper(), (env, field)
    return Setting(field, env, kind, default, doc, **options)


SETTINGS: tuple[Setting, ...] = (
    _s("INFERSTACK_REDIS_URL", "redis_url", "str", f"redis://127.0.0.1:{http.REDIS_PORT}/0", "the queue"),
    _s("INFERSTACK_PORT", "port", "int", http.LOCAL_WEB_PORT,
       f"web listen port (local run; the image listens on {http.WEB_PORT})",
       lo=1, hi=65535),
    _s("INFERSTACK_MODEL", "model", "str", "ResNet50",
       "a `keras.applications` architecture name, or a path to a saved `.keras` model",
       crd="spec.model.name"),
    _s("INFERSTACK_WEIGHTS", "weights", "str", "imagenet",
       "`imagenet`, `none` (random init, for tests/offline), or a path to a weights file", crd="spec.model.weights"),
    _s("INFERSTACK_LABELS", "labels", "optional", None, "a path to a labels file (one label per line, index order)",
       shown="ImageNet's 1000 class names"),
    _s("INFERSTACK_BATCH_SIZE", "batch_size", "int", 32,
       "largest batch the worker runs", lo=1, hi=1024, crd="spec.worker.batchSize"),
    _s("INFERSTACK_MAX_BATCH_DELAY_MS", "max_batch_delay_ms", "float", 5.0,
       "longest a worker waits to fill a batch once it holds one request",
       lo=0.0, shown="`5`", crd="spec.worker.maxBatchDelayMs"),
    _s("INFERSTACK_MAX_QUEUE", "max_queue", "int", 1000,
       "queued requests beyond which `/predict` answers 503 at once", lo=1,
       crd="spec.redis.maxQueue"),
    _s("INFERSTACK_REQUEST_TIMEOUT_S", "request_timeout_s", "float", 30.0,
       "how long `/predict` waits for its result", lo=0.1, shown="`30`",
       crd="spec.web.requestTimeoutSeconds"),
    _s("INFERSTACK_MAX_IMAGE_BYTES", "max_image_bytes", "int", 10 * 1024 * 1024,
       "upload size limit (413 above it)", lo=1,
       crd="spec.web.maxImageBytes"),
    _s("INFERSTACK_MAX_IMAGE_PIXELS", "max_image_pixels", "int", 50_000_000,
       "decoded size limit (400 above it)", lo=1),
    _s("INFERSTACK_METRICS_PORT", "metrics_port", "int", 0,
       "a separate `/metrics` listener (web: then the public port serves no `/metrics`; "
       "worker: its only HTTP port)", lo=0, hi=65535, shown="unset (`0`)"),
    _s("INFERSTACK_TOP_K", "top_k", "int", 5,
       "`top_k` when the request gives none", lo=1, hi=1000, crd="spec.model.topK"),
    # The key prefix lets several stacks share one Redis (tests, side-by-side benchmarks).
    _s("INFERSTACK_QUEUE_PREFIX", "queue_prefix", "str", queue.DEFAULT_PREFIX,
       "Redis key prefix, so several stacks can share one Redis"),
    _s("INFERSTACK_WORKER_NAME", "worker_name", "optional", None,
       "the worker's consumer name (the pod name in Kubernetes)",
       shown="`<hostname>-<pid>`"),
    _s("INFERSTACK_READY_FILE", "ready_file", "optional", None,
       "file the worker creates after warm-up and touches every second (probes)"),
    _s("INFERSTACK_WEB_PROCESSES", "web_processes", "int", 2, "gunicorn processes", lo=1, hi=64),
    _s("INFERSTACK_WEB_THREADS", "web_threads", "int", 32,
       "threads per gunicorn process (`gthread` worker class)", lo=1, hi=1024),
    _s("INFERSTACK_HOST", "host", "str", "0.0.0.0", "web listen address"),
    _s("INFERSTACK_ACCESS_LOG", "access_log", "optional", None, "gunicorn access log target (`-` for stdout)"),
    _s("INFERSTACK_LOG_LEVEL", "log_level", "str", "INFO", "log level", normalize=str.upper),
    _s("INFERSTACK_BAKED_KERAS_HOME", "baked_keras_home", "str", "/opt/keras",
       "where the worker image bakes the ImageNet weights"),
    # auto: OpenVINO on CPU when installed, Keras on GPU; precision auto: see docs/runtimes.md.
    _s("INFERSTACK_RUNTIME", "runtime", "choice", "auto",
       "worker runtime: `keras`, `openvino`, or `auto` (see docs/runtimes.md)",
       choices=RUNTIMES),
    _s("INFERSTACK_PRECISION", "precision", "choice", "auto",
       "worker precision: `fp32`, `bf16`, `fp16`, `int8`, or `auto`",
       choices=PRECISIONS),
    _s("INFERSTACK_CALIBRATION_DIR", "calibration_dir", "optional", None,
       "folder of representative images for `int8` (required by it)"),
    _s("INFERSTACK_CACHE_DIR", "cache_dir", "optional", None,
       "where OpenVINO keeps the converted model and its compiled blobs",
       shown="unset (`/tmp/inferstack-cache` in the worker image)"),
    # precision auto: each candidate is timed this many times per batch shape (few: start-up cost).
    _s("INFERSTACK_PRECISION_TRIALS", "precision_trials", "int", 3,
       "timed batches per candidate (at the batch size and at 1) when `INFERSTACK_PRECISION=auto` measures",
       lo=1, hi=100),
    _s("INFERSTACK_AUTO_INT8", "auto_int8", "int", 0,
       "`1`: with precision `auto` on OpenVINO, quantize to int8 from live traffic and switch when it agrees",
       lo=0, hi=1, crd="spec.model.autoInt8"),
    _s("INFERSTACK_AUTO_INT8_SAMPLES", "auto_int8_samples", "int", 300,
       "decoded inputs kept (reservoir-sampled) to quantize and check int8 on", lo=1, hi=10_000),
    _s("INFERSTACK_AUTO_INT8_TOP1", "auto_int8_top1", "float", 99.0,
       "least top-1 agreement (%) of int8 with float on those inputs for the switch", lo=0.0, hi=100.0,
       shown="`99`"),
    _s("INFERSTACK_AUTO_INT8_TOP5", "auto_int8_top5", "float", 95.0,
       "least mean top-5 overlap (%) of int8 with float on those inputs for the switch", lo=0.0, hi=100.0,
       shown="`95`"),
    # Empty means derived from `model` (Settings.__post_init__).
    _s("INFERSTACK_MODEL_NAME", "model_name", "str", "", "the model's name in the v2 API",
       shown="architecture lower-cased (`resnet50`) or model file stem", normalize=str.strip),
    # Hardening: memory one decode may use (header-checked before decoding), decodes a web process
    # runs at once.
    _s("INFERSTACK_MAX_DECODE_BYTES", "max_decode_bytes", "int", 128 * 1024 * 1024,
       "memory one decode may use, checked from the image header (400 above it)", lo=1 << 20),
    _s("INFERSTACK_DECODE_CONCURRENCY", "decode_concurrency", "int", 2,
       "decodes one web process runs at once", lo=1, hi=64),
    # gevent: an idle or slow connection costs a greenlet, not a thread. gthread stays available.
    _s("INFERSTACK_WEB_WORKER_CLASS", "web_worker_class", "choice", "gevent",
       "gunicorn worker class, `gevent` or `gthread`",
       choices=WEB_WORKER_CLASSES),
    _s("INFERSTACK_WEB_CONNECTIONS", "web_connections", "int", 1000,
       "connections one gevent web process holds at once", lo=1, hi=100_000),
    # 0 = derived at start-up from the measured batch time.
    _s("INFERSTACK_STALL_TIMEOUT_S", "stall_timeout_s", "float", 0.0,
       "longest a worker's main loop may go without progress before it exits",
       lo=0.0, shown="`0` (derived: 5 full batches, at least 15 s)"),
    # Bodies are read in full before a decode slot is taken: slow senders hold a connection, not a slot.
    _s("INFERSTACK_BODY_TIMEOUT_S", "body_timeout_s", "float", 60.0,
       "longest a client may take to send a request body (408 beyond)", lo=0.1, shown="`60`"),
    _s("INFERSTACK_WEB_SPOOL_BODIES", "web_spool_bodies", "int", 16,
       "full-size request bodies one web process holds under `/tmp` while receiving them (503 beyond)",
       lo=1, hi=4096),
    # 0: the runtime's own default (every core it sees), capped by a cgroup CPU quota (a pod's CPU
    # limit; inferstack_worker.cpu_quota). `inferstack batch` sets spark.task.cpus.
    _s("INFERSTACK_INFERENCE_THREADS", "inference_threads", "int", 0,
       "threads one model runs on (OpenVINO `INFERENCE_NUM_THREADS`, TensorFlow intra/inter-op); "
       "`inferstack batch`: `spark.task.cpus` when unset", lo=0, hi=1024,
       shown="`0` (the runtime's default: every core it sees, or the cgroup CPU quota's whole CPUs "
             "(a pod's CPU limit) when fewer)"),
)

BY_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS}
BY_ENV: dict[str, Setting] = {s.env: s for s in SETTINGS}


def env_name(field: str) -> str:
    """The environment variable of a Settings field (``batch_size`` -> ``INFERSTACK_BATCH_SIZE``)."""
    return BY_FIELD[field].env


def default(field: str) -> Any:
    return BY_FIELD[field].default


@dataclass(frozen=True)
class Settings:
    """The settings of one web or worker process; defaults from SETTINGS."""

    redis_url: str = default("redis_url")
    port: int = default("port")
    model: str = default("model")
    weights: str = default("weights")
    labels: str | None = default("labels")
    batch_size: int = default("batch_size")
    max_batch_delay_ms: float = default("max_batch_delay_ms")
    max_queue: int = default("max_queue")
    request_timeout_s: float = default("request_timeout_s")
    max_image_bytes: int = default("max_image_bytes")
    max_image_pixels: int = default("max_image_pixels")
    metrics_port: int = default("metrics_port")
    top_k: int = default("top_k")
    queue_prefix: str = default("queue_prefix")
    worker_name: str | None = default("worker_name")
    ready_file: str | None = default("ready_file")
    web_processes: int = default("web_processes")
    web_threads: int = default("web_threads")
    host: str = default("host")
    access_log: str | None = default("access_log")
    log_level: str = default("log_level")
    baked_keras_home: str = default("baked_keras_home")
    runtime: str = default("runtime")
    precision: str = default("precision")
    calibration_dir: str | None = default("calibration_dir")
    cache_dir: str | None = default("cache_dir")
    precision_trials: int = default("precision_trials")
    auto_int8: int = default("auto_int8")
    auto_int8_samples: int = default("auto_int8_samples")
    auto_int8_top1: float = default("auto_int8_top1")
    auto_int8_top5: float = default("auto_int8_top5")
    model_name: str = default("model_name")
    max_decode_bytes: int = default("max_decode_bytes")
    decode_concurrency: int = default("decode_concurrency")
    web_worker_class: str = default("web_worker_class")
    web_connections: int = default("web_connections")
    stall_timeout_s: float = default("stall_timeout_s")
    body_timeout_s: float = default("body_timeout_s")
    web_spool_bodies: int = default("web_spool_bodies")
    inference_threads: int = default("inference_threads")

    def __post_init__(self) -> None:
        if not self.model_name:
            object.__setattr__(self, "model_name", default_model_name(self.model))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(**{s.field: s.read(env) for s in SETTINGS})


assert [f.name for f in fields(Settings)] == [s.field for s in SETTINGS], "Settings and SETTINGS disagree"


def default_model_name(model: str) -> str:
    """`ResNet50` -> `resnet50`; `/models/flowers.keras` -> `flowers`."""
    stem = os.path.basename(model.rstrip("/\\")) or model
    for suffix in (".keras", ".h5"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.lower()


# Resident memory of one web process with nothing in flight (Python, Flask, NumPy, Pillow, redis).
WEB_PROCESS_BASELINE_BYTES = 96 * 1024 * 1024
# The gunicorn arbiter, for the whole pod.
WEB_POD_BASELINE_BYTES = 64 * 1024 * 1024
# Part of a request body held in memory while it is received; the rest waits in a file under /tmp.
UPLOAD_MEMORY_BYTES = 64 * 1024
# What one read from a connection may bring in at once while a body is received.
RECEIVE_CHUNK_BYTES = 64 * 1024
# Multipart framing or the JSON around the images, beyond the images themselves.
BODY_FRAMING_BYTES = 64 * 1024
# Request bounds, checked before any arithmetic on what a request says (400 beyond).
MAX_IMAGES_PER_REQUEST = 256
MAX_TENSOR_RANK = 8  # v2 input shapes: at most this many dimensions, each at most MAX_IMAGES_PER_REQUEST
MAX_JSON_TOKENS = 100_000  # structural characters (, : [ {) in a JSON body: bounds its parsed form
MAX_JSON_INT_DIGITS = 20  # longer integer literals in a JSON body are refused before conversion
# A parsed JSON value costs at most about this much beyond its text (a list, a dict, a small string).
JSON_TOKEN_BYTES = 128
# Besides request bodies, per web process under /tmp: the metrics files and gunicorn's heartbeat.
WEB_TMP_PROCESS_BYTES = 16 * 1024 * 1024
# The web pod's /tmp never shrinks below this (HOME=/tmp too: caches, gunicorn's heartbeat files).
WEB_TMP_MIN_BYTES = 256 * 1024 * 1024


def max_body_bytes(max_image_bytes: int) -> int:
    """The largest request body (413 above it): the images base64-encoded in JSON, and framing."""
    return (max_image_bytes + 2) // 3 * 4 + BODY_FRAMING_BYTES


def web_tmp_bytes(settings: Settings) -> int:
    """What the web pod writes under /tmp at most (the size of its /tmp volume).

    Per process: the bodies being received (web_spool_bodies full-size bodies, 503 beyond), the
    multipart parts being decoded (one full-size body per decode slot), and WEB_TMP_PROCESS_BYTES;
    never below WEB_TMP_MIN_BYTES.
    """
    body = max_body_bytes(settings.max_image_bytes)
    per_process = (settings.web_spool_bodies + settings.decode_concurrency) * body + WEB_TMP_PROCESS_BYTES
    return max(WEB_TMP_MIN_BYTES, settings.web_processes * per_process)


def web_memory_limit_bytes(settings: Settings, tmp_in_memory: bool = False) -> int:
    """The web pod's memory limit that bounded decoding guarantees is never exceeded.

    Each decode slot holds at most the body twice (compressed and inflated, or text and parsed
    form, of at most MAX_JSON_TOKENS values) and the decoded pixels (max_decode_bytes); a process
    runs decode_concurrency of them. Each open connection holds at most UPLOAD_MEMORY_BYTES of a
    body being received plus one read; a request waiting for its replies holds only its queue ids.
    With /tmp in memory (an emptyDir of medium Memory) its files count too: ``web_tmp_bytes``.
    """
    body = max_body_bytes(settings.max_image_bytes)
    per_decode = settings.max_decode_bytes + 2 * body + MAX_JSON_TOKENS * JSON_TOKEN_BYTES
    connections = settings.web_connections if settings.web_worker_class == "gevent" else settings.web_threads
    per_process = (WEB_PROCESS_BASELINE_BYTES + settings.decode_concurrency * per_decode
                   + connections * (UPLOAD_MEMORY_BYTES + RECEIVE_CHUNK_BYTES))
    tmp = web_tmp_bytes(settings) if tmp_in_memory else 0
    return WEB_POD_BASELINE_BYTES + settings.web_processes * per_process + tmp


def markdown_table() -> str:
    """The configuration table of docs/configuration.md."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"] + [s.doc_row() for s in SETTINGS]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
