"""The client connection under gunicorn (gevent or gthread worker): deadlines on blocking reads,
draining an unread body, and ending the connection after an answer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import request

from .gunicorn_conf import close_after_answer

# Reading the rest of a too-large body lets the client see our 413 instead of a reset; but only
# so much, and only for so long: a client dripping its body must not hold a connection forever.
DRAIN_LIMIT = 64 * 1024 * 1024
DRAIN_TIMEOUT_S = 5.0


@contextlib.contextmanager
def deadline(seconds: float, expired: Exception) -> Iterator[Callable[[], float]]:
    """A total-time limit on the blocking reads in the block, raising ``expired`` when it passes;
    yields a function giving the seconds left, to call between reads.

    Under gevent a Timeout interrupts the read blocked on the socket; under gthread each call of
    the function gives the next read the time left as its socket timeout (TimeoutError after it).
    """
    end = time.monotonic() + seconds
    sock = request.environ.get("gunicorn.socket")
    patched = _gevent_patched()

    def left() -> float:
        remaining = end - time.monotonic()
        if sock is not None and not patched and remaining > 0:
            sock.settimeout(remaining)
        return remaining

    if not patched:
        left()
        try:
            yield left
        finally:
            if sock is not None:
                sock.settimeout(None)  # blocking again, as gthread serves the rest of the request
        return
    from gevent import Timeout

    with Timeout(seconds, expired):
        yield left


def close_connection() -> None:
    """End the connection after this answer (Connection: close): the unread rest of the body must
    not be parsed as a request. (gunicorn drops a Connection header set by the app.)"""
    close_after_answer(request.environ)


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
    end = time.monotonic() + DRAIN_TIMEOUT_S
    try:
        # Under gevent the limit ends the block silently: `left` then still counts what was not read.
        with _time_limit(DRAIN_TIMEOUT_S):
            while left > 0 and time.monotonic() < end:
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
