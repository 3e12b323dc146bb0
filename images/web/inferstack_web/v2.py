"""The Open Inference Protocol (KServe v2 / Triton HTTP) beside /predict, on the same queue.

One model, one input `image` (BYTES: each element an encoded image file) and one output
`probabilities` (FP32 [N, classes]). Supported extensions: binary tensor data (inputs and
outputs after the JSON header, `Inference-Header-Content-Length`) and classification
(`parameters.classification: K` on a requested output -> BYTES "<prob>:<index>:<label>").
Errors are `{"error": "..."}` (the handlers register_v2_endpoints installs on its blueprint).
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import redis
from flask import Blueprint, Flask, Response, jsonify, request

from inferstack.config import Settings
from inferstack.contract import http
from inferstack.contract.messages import ModelRecord
from inferstack.protocol import WebQueue

from .errors import BadRequest, NotFound, PayloadTooLarge, Unavailable, install_error_handlers
from .inference import Inference, ModelInfo, decode_base64

INPUT = "image"
OUTPUT = "probabilities"
VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int  # 0: the raw probabilities


def _server_version() -> str:
    try:
        return metadata.version("inferstack")
    except metadata.PackageNotFoundError:
        return "0"


def v2_error_body(message: str) -> dict[str, Any]:
    return {"error": message}


class V2Endpoints:
    """The v2 views of one server: one model (settings.model_name), version VERSION."""

    url_prefix = http.V2_PREFIX

    def __init__(self, settings: Settings, queue: WebQueue, inference: Inference, model_info: ModelInfo) -> None:
        self.settings = settings
        self.queue = queue
        self.inference = inference
        self.model_info = model_info

    def check_model(self, model: str, version: str | None) -> None:
        served = self.settings.model_name
        if model != served:
            raise NotFound(f"Unknown model {model[:100]!r}; this server serves {served!r}.")
        if version not in (None, VERSION):
            raise NotFound(f"Unknown version {version[:20]!r} of model {model!r}; the only version is {VERSION!r}.")

    def live(self) -> Response:
        return jsonify(live=True)

    def ready(self) -> Response:
        # Like /readyz: this server can queue work (Redis answers); workers may come later.
        try:
            self.queue.depth()
        except redis.RedisError:
            raise Unavailable("The request queue is unreachable; retry shortly.", 2) from None
        return jsonify(ready=True)

    def server_metadata(self) -> Response:
        return jsonify(name="inferstack", version=_server_version(), extensions=EXTENSIONS)

    def model_metadata(self, model: str, version: str | None = None) -> Response:
        self.check_model(model, version)
        record = self.model_info.record()
        classes = record.classes if record and record.classes else -1
        return jsonify(
            name=self.settings.model_name,
            versions=[VERSION],
            platform="inferstack_keras",
            inputs=[{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            outputs=[{"name": OUTPUT, "datatype": "FP32", "shape": [-1, classes]}],
            parameters=_model_parameters(record),
        )

    def model_ready(self, model: str, version: str | None = None) -> Response:
        self.check_model(model, version)
        try:
            workers = self.queue.live_workers()
        except redis.RedisError:
            raise Unavailable("The request queue is unreachable; retry shortly.", 2) from None
        if not workers:
            raise Unavailable(f"No live worker serves {model!r} yet; retry shortly.", 2)
        return jsonify(name=self.settings.model_name, ready=True)

    def infer(self, model: str, version: str | None = None) -> Response:
        started = time.perf_counter()
        self.check_model(model, version)
        header, binary = _split_body(_body(self.settings.max_image_bytes), request.headers.get(HEADER_LENGTH))
        images = _input_images(header, binary)
        outputs = _requested_outputs(header)
        probs = self._probabilities(images, started)
        tensors, blobs = _output_tensors(outputs, probs, self._labels(probs.shape[1]))
        body: dict[str, Any] = {"model_name": self.settings.model_name, "model_version": VERSION, "outputs": tensors}
        if isinstance(header.get("id"), str):
            body["id"] = header["id"]
        return _infer_response(body, blobs)

    def _probabilities(self, images: list[bytes], started: float) -> np.ndarray:
        """Every class's probability for each image, (N, classes) float32."""
        # The top-k the worker computes is not used here: the full vector answers both outputs.
        results = self.inference.run(images, 1, started, probabilities=True)
        if any(r.probabilities is None for r in results):
            # A worker from before this API (mid-rollout) ignores the request for the full vector.
            raise Unavailable("A worker without v2 support answered; retry shortly.", 1)
        return np.stack([r.probabilities for r in results]).astype(np.float32)

    def _labels(self, classes: int) -> list[str] | None:
        """The served model's labels when they match its output (for the classification extension)."""
        record = self.model_info.record()
        labels = list(record.labels) if record and record.labels else None
        return labels if labels is not None and len(labels) == classes else None


def register_v2_endpoints(app: Flask, endpoints: V2Endpoints) -> None:
    """The v2 routes, each model route also under /versions/<version>, with the v2 error shape."""
    bp = Blueprint("v2", __name__, url_prefix=endpoints.url_prefix)
    bp.add_url_rule("/health/live", view_func=endpoints.live, methods=["GET"])
    bp.add_url_rule("/health/ready", view_func=endpoints.ready, methods=["GET"])
    bp.add_url_rule("", view_func=endpoints.server_metadata, methods=["GET"])
    for rule, view, methods in (("", endpoints.model_metadata, ["GET"]), ("/ready", endpoints.model_ready, ["GET"]),
                                ("/infer", endpoints.infer, ["POST"])):
        bp.add_url_rule(f"/models/<model>{rule}", endpoint=view.__name__, view_func=view, methods=methods)
        bp.add_url_rule(f"/models/<model>/versions/<version>{rule}", endpoint=view.__name__, view_func=view,
                        methods=methods)
    install_error_handlers(bp, v2_error_body, endpoints.settings.max_image_bytes)
    app.register_blueprint(bp)


def _model_parameters(record: ModelRecord | None) -> dict[str, str]:
    """What runs the model (v2 parameters hold scalars: the precision choice travels as a JSON string)."""
    if record is None:
        return {}
    return {"runtime": record.runtime, "precision": record.precision,
            "precision_choice": json.dumps(dict(record.precision_choice), sort_keys=True)}


def _output_tensors(outputs: list[RequestedOutput], probs: np.ndarray, labels: list[str] | None
                    ) -> tuple[list[dict[str, Any]], list[bytes]]:
    tensors, blobs = [], []
    for out in outputs:
        tensor, blob = _output_tensor(out, probs, labels)
        tensors.append(tensor)
        if blob is not None:
            blobs.append(blob)
    return tensors, blobs


def _infer_response(body: dict[str, Any], blobs: list[bytes]) -> Response:
    """JSON alone, or (binary tensor extension) the JSON header followed by the binary outputs."""
    if not blobs:
        return jsonify(body)
    head = json.dumps(body).encode()
    resp = Response(head + b"".join(blobs), mimetype="application/octet-stream")
    resp.headers[HEADER_LENGTH] = str(len(head))
    return resp


def _body(limit: int) -> bytes:
    """The request body, inflated if the client compressed it (tritonclient can), held to the limits."""
    data = request.get_data(cache=False)
    encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding == "identity":
        return data
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding[:20]!r} is not supported; use gzip, deflate or none.")
    # The inflated body may carry base64 (4/3) plus the JSON header; never inflate past that.
    cap = limit * 4 // 3 + 64 * 1024
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(data, cap + 1)
    except zlib.error:
        raise BadRequest(f"The body is not valid {encoding} data.") from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"The inflated request is larger than the limit of {cap} bytes.")
    return out


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 < n <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} must be the JSON header's size in bytes (1..{len(body)}).")
        head, binary = body[:n], body[n:]
    try:
        header = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadRequest(
            "The body is not a JSON inference request; binary tensor data needs the "
            f"{HEADER_LENGTH} header."
        ) from None
    if not isinstance(header, dict):
        raise BadRequest("The inference request must be a JSON object with an 'inputs' list.")
    return header, binary


def _input_images(header: dict[str, Any], binary: bytes) -> list[bytes]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"'inputs' must list exactly one input, {INPUT!r} (BYTES, one encoded image per element).")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise BadRequest(f"Unknown input {str(tensor.get('name'))[:100]!r}; this model's input is {INPUT!r}.")
    if tensor.get("datatype") != "BYTES":
        raise BadRequest(f"Input {INPUT!r} must have datatype BYTES (each element an encoded image file).")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"Input {INPUT!r} needs a shape: a list of non-negative integers, e.g. [2].")
    count = math.prod(shape)
    params = tensor.get("parameters")
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if type(size) is not int or size != len(binary):
            raise BadRequest(
                f"binary_data_size of {INPUT!r} ({str(size)[:20]}) does not match the {len(binary)} bytes "
                "after the JSON header."
            )
        images = _bytes_elements(binary)
    else:
        if binary:
            raise BadRequest(f"Binary data follows the JSON header but {INPUT!r} has no binary_data_size.")
        data = tensor.get("data")
        if not isinstance(data, list):
            raise BadRequest(f"Input {INPUT!r} needs 'data': a list of base64 strings, or binary_data_size.")
        flat = _flatten(data)
        if not all(isinstance(x, str) for x in flat):
            raise BadRequest(f"Each element of {INPUT!r} must be a base64 string of an image file.")
        images = [decode_base64(x, f"Element {i + 1} of {INPUT!r}") for i, x in enumerate(flat)]
    if len(images) != count:
        raise BadRequest(f"Input {INPUT!r} has shape {shape} ({count} elements) but carries {len(images)}.")
    return images


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _bytes_elements(raw: bytes) -> list[bytes]:
    """Binary BYTES tensor: each element is a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequest(f"The binary data of {INPUT!r} ends inside an element's 4-byte length.")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise BadRequest(f"The binary data of {INPUT!r} ends inside an element ({n} bytes announced).")
        out.append(raw[pos:pos + n])
        pos += n
    return out


def _requested_outputs(header: dict[str, Any]) -> list[RequestedOutput]:
    params = header.get("parameters")
    params = params if isinstance(params, dict) else {}
    binary_default = params.get("binary_data_output") is True
    requested = header.get("outputs")
    if requested is None:
        return [RequestedOutput(OUTPUT, binary_default, 0)]
    if not isinstance(requested, list) or not requested:
        raise BadRequest(f"'outputs' must be a non-empty list of requested outputs, e.g. [{{'name': {OUTPUT!r}}}].")
    out = []
    for item in requested:
        if not isinstance(item, dict) or item.get("name") != OUTPUT:
            name = item.get("name") if isinstance(item, dict) else item
            raise BadRequest(f"Unknown output {str(name)[:100]!r}; this model's output is {OUTPUT!r}.")
        p = item.get("parameters")
        p = p if isinstance(p, dict) else {}
        binary = p.get("binary_data", binary_default)
        k = p.get("classification", 0)
        if not isinstance(binary, bool):
            raise BadRequest("The output parameter binary_data must be true or false.")
        if type(k) is not int or k < 0:
            raise BadRequest("The output parameter classification must be a non-negative integer (top K).")
        out.append(RequestedOutput(OUTPUT, binary, k))
    return out


def _output_tensor(
    out: RequestedOutput, probs: np.ndarray, labels: list[str] | None
) -> tuple[dict[str, Any], bytes | None]:
    n, classes = probs.shape
    tensor: dict[str, Any] = {"name": out.name}
    if out.classification:
        k = min(out.classification, classes)
        # Triton's order: highest value first; ties by index.
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        strings = [
            f"{probs[row, i]:f}:{i}" + (f":{labels[i]}" if labels else "") for row in range(n) for i in top[row]
        ]
        tensor.update(datatype="BYTES", shape=[n, k])
        if not out.binary:
            tensor["data"] = strings
            return tensor, None
        encoded = [s.encode() for s in strings]
        blob = b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    else:
        tensor.update(datatype="FP32", shape=[n, classes])
        if not out.binary:
            tensor["data"] = probs.ravel().tolist()
            return tensor, None
        blob = probs.astype("<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(blob)}
    return tensor, blob
