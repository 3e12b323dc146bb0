"""gunicorn hooks (loaded with -c python:inferstack_web.gunicorn_conf)."""

from __future__ import annotations

import os
from typing import Any


def child_exit(server: Any, worker: Any) -> None:
    # Drop a dead worker's live gauges from the shared multiprocess metrics.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
