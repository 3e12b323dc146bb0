"""The few ways a request can fail, each with its HTTP status, and the handlers that answer them as JSON.

Each API (``/predict`` and its neighbours, the v2 API) has its own error body; its register
function installs these handlers with that body on its blueprint (``install_error_handlers``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .connection import close_connection, drain

log = logging.getLogger("inferstack.web")

# message -> JSON body of an error answer
ErrorBody = Callable[[str], dict[str, Any]]


class ApiError(Exception):
    status = 500
    retry_after: int | None = None
    close_connection = False  # True when the rest of the request body may still be unread

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    """Missing field, bad parameter, or an upload that is not a usable image."""

    status = 400


class NotFound(ApiError):
    """A v2 model name or version this server does not serve."""

    status = 404


class PayloadTooLarge(ApiError):
    status = 413


class Unavailable(ApiError):
    """Queue full or Redis unreachable: the client should retry later."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(ApiError):
    """The client took longer than the body deadline to send its request body."""

    status = 408
    close_connection = True


class ResultTimeout(ApiError):
    status = 504


class InferenceFailed(ApiError):
    """The worker answered with an error for this request."""

    status = 500


UNEXPECTED = "Internal error; the request was not processed. Retry, and report it if it persists."


def error_response(body: ErrorBody, status: int, message: str, retry_after: int | None = None) -> Response:
    resp = jsonify(body(message))
    resp.status_code = status
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


def too_large_response(body: ErrorBody, max_image_bytes: int) -> Response:
    drained = drain()
    if not drained:
        close_connection()
    return error_response(body, 413, f"The upload is larger than the limit of {max_image_bytes} bytes.")


def install_error_handlers(scope: Flask | Blueprint, body: ErrorBody, max_image_bytes: int) -> None:
    """Every failure of the views in ``scope`` answered as ``body``: never an HTML page or a trace."""

    def api_error(exc: ApiError) -> Response:
        if exc.close_connection:
            close_connection()
        return error_response(body, exc.status, exc.message, exc.retry_after)

    def too_large(exc: RequestEntityTooLarge) -> Response:
        return too_large_response(body, max_image_bytes)

    def http_error(exc: HTTPException) -> Response:
        return error_response(body, exc.code or 500, exc.description or exc.name)

    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(body, 500, UNEXPECTED)

    scope.register_error_handler(ApiError, api_error)
    scope.register_error_handler(RequestEntityTooLarge, too_large)
    scope.register_error_handler(HTTPException, http_error)
    scope.register_error_handler(Exception, unexpected)
