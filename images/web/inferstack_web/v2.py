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
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import redis
from flask import Blueprint, Flask, Response, jsonify, request

from inferstack.config import Settings
from inferstack.contract import http
from inferstack.contract.messages import ModelRecord
from inferstack.contract.settings import MAX_IMAGES_PER_REQUEST, MAX_TENSOR_RANK
from inferstack.protocol import WebQueue

from .errors import BadRequest, NotFound, Unavailable, install_error_handlers
from .inference import Inference, ModelInfo, check_image_count, decode_base64
from .uploads import ReceivedBody, parse_json

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
        body = self.inference.receive()  # before any decode slot: a slow sender holds none
        asked: dict[str, Any] = {}

        def parse(received: ReceivedBody) -> list[bytes]:
            # Inside the decode slot; only the small `asked` outlives it (the header and body do not).
            header, binary = _split_body(received.data(), request.headers.get(HEADER_LENGTH))
            asked["outputs"] = _requested_outputs(header)
            asked["id"] = header.get("id") if isinstance(header.get("id"), str) else None
            return _input_images(header, binary)

        # The top-k the worker computes is not used here: the full vector answers both outputs.
        ids = self.inference.enqueue(body, parse, 1, probabilities=True)
        probs = self._probabilities(ids, started)
        tensors, blobs = _output_tensors(asked["outputs"], probs, self._labels(probs.shape[1]))
        reply: dict[str, Any] = {"model_name": self.settings.model_name, "model_version": VERSION, "outputs": tensors}
        if asked["id"] is not None:
            reply["id"] = asked["id"]
        return _infer_response(reply, blobs)

    def _probabilities(self, ids: list[str], started: float) -> np.ndarray:
        """Every class's probability for each queued image, (N, classes) float32."""
        results = self.inference.replies(ids, started)
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


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        try:
            n = int(header_length) if len(header_length) < 20 else -1
        except ValueError:
            n = -1
        if not 0 < n <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} must be the JSON header's size in bytes (1..{len(body)}).")
        head, binary = body[:n], memoryview(body)[n:]  # the binary part is not copied
    header = parse_json(head, "The body is not a JSON inference request; binary tensor data needs the "
                              f"{HEADER_LENGTH} header")
    if not isinstance(header, dict):
        raise BadRequest("The inference request must be a JSON object with an 'inputs' list.")
    return header, binary


def _input_images(header: dict[str, Any], binary: memoryview) -> list[bytes]:
    tensor = _input_tensor(header)
    count = _element_count(tensor.get("shape"))
    params = tensor.get("parameters")
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if type(size) is not int or size != len(binary):
            raise BadRequest(
                f"binary_data_size of {INPUT!r} ({str(size)[:20]}) does not match the {len(binary)} bytes "
                "after the JSON header."
            )
        images = _bytes_elements(binary, count)
    else:
        if binary:
            raise BadRequest(f"Binary data follows the JSON header but {INPUT!r} has no binary_data_size.")
        data = tensor.get("data")
        if not isinstance(data, list):
            raise BadRequest(f"Input {INPUT!r} needs 'data': a list of base64 strings, or binary_data_size.")
        flat = _flatten(data)
        _check_count(count, len(flat))
        if not all(isinstance(x, str) for x in flat):
            raise BadRequest(f"Each element of {INPUT!r} must be a base64 string of an image file.")
        images = [decode_base64(x, f"Element {i + 1} of {INPUT!r}") for i, x in enumerate(flat)]
    _check_count(count, len(images))
    return images


def _input_tensor(header: dict[str, Any]) -> dict[str, Any]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"'inputs' must list exactly one input, {INPUT!r} (BYTES, one encoded image per element).")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise BadRequest(f"Unknown input {str(tensor.get('name'))[:100]!r}; this model's input is {INPUT!r}.")
    if tensor.get("datatype") != "BYTES":
        raise BadRequest(f"Input {INPUT!r} must have datatype BYTES (each element an encoded image file).")
    return tensor


def _element_count(shape: Any) -> int:
    """The element count a shape announces, its rank and dimensions bounded before multiplying."""
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_TENSOR_RANK
            or not all(type(d) is int and 0 <= d <= MAX_IMAGES_PER_REQUEST for d in shape)):
        raise BadRequest(
            f"Input {INPUT!r} needs a shape: a list of 1 to {MAX_TENSOR_RANK} integers, each between 0 and "
            f"{MAX_IMAGES_PER_REQUEST}, e.g. [2]."
        )
    count = math.prod(shape)  # at most 256 ** 8: a small integer
    check_image_count(count)
    return count


def _check_count(count: int, carried: int) -> None:
    if carried != count:
        raise BadRequest(f"Input {INPUT!r} has a shape of {count} elements but carries {carried}.")


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


def _bytes_elements(raw: memoryview, count: int) -> list[bytes]:
    """Binary BYTES tensor: each element is a 4-byte little-endian length, then the bytes; more
    elements than the shape's ``count`` is an error found at the first extra one."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if len(out) == count:
            _check_count(count, count + 1)
        if pos + 4 > len(raw):
            raise BadRequest(f"The binary data of {INPUT!r} ends inside an element's 4-byte length.")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise BadRequest(f"The binary data of {INPUT!r} ends inside an element ({n} bytes announced).")
        out.append(bytes(raw[pos:pos + n]))
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
    out: list[RequestedOutput] = []
    for item in requested:
        if not isinstance(item, dict) or item.get("name") != OUTPUT:
            name = item.get("name") if isinstance(item, dict) else item
            raise BadRequest(f"Unknown output {str(name)[:100]!r}; this model's output is {OUTPUT!r}.")
        if any(o.name == OUTPUT for o in out):
            # Each output once: a reply holds one tensor per name, built once.
            raise BadRequest(f"'outputs' names {OUTPUT!r} more than once; list each output once.")
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
