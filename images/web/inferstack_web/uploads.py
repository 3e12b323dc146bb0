"""Reading uploads within bounds: spooled to /tmp, held to the size limit, drained on a 413."""

from __future__ import annotations

import contextlib
import tempfile
import time
from typing import IO, Any

from flask import Request, request

from inferstack.config import UPLOAD_MEMORY_BYTES

# Multipart framing around the file; the file itself is held to max_image_bytes.
MULTIPART_SLACK = 64 * 1024
# Reading the rest of a too-large body lets the client see our 413 instead of a reset; but only
# so much, and only for so long: a client dripping its body must not hold a connection forever.
DRAIN_LIMIT = 64 * 1024 * 1024
DRAIN_TIMEOUT_S = 5.0


class SpoolingRequest(Request):
    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        # Uploads wait for a decode slot in /tmp, not in memory (werkzeug keeps 500 KB in memory).
        return tempfile.SpooledTemporaryFile(max_size=UPLOAD_MEMORY_BYTES, mode="rb+")


def max_content_length(max_image_bytes: int) -> int:
    """Room for the images base64-encoded in JSON; the images themselves are held to max_image_bytes."""
    return (max_image_bytes + 2) // 3 * 4 + MULTIPART_SLACK


def drain() -> bool:
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
        # Under gevent the limit ends the block silently: `left` then still counts what was not read.
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
