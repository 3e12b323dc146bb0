"""gunicorn hooks (loaded with -c python:inferstack_web.gunicorn_conf)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

# environ key: the app asked to end the connection after its answer (see close_after_answer)
CLOSE_AFTER = "inferstack.close_after"
# After such an answer, how long unread request bytes are read and dropped, so that closing with
# them unread (a TCP reset) does not destroy the answer before the client reads it.
LINGER_S = 2.0
# The gunicorn request each worker thread or greenlet is serving (threading.get_ident is
# per greenlet once gevent has patched the worker process).
_serving: dict[int, Any] = {}


def pre_request(worker: Any, req: Any) -> None:
    _serving[threading.get_ident()] = req


def post_request(worker: Any, req: Any, environ: dict[str, Any], resp: Any) -> None:
    _serving.pop(threading.get_ident(), None)
    sock = environ.get("gunicorn.socket")
    if environ.get(CLOSE_AFTER) and sock is not None:
        _linger(sock)


def close_after_answer(environ: dict[str, Any]) -> None:
    """Answer with Connection: close and close the connection afterwards, from a view: the rest of
    the request body may still be unread and must not be parsed as the next request."""
    req = _serving.get(threading.get_ident())
    if req is not None:
        req.must_close = True
        environ[CLOSE_AFTER] = True


def _linger(sock: socket.socket) -> None:
    """Half-close after the answer, then drop what the client still sends, for at most LINGER_S."""
    end = time.monotonic() + LINGER_S
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)  # gevent's sockets honour it without blocking the loop
            if not sock.recv(64 * 1024):
                return


def child_exit(server: Any, worker: Any) -> None:
    # Drop a dead worker's live gauges from the shared multiprocess metrics.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
