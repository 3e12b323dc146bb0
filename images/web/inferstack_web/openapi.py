"""The OpenAPI 3.0 document of both HTTP APIs, served at /openapi.json and fuzzed in the tests."""

from __future__ import annotations

from typing import Any

from inferstack.config import Settings
from inferstack.contract import http
from inferstack.contract.settings import MAX_IMAGES_PER_REQUEST, MAX_TENSOR_RANK

from .v2 import HEADER_LENGTH, INPUT, OUTPUT

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}}


def _errors(schema: str, codes: dict[int, str]) -> dict[str, Any]:
    return {
        str(code): _json(_ref(schema), text, RETRY_AFTER if code == 503 else None) for code, text in codes.items()
    }


PREDICT_ERRORS = {
    400: "No image, an undecodable or unsupported image, too many pixels, or a bad parameter",
    408: "The request body took longer than the body timeout to arrive (the connection is closed)",
    413: "The upload is over the size limit",
    500: "The model failed on this image",
    503: "Queue full or Redis unreachable; retry after Retry-After seconds",
    504: "No result within the request timeout",
}
INFER_ERRORS = {
    400: "A malformed inference request, or an image that cannot be decoded",
    404: "Unknown model or version",
    408: "The request body took longer than the body timeout to arrive (the connection is closed)",
    413: "The images are over the size limit",
    500: "The model failed on an image",
    503: "Queue full or Redis unreachable; retry after Retry-After seconds",
    504: "No result within the request timeout",
}

SCHEMAS: dict[str, Any] = {
    "Prediction": {
        "type": "object",
        "required": ["label", "probability"],
        "properties": {"label": {"type": "string"}, "probability": {"type": "number"}},
    },
    "PredictResponse": {
        "type": "object",
        "required": ["success"],
        "description": "`predictions` for one image; `results` (one per image, in order) for several",
        "properties": {
            "success": {"type": "boolean", "enum": [True]},
            "predictions": {"type": "array", "items": _ref("Prediction")},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["predictions"],
                    "properties": {"predictions": {"type": "array", "items": _ref("Prediction")}},
                },
            },
            "model": {"type": "string"},
        },
    },
    "PredictError": {
        "type": "object",
        "required": ["success", "error"],
        "properties": {"success": {"type": "boolean", "enum": [False]}, "error": {"type": "string"}},
    },
    "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Ready": {
        "type": "object",
        "required": ["ready"],
        "properties": {"ready": {"type": "boolean"}, "workers": {"type": "integer"}, "reason": {"type": "string"}},
    },
    "Parameters": {"type": "object", "additionalProperties": True},
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("TensorMetadata")},
            "parameters": _ref("Parameters"),
        },
    },
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "example": INPUT},
            "shape": {"type": "array", "minItems": 1, "maxItems": MAX_TENSOR_RANK,
                      "items": {"type": "integer", "minimum": 0, "maximum": MAX_IMAGES_PER_REQUEST}},
            "datatype": {"type": "string", "example": "BYTES"},
            "parameters": _ref("Parameters"),
            "data": {
                "type": "array",
                "description": "Base64 of each encoded image file (omit with binary_data_size)",
                "items": {"type": "string"},
            },
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "example": OUTPUT},
            "parameters": {
                "type": "object",
                "properties": {
                    "binary_data": {"type": "boolean"},
                    "classification": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "items": _ref("RequestInput"), "minItems": 1, "maxItems": 1},
            # One output, listed at most once (400 when a name repeats).
            "outputs": {"type": "array", "items": _ref("RequestOutput"), "minItems": 1, "maxItems": 1},
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
            "parameters": _ref("Parameters"),
            "data": {"type": "array", "items": {"oneOf": [{"type": "number"}, {"type": "string"}]}},
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _ref("ResponseOutput")},
        },
    },
}


def _model_param(settings: Settings) -> dict[str, Any]:
    return {"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
            "example": settings.model_name}


VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}, "example": "1"}


def _model_paths(settings: Settings, prefix: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    not_found = _errors("V2Error", {404: "Unknown model or version"})
    return {
        prefix: {
            "get": {
                "summary": "Model metadata",
                "parameters": params,
                "responses": {"200": _json(_ref("ModelMetadata"), "The model's inputs and outputs"), **not_found},
            }
        },
        f"{prefix}/ready": {
            "get": {
                "summary": "Model readiness: a live worker serves it",
                "parameters": params,
                "responses": {
                    "200": _json({"type": "object", "required": ["ready"]}, "Ready"),
                    **not_found,
                    **_errors("V2Error", {503: "No live worker yet, or Redis unreachable"}),
                },
            }
        },
        f"{prefix}/infer": {"post": _infer_operation(params)},
    }


def _infer_operation(params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "summary": "Classify a batch of images (one input `image`, BYTES, one encoded file per element)",
        "parameters": [
            *params,
            {"name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer"},
             "description": "Binary tensor data extension: size of the JSON header; binary data follows"},
        ],
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": _ref("InferenceRequest")},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"JSON header of {HEADER_LENGTH} bytes, then the binary tensor data",
                },
            },
        },
        "responses": {
            "200": {
                "description": "Outputs in order; binary outputs follow the JSON header "
                f"(its size in the {HEADER_LENGTH} response header)",
                "content": {
                    JSON: {"schema": _ref("InferenceResponse")},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_errors("V2Error", INFER_ERRORS),
        },
    }


def _predict_operation(settings: Settings) -> dict[str, Any]:
    image_files = {"type": "array", "maxItems": MAX_IMAGES_PER_REQUEST, "items": {"type": "string", "format": "binary"}}
    image_base64 = {
        "description": "Base64 of the image file, or a list of them",
        "oneOf": [{"type": "string", "format": "byte"}, {"type": "array", "items": {"type": "string", "format": "byte"}}],
    }
    return {
        "summary": "Classify one image (or several `image` parts: `results`, in order)",
        "parameters": [
            {"name": "top_k", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": settings.top_k}},
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                                   "properties": {"image": image_files}}},
                JSON: {"schema": {"type": "object", "required": ["image"], "properties": {"image": image_base64}}},
            },
        },
        "responses": {
            "200": _json(_ref("PredictResponse"), "Top-k predictions, by probability, descending"),
            **_errors("PredictError", PREDICT_ERRORS),
        },
    }


def _ops_paths() -> dict[str, Any]:
    metrics_text = {"description": "Exposition text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {
        http.HEALTHZ_PATH: {"get": {"summary": "Process alive",
                                    "responses": {"200": _json({"type": "object"}, "Alive")}}},
        http.READYZ_PATH: {
            "get": {
                "summary": "This pod can queue work (Redis reachable); the body counts live workers",
                "responses": {"200": _json(_ref("Ready"), "Ready"), "503": _json(_ref("Ready"), "Not ready")},
            }
        },
        http.METRICS_PATH: {"get": {"summary": "Prometheus metrics", "responses": {"200": metrics_text}}},
        http.OPENAPI_PATH: {
            "get": {"summary": "This document", "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0")}}
        },
    }


def _v2_server_paths() -> dict[str, Any]:
    v2 = http.V2_PREFIX
    return {
        v2: {"get": {"summary": "Server metadata", "responses": {"200": _json(_ref("ServerMetadata"), "Metadata")}}},
        f"{v2}/health/live": {
            "get": {"summary": "Server live", "responses": {"200": _json({"type": "object"}, "Live")}}
        },
        f"{v2}/health/ready": {
            "get": {
                "summary": "Server ready: it can queue work (Redis reachable)",
                "responses": {"200": _json({"type": "object"}, "Ready"), **_errors("V2Error", {503: "Redis unreachable"})},
            }
        },
    }


def document(settings: Settings) -> dict[str, Any]:
    model = _model_param(settings)
    paths: dict[str, Any] = {http.PREDICT_PATH: {"post": _predict_operation(settings)}, **_ops_paths(),
                             **_v2_server_paths()}
    paths.update(_model_paths(settings, f"{http.V2_PREFIX}/models/{{model}}", [model]))
    paths.update(_model_paths(settings, f"{http.V2_PREFIX}/models/{{model}}/versions/{{version}}",
                              [model, VERSION_PARAM]))
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "inferstack",
            "version": "1",
            "description": "Classic /predict and the Open Inference Protocol (v2) with the binary tensor "
            "data and classification extensions.",
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
