"""The HTTP API: POST /predict, GET /healthz, /readyz, /metrics.

Served by gunicorn's gevent worker (`gunicorn 'inferstack_web.app:create_app()'`): a request
spends nearly all its time blocked on Redis waiting for its reply, not on the CPU, and a slow
or idle client costs a greenlet instead of pinning a thread.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from typing import IO, Any

import redis
from flask import Flask, Request, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from inferstack.config import UPLOAD_MEMORY_BYTES, Settings
from inferstack.imaging import BadImage, decode_image
from inferstack.protocol import QueueFull, RedisFull, ReplyTimeout, WebQueue

from . import metrics
from .errors import ApiError, BadRequest, InferenceFailed, PayloadTooLarge, ResultTimeout, Unavailable

log = logging.getLogger("inferstack.web")

DEFAULT_INPUT_SIZE = (224, 224)
# Multipart framing around the file; the file itself is held to max_image_bytes.
MULTIPART_SLACK = 64 * 1024
# Reading the rest of a too-large body lets the client see our 413 instead of a reset; but only
# so much, and only for so long: a client dripping its body must not hold a connection forever.
DRAIN_LIMIT = 64 * 1024 * 1024
DRAIN_TIMEOUT_S = 5.0
# How long a request waits for a decode slot before it is told the server is busy.
DECODE_WAIT_S = 10.0


class _ModelSize:
    """Input size advertised by the workers, cached briefly so /predict needs no extra round trip."""

    def __init__(self, queue: WebQueue, ttl_s: float = 5.0) -> None:
        self.queue = queue
        self.ttl_s = ttl_s
        self._value = DEFAULT_INPUT_SIZE
        self._name: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def get(self) -> tuple[int, int]:
        now = time.monotonic()
        if now < self._expires:
            return self._value
        with self._lock:
            if now >= self._expires:
                try:
                    info = self.queue.model_info()
                except redis.RedisError:
                    info = None
                if info:
                    self._value = (int(info["input_shape"][0]), int(info["input_shape"][1]))
                    self._name = info.get("name")
                self._expires = now + (self.ttl_s if info else 0.5)
        return self._value

    @property
    def name(self) -> str | None:
        return self._name


def _top_k(raw: str | None, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"top_k must be an integer between 1 and 1000, got {raw[:20]!r}.") from None
    if not 1 <= value <= 1000:
        raise BadRequest(f"top_k must be between 1 and 1000, got {value}.")
    return value


def _error(status: int, message: str, retry_after: int | None = None) -> Response:
    resp = jsonify(success=False, error=message)
    resp.status_code = status
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


class _Request(Request):
    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        # Uploads wait for a decode slot in /tmp, not in memory (werkzeug keeps 500 KB in memory).
        return tempfile.SpooledTemporaryFile(max_size=UPLOAD_MEMORY_BYTES, mode="rb+")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask("inferstack_web")
    app.request_class = _Request
    app.config["MAX_CONTENT_LENGTH"] = settings.max_image_bytes + MULTIPART_SLACK
    queue = WebQueue(settings.redis_url, settings.queue_prefix, settings.max_queue, settings.request_timeout_s)
    model_size = _ModelSize(queue)
    # Peak memory of a process is (decode_concurrency x per-decode budget) + baseline; every
    # endpoint that decodes uploads takes a slot from here.
    decode_slots = threading.BoundedSemaphore(settings.decode_concurrency)
    app.extensions["inferstack"] = {"settings": settings, "queue": queue, "decode_slots": decode_slots}

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.message, exc.retry_after)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Response:
        drained = _drain()
        resp = _error(413, f"The upload is larger than the limit of {settings.max_image_bytes} bytes.")
        if not drained:
            resp.headers["Connection"] = "close"  # the unread rest of the body must not be parsed as a request
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "Internal error; the request was not processed. Retry, and report it if it persists.")

    @app.after_request
    def _count(resp: Response) -> Response:
        if request.path == "/predict":
            metrics.REQUESTS.labels(code=str(resp.status_code)).inc()
            started = request.environ.get("inferstack.start")
            if started is not None:
                metrics.LATENCY.observe(time.perf_counter() - started)
        return resp

    @app.post("/predict")
    def predict() -> Response:
        request.environ["inferstack.start"] = started = time.perf_counter()
        top_k = _top_k(request.args.get("top_k"), settings.top_k)
        upload = request.files.get("image")
        if upload is None:
            raise BadRequest(
                "No 'image' field in the request; send the file as multipart/form-data, "
                "e.g. curl -F image=@cat.jpg."
            )
        if not decode_slots.acquire(timeout=DECODE_WAIT_S):
            raise Unavailable("The server is busy decoding other images; retry shortly.", 1)
        try:
            # The upload is read into memory inside the slot too: it counts against the same bound.
            data = upload.stream.read(settings.max_image_bytes + 1)
            if len(data) > settings.max_image_bytes:
                raise PayloadTooLarge(f"The upload is larger than the limit of {settings.max_image_bytes} bytes.")
            t0 = time.perf_counter()
            try:
                pixels = decode_image(data, model_size.get(), settings.max_image_pixels, settings.max_decode_bytes)
            except BadImage as exc:
                raise BadRequest(str(exc)) from None
            finally:
                del data
            metrics.DECODE.observe(time.perf_counter() - t0)
        finally:
            decode_slots.release()

        try:
            request_id = queue.submit(pixels, top_k)
        except QueueFull:
            raise Unavailable("The server is at capacity (request queue full); retry shortly.", 1) from None
        except RedisFull:
            raise Unavailable("The server is at capacity (queue memory nearly full); retry shortly.", 2) from None
        except redis.RedisError as exc:
            log.warning("redis unavailable on submit: %s", exc)
            raise Unavailable("The request queue is unreachable; retry shortly.", 2) from None
        remaining = settings.request_timeout_s - (time.perf_counter() - started)
        try:
            reply = queue.wait(request_id, max(remaining, 0.01))
        except ReplyTimeout:
            raise ResultTimeout(
                f"No result within {settings.request_timeout_s:g} s; the workers are busy or down. Retry later."
            ) from None
        except redis.RedisError as exc:
            log.warning("redis unavailable while waiting: %s", exc)
            raise Unavailable("The request queue became unreachable while waiting; retry shortly.", 2) from None
        if not reply.get("ok"):
            raise InferenceFailed(reply.get("error") or "The model failed on this image.")
        body: dict[str, Any] = {"success": True, "predictions": reply["predictions"]}
        if reply.get("model"):
            body["model"] = reply["model"]
        return jsonify(body)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            workers = queue.live_workers()  # a round trip: also proves Redis answers
        except redis.RedisError as exc:
            resp = jsonify(ready=False, reason=f"Redis unreachable: {exc}")
            resp.status_code = 503
            return resp
        if not workers:
            resp = jsonify(ready=False, reason="no live worker has a current heartbeat")
            resp.status_code = 503
            return resp
        return jsonify(ready=True, workers=len(workers))

    @app.get("/metrics")
    def metrics_view() -> Response:
        try:
            depth: int | None = queue.depth()
            live: int | None = len(queue.live_workers())
        except redis.RedisError:
            depth = live = None
        return Response(metrics.render(depth, live), mimetype="text/plain; version=0.0.4")

    return app


def _drain() -> bool:
    """Consume the unread body so the connection can carry our 413; False if we gave up on it."""
    length = request.content_length
    if length is None or length > DRAIN_LIMIT:
        return False
    stream = request.environ.get("wsgi.input")
    if stream is None:
        return False
    sock = request.environ.get("gunicorn.socket")
    if sock is not None and not _gevent_patched():
        sock.settimeout(DRAIN_TIMEOUT_S)  # gthread: at least an idle client cannot hold the thread
    left = length
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    try:
        with _time_limit(DRAIN_TIMEOUT_S):
            while left > 0 and time.monotonic() < deadline:
                chunk = stream.read(min(left, 64 * 1024))
                if not chunk:
                    break
                left -= len(chunk)
    except Exception:  # client went away, or was too slow; nothing to save
        return False
    return left == 0


def _gevent_patched() -> bool:
    try:
        from gevent.monkey import is_module_patched
    except ImportError:
        return False
    return is_module_patched("socket")


def _time_limit(seconds: float) -> Any:
    """A hard limit on a block of blocking reads under the gevent worker (silently ends the block)."""
    if not _gevent_patched():
        return contextlib.nullcontext()
    from gevent import Timeout

    return Timeout(seconds, False)
