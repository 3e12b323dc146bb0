"""The HTTP API: POST /predict, GET /healthz, /readyz, /metrics, /openapi.json; the v2 API (v2.py).

Served by gunicorn's gevent worker (`gunicorn 'inferstack_web.app:create_app()'`): a request
spends nearly all its time blocked on Redis waiting for its reply, not on the CPU, and a slow
or idle client costs a greenlet instead of pinning a thread.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from typing import IO, Any

import redis
from flask import Flask, Request, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from inferstack.config import UPLOAD_MEMORY_BYTES, Settings
from inferstack.protocol import WebQueue

from . import metrics, openapi, v2
from .errors import ApiError, BadRequest, PayloadTooLarge
from .inference import Inference, ModelInfo, decode_base64

log = logging.getLogger("inferstack.web")

# Multipart framing around the file; the file itself is held to max_image_bytes.
MULTIPART_SLACK = 64 * 1024
# Reading the rest of a too-large body lets the client see our 413 instead of a reset; but only
# so much, and only for so long: a client dripping its body must not hold a connection forever.
DRAIN_LIMIT = 64 * 1024 * 1024
DRAIN_TIMEOUT_S = 5.0
# How long a request waits for a decode slot before it is told the server is busy.
DECODE_WAIT_S = 10.0


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
    # The v2 protocol's error shape is {"error": ...}; /predict keeps its own.
    resp = jsonify(error=message) if request.path.startswith("/v2") else jsonify(success=False, error=message)
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
    # Room for the images base64-encoded in JSON; the images themselves are held to max_image_bytes.
    app.config["MAX_CONTENT_LENGTH"] = (settings.max_image_bytes + 2) // 3 * 4 + MULTIPART_SLACK
    queue = WebQueue(settings.redis_url, settings.queue_prefix, settings.max_queue, settings.request_timeout_s)
    try:
        queue.ensure_group()  # before any worker: KEDA starts the first one from the group's lag
    except redis.RedisError as exc:
        log.warning("could not create the request stream yet (%s); /readyz retries", exc)
    model_info = ModelInfo(queue)
    inference = Inference(settings, queue, model_info)
    # Every endpoint that decodes uploads takes a slot from here (see Inference.decode_slot).
    app.extensions["inferstack"] = {"settings": settings, "queue": queue, "decode_slots": inference.decode_slots}
    app.register_blueprint(v2.create_blueprint(settings, queue, inference, model_info))

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
        with inference.decode_slot():
            # The uploads are read into memory inside the slot: they count against the same bound.
            images, several = _uploaded_images(settings.max_image_bytes)
            pixels = inference.decode(images)
            del images
        results = inference.serve(pixels, top_k, started)
        body: dict[str, Any] = {"success": True}
        if several:
            body["results"] = [{"predictions": r.predictions} for r in results]
        else:
            body["predictions"] = results[0].predictions
        if results[0].model:
            body["model"] = results[0].model
        return jsonify(body)

    @app.get("/openapi.json")
    def openapi_view() -> Response:
        return jsonify(openapi.document(settings))

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response:
        # Ready = this pod can queue work, whether or not a worker runs now (workers may be
        # scaled to zero: a queued request is what brings one back). The body says how many run.
        try:
            queue.ensure_group()  # also after a Redis restart that lost the stream
            workers = queue.live_workers()
        except redis.RedisError as exc:
            # The details (host names, addresses) go to the log, not to whoever asks.
            log.warning("readyz: redis unreachable: %s", exc)
            resp = jsonify(ready=False, reason="Redis unreachable")
            resp.status_code = 503
            return resp
        return jsonify(ready=True, workers=len(workers))

    @app.before_request
    def _metrics_port_only() -> None:
        # With a metrics port, /metrics answers there and nowhere else, and only /metrics does.
        metrics.check_port(settings.metrics_port, request.environ.get("SERVER_PORT"), request.path)

    @app.get("/metrics")
    def metrics_view() -> Response:
        try:
            depth: int | None = queue.depth()
            live: int | None = len(queue.live_workers())
        except redis.RedisError:
            depth = live = None
        return Response(metrics.render(depth, live), mimetype="text/plain; version=0.0.4")

    return app


def _uploaded_images(limit: int) -> tuple[list[bytes], bool]:
    """The encoded images of a /predict request, and whether it asked for several (-> "results")."""
    if request.is_json:
        body = request.get_json(silent=True)
        image = body.get("image") if isinstance(body, dict) else None
        if isinstance(image, str):
            return [decode_base64(image, "'image'")], False
        if isinstance(image, list) and image and all(isinstance(x, str) for x in image):
            return [decode_base64(x, f"'image'[{i}]") for i, x in enumerate(image)], True
        raise BadRequest('A JSON body must be {"image": "<the image file, base64>"} (or a list of such strings).')
    uploads = request.files.getlist("image")
    if not uploads:
        raise BadRequest(
            "No 'image' field in the request; send the file as multipart/form-data, "
            'e.g. curl -F image=@cat.jpg, or JSON {"image": "<base64>"}.'
        )
    images = []
    for upload in uploads:
        data = upload.stream.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"The upload is larger than the limit of {limit} bytes.")
        images.append(data)
    return images, len(uploads) > 1


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
