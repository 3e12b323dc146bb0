"""The few ways a request can fail, each with its HTTP status; mapped to JSON in app.py."""

from __future__ import annotations


class ApiError(Exception):
    status = 500
    retry_after: int | None = None

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


class ResultTimeout(ApiError):
    status = 504


class InferenceFailed(ApiError):
    """The worker answered with an error for this request."""

    status = 500
