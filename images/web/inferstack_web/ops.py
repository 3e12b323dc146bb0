"""What operators and probes ask: /healthz, /readyz, /metrics, /openapi.json."""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, Flask, Response, jsonify

from inferstack.config import Settings
from inferstack.contract import http
from inferstack.protocol import WebQueue

from . import metrics, openapi
from .errors import install_error_handlers
from .predict import predict_error_body

log = logging.getLogger("inferstack.web")


class OpsEndpoints:
    def __init__(self, settings: Settings, queue: WebQueue) -> None:
        self.settings = settings
        self.queue = queue

    def healthz(self) -> Response:
        return jsonify(status="ok")

    def readyz(self) -> Response:
        # Ready = this pod can queue work, whether or not a worker runs now (workers may be
        # scaled to zero: a queued request is what brings one back). The body says how many run.
        try:
            self.queue.ensure_group()  # also after a Redis restart that lost the stream
            workers = self.queue.live_workers()
        except redis.RedisError as exc:
            # The details (host names, addresses) go to the log, not to whoever asks.
            log.warning("readyz: redis unreachable: %s", exc)
            resp = jsonify(ready=False, reason="Redis unreachable")
            resp.status_code = 503
            return resp
        return jsonify(ready=True, workers=len(workers))

    def metrics(self) -> Response:
        try:
            depth: int | None = self.queue.depth()
            live: int | None = len(self.queue.live_workers())
        except redis.RedisError:
            depth = live = None
        return Response(metrics.render(depth, live), mimetype="text/plain; version=0.0.4")

    def openapi(self) -> Response:
        return jsonify(openapi.document(self.settings))


def register_ops_endpoints(app: Flask, endpoints: OpsEndpoints) -> None:
    bp = Blueprint("ops", __name__)
    bp.add_url_rule(http.HEALTHZ_PATH, view_func=endpoints.healthz, methods=["GET"])
    bp.add_url_rule(http.READYZ_PATH, view_func=endpoints.readyz, methods=["GET"])
    bp.add_url_rule(http.METRICS_PATH, view_func=endpoints.metrics, methods=["GET"])
    bp.add_url_rule(http.OPENAPI_PATH, view_func=endpoints.openapi, methods=["GET"])
    install_error_handlers(bp, predict_error_body, endpoints.settings.max_image_bytes)
    app.register_blueprint(bp)
