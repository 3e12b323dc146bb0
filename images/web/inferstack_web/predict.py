"""POST /predict: the seed-compatible API. Errors are {"success": false, "error": ...}."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request

from inferstack.config import Settings
from inferstack.contract import http

from . import metrics
from .errors import BadRequest, PayloadTooLarge, install_error_handlers
from .inference import Inference, check_image_count, decode_base64
from .multipart import Limits, form_files
from .uploads import ReceivedBody, parse_json

STARTED = "inferstack.start"  # request.environ key: when the request arrived
JSON_BODY = 'A JSON body must be {"image": "<the image file, base64>"} (or a list of such strings)'


def predict_error_body(message: str) -> dict[str, Any]:
    return {"success": False, "error": message}


def top_k_param(raw: str | None, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"top_k must be an integer between 1 and 1000, got {raw[:20]!r}.") from None
    if not 1 <= value <= 1000:
        raise BadRequest(f"top_k must be between 1 and 1000, got {value}.")
    return value


class PredictEndpoints:
    def __init__(self, settings: Settings, inference: Inference) -> None:
        self.settings = settings
        self.inference = inference

    def predict(self) -> Response:
        request.environ[STARTED] = started = time.perf_counter()
        top_k = top_k_param(request.args.get("top_k"), self.settings.top_k)
        body = self.inference.receive()  # before any decode slot: a slow sender holds none
        several = False

        def parse(received: ReceivedBody) -> list[bytes]:
            nonlocal several
            images, several = uploaded_images(received, self.settings.max_image_bytes)
            return images

        ids = self.inference.enqueue(body, parse, top_k)
        results = self.inference.replies(ids, started)
        body: dict[str, Any] = {"success": True}
        if several:
            body["results"] = [{"predictions": r.predictions} for r in results]
        else:
            body["predictions"] = results[0].predictions
        if results[0].model:
            body["model"] = results[0].model
        return jsonify(body)


def count_request(resp: Response) -> Response:
    """Request count by status and latency of every /predict answer, errors included."""
    metrics.REQUESTS.labels(code=str(resp.status_code)).inc()
    started = request.environ.get(STARTED)
    if started is not None:
        metrics.LATENCY.observe(time.perf_counter() - started)
    return resp


def register_predict_endpoints(app: Flask, endpoints: PredictEndpoints) -> None:
    bp = Blueprint("predict", __name__)
    bp.add_url_rule(http.PREDICT_PATH, view_func=endpoints.predict, methods=["POST"])
    bp.after_request(count_request)
    install_error_handlers(bp, predict_error_body, endpoints.settings.max_image_bytes)
    app.register_blueprint(bp)


def uploaded_images(body: ReceivedBody, limit: int) -> tuple[list[bytes], bool]:
    """The encoded images of a /predict request (call inside a decode slot), and whether it asked
    for several (-> "results")."""
    if request.is_json:
        return _json_images(parse_json(body.data(), JSON_BODY))
    if request.mimetype == "multipart/form-data":
        # The body and its images at once: twice the body, as web_memory_limit_bytes allows a slot.
        data = body.data()
        limits = Limits(request.max_form_parts, request.max_form_memory_size)
        files = form_files(data, request.mimetype_params.get("boundary", ""), http.IMAGE_FIELD, limits)
        if files is not None:
            body.release_file()
            _check_count(len(files))  # their total size: Inference.decode checks it, as for every body
            return files, len(files) > 1
        body.install_data(data)  # not the plain shape: werkzeug parses it
    else:
        body.install()
    uploads = request.files.getlist(http.IMAGE_FIELD)
    try:
        return _read_uploads(uploads, limit), len(uploads) > 1
    finally:
        for upload in request.files.values():
            upload.close()  # the parts' files under /tmp go with the decode slot, not the request


def _read_uploads(uploads: list[Any], limit: int) -> list[bytes]:
    _check_count(len(uploads))
    images, total = [], 0
    for upload in uploads:
        data = upload.stream.read(limit + 1 - total)
        total += len(data)
        if total > limit:
            raise PayloadTooLarge(f"The upload is larger than the limit of {limit} bytes.")
        images.append(data)
    return images


def _check_count(count: int) -> None:
    if not count:
        raise BadRequest(
            "No 'image' field in the request; send the file as multipart/form-data, "
            'e.g. curl -F image=@cat.jpg, or JSON {"image": "<base64>"}.'
        )
    check_image_count(count)


def _json_images(body: Any) -> tuple[list[bytes], bool]:
    image = body.get(http.IMAGE_FIELD) if isinstance(body, dict) else None
    if isinstance(image, str):
        return [decode_base64(image, "'image'")], False
    if isinstance(image, list) and image and all(isinstance(x, str) for x in image):
        check_image_count(len(image))
        return [decode_base64(x, f"'image'[{i}]") for i, x in enumerate(image)], True
    raise BadRequest(JSON_BODY + ".")
