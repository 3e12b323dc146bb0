"""The web app: each API an endpoint class registered by one function, with its own error shape.

- predict.py: POST /predict ({"success": false, "error"} on failure)
- ops.py: /healthz, /readyz, /metrics, /openapi.json (same error shape as /predict)
- v2.py: the Open Inference Protocol under /v2 ({"error"} on failure)

Served by gunicorn's gevent worker (`gunicorn 'inferstack_web.app:create_app()'`): a request
spends nearly all its time blocked on Redis waiting for its reply, not on the CPU, and a slow
or idle client costs a greenlet instead of pinning a thread.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, request

from inferstack.config import Settings
from inferstack.contract.settings import max_body_bytes
from inferstack.protocol import WebQueue

from . import metrics
from .errors import install_error_handlers
from .inference import Inference, ModelInfo
from .ops import OpsEndpoints, register_ops_endpoints
from .predict import PredictEndpoints, predict_error_body, register_predict_endpoints
from .uploads import SpoolingRequest
from .v2 import V2Endpoints, register_v2_endpoints, v2_error_body

log = logging.getLogger("inferstack.web")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask("inferstack_web")
    app.request_class = SpoolingRequest
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes(settings.max_image_bytes)
    queue = _queue(settings)
    model_info = ModelInfo(queue)
    inference = Inference(settings, queue, model_info)
    # Every endpoint that decodes uploads takes a slot from here (see Inference.decode_slot).
    app.extensions["inferstack"] = {"settings": settings, "queue": queue, "decode_slots": inference.decode_slots}
    app.before_request(lambda: metrics.check_port(settings.metrics_port, request.environ.get("SERVER_PORT"),
                                                  request.path))
    register_predict_endpoints(app, PredictEndpoints(settings, inference))
    register_ops_endpoints(app, OpsEndpoints(settings, queue))
    register_v2_endpoints(app, V2Endpoints(settings, queue, inference, model_info))
    install_error_handlers(app, _unrouted_error_body, settings.max_image_bytes)
    return app


def _queue(settings: Settings) -> WebQueue:
    queue = WebQueue(settings.redis_url, settings.queue_prefix, settings.max_queue, settings.request_timeout_s)
    try:
        queue.ensure_group()  # before any worker: KEDA starts the first one from the group's lag
    except redis.RedisError as exc:
        log.warning("could not create the request stream yet (%s); /readyz retries", exc)
    return queue


def _unrouted_error_body(message: str) -> dict[str, Any]:
    """Errors of requests no blueprint routed (unknown path, wrong method): Flask cannot tell whose
    they are, so a path under /v2 gets the v2 API's shape and any other path /predict's."""
    v2 = request.blueprint is None and request.path.startswith(V2Endpoints.url_prefix)
    return v2_error_body(message) if v2 else predict_error_body(message)
