"""Reading request bodies within bounds, before any decode slot is taken.

A body is read in full (``receive_body``) under a total-time deadline (408), a size cap (413) and
the process's spool budget (503), into a file under /tmp past its first UPLOAD_MEMORY_BYTES. Only
then does the request take a decode slot, inside which the body is inflated and parsed
(``ReceivedBody.data`` or ``ReceivedBody.install``); it is deleted when the slot ends.
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
import zlib
from typing import IO, Any, Self

from flask import Request, request
from werkzeug.exceptions import RequestEntityTooLarge

from inferstack.contract.settings import (
    MAX_JSON_INT_DIGITS,
    MAX_JSON_TOKENS,
    RECEIVE_CHUNK_BYTES,
    UPLOAD_MEMORY_BYTES,
)

from .connection import deadline
from .errors import BadRequest, RequestTimeout, Unavailable

ENCODINGS = {"gzip": 31, "deflate": 15}  # Content-Encoding -> zlib wbits


class SpoolingRequest(Request):
    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        # Multipart parts wait for decoding in /tmp, not in memory (werkzeug keeps 500 KB in memory).
        return tempfile.SpooledTemporaryFile(max_size=UPLOAD_MEMORY_BYTES, mode="rb+")


class SpoolBudget:
    """Bytes of request bodies one process may hold while receiving them (charged as they arrive,
    so a client dripping its body holds only what it sent)."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if n > self.left:
                return False
            self.left -= n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.left += n


class ReceivedBody:
    """A request body read in full; ``release`` (or leaving the ``with`` block) deletes it."""

    def __init__(self, budget: SpoolBudget, max_bytes: int) -> None:
        self.budget, self.max_bytes = budget, max_bytes
        self.file: IO[bytes] | None = tempfile.SpooledTemporaryFile(max_size=UPLOAD_MEMORY_BYTES, mode="rb+")
        self.size = 0

    def append(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.max_bytes:
            raise RequestEntityTooLarge()
        if not self.budget.take(len(chunk)):
            busy = Unavailable("The server is busy receiving other uploads; retry shortly.", 1)
            busy.close_connection = True  # the rest of this body stays unread
            raise busy
        self.size += len(chunk)
        assert self.file is not None
        self.file.write(chunk)

    def data(self) -> bytes:
        """The whole body, inflated as its Content-Encoding says, within the size cap (in a decode slot)."""
        assert self.file is not None
        self.file.seek(0)
        raw = self.file.read()
        encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding == "identity":
            return raw
        if encoding not in ENCODINGS:
            raise BadRequest(f"Content-Encoding {encoding[:20]!r} is not supported; use gzip, deflate or none.")
        return inflate(raw, ENCODINGS[encoding], encoding, self.max_bytes)

    def install(self) -> None:
        """Let Flask's form parser read this body (inflated) instead of the connection."""
        assert self.file is not None
        if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            self.install_data(self.data())  # the compressed copy goes
            return
        self.file.seek(0)
        request.environ["wsgi.input"] = self.file
        request.environ["CONTENT_LENGTH"] = str(self.size)
        request.environ.pop("HTTP_TRANSFER_ENCODING", None)

    def install_data(self, data: bytes) -> None:
        """Let Flask's form parser read ``data`` (this body as data() gave it); the file goes."""
        self.release_file()
        request.environ["wsgi.input"] = io.BytesIO(data)
        request.environ["CONTENT_LENGTH"] = str(len(data))
        request.environ.pop("HTTP_TRANSFER_ENCODING", None)

    def release_file(self) -> None:
        if self.file is not None:
            self.file.close()  # an unnamed temporary file: closing it frees the disk
            self.file = None
            self.budget.give(self.size)

    def release(self) -> None:
        self.release_file()
        request.environ["wsgi.input"] = io.BytesIO()  # an installed, inflated copy goes too

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def inflate(data: bytes, wbits: int, encoding: str, cap: int) -> bytes:
    inflater = zlib.decompressobj(wbits=wbits)
    try:
        out = inflater.decompress(data, cap + 1)
    except zlib.error:
        raise BadRequest(f"The body is not valid {encoding} data.") from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise RequestEntityTooLarge(f"The inflated request is larger than the limit of {cap} bytes.")
    return out


def receive_body(max_bytes: int, timeout_s: float, budget: SpoolBudget) -> ReceivedBody:
    """The whole request body, read within ``timeout_s`` (408) and ``max_bytes`` (413)."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise RequestEntityTooLarge()
    stream = request.environ["wsgi.input"]
    body = ReceivedBody(budget, max_bytes)
    try:
        with deadline(timeout_s, _too_slow(timeout_s)) as left:
            while chunk := stream.read(RECEIVE_CHUNK_BYTES):
                body.append(chunk)
                if left() <= 0:
                    raise _too_slow(timeout_s)
    except TimeoutError:  # gthread: a read waited for the rest of the deadline
        body.release_file()
        raise _too_slow(timeout_s) from None
    except OSError:  # the client went away (gunicorn's NoMoreData is one)
        body.release_file()
        raise BadRequest("The request body ended before its announced length.") from None
    except BaseException:
        body.release_file()
        raise
    if length is not None and body.size < length:
        body.release_file()
        raise BadRequest("The request body ended before its announced length.")
    return body


def _too_slow(timeout_s: float) -> RequestTimeout:
    return RequestTimeout(f"The request body took longer than {timeout_s:g} s to arrive; send it faster.")


def parse_json(data: bytes, what: str) -> Any:
    """A JSON body within bounds: at most MAX_JSON_TOKENS values, integers of at most
    MAX_JSON_INT_DIGITS digits; anything else is a 400 whose message starts with ``what``."""
    tokens = sum(data.count(c) for c in (b",", b":", b"[", b"{"))
    if tokens > MAX_JSON_TOKENS:
        raise BadRequest(f"{what}: it holds more than {MAX_JSON_TOKENS} JSON values.")
    try:
        return json.loads(data, parse_int=lambda s: _bounded_int(s, what))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest(f"{what}.") from None


def _bounded_int(text: str, what: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise BadRequest(f"{what}: it holds an integer of {len(text)} digits.")
    return int(text)
