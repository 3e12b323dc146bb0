"""Stage timestamps for bench/request_timeline.py, loaded into the stack's processes through
PYTHONPATH (Python imports `sitecustomize` at start). With INFERSTACK_TRACE_DIR set, the methods
below are wrapped when their module is imported: each call writes its begin and end times
(CLOCK_MONOTONIC, the same clock in every process) to INFERSTACK_TRACE_DIR/<pid>. A renamed
method fails the import, so the bench fails loudly instead of timing nothing."""

import functools
import importlib.abc
import importlib.util
import os
import sys
import time

TRACED = {
    "inferstack_web.predict": [("PredictEndpoints", "predict")],
    "inferstack_web.inference": [("Inference", "receive"), ("Inference", "decode"), ("Inference", "_submit")],
    "inferstack.protocol": [("WebQueue", "_wait_raw"), ("WorkerQueue", "now_ms"), ("WorkerQueue", "complete")],
    "inferstack_worker.worker": [("Worker", "process")],
    "inferstack_worker.classifier": [("Classifier", "predict")],
}
DIR = os.environ.get("INFERSTACK_TRACE_DIR")
_fd: int | None = None


def _mark(name: str, edge: str) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.path.join(DIR, str(os.getpid())), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{time.perf_counter_ns()} {name} {edge}\n".encode())


def _timed(name, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        _mark(name, "B")
        try:
            return fn(*args, **kwargs)
        finally:
            _mark(name, "E")

    return timed


class _Wrapper(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in TRACED:
            return None
        sys.meta_path.remove(self)  # find the real spec without finding ourselves again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            for cls, attr in TRACED[fullname]:
                owner = getattr(module, cls)
                setattr(owner, attr, _timed(f"{cls}.{attr}", getattr(owner, attr)))

        spec.loader.exec_module = exec_module
        return spec


if DIR:
    sys.meta_path.insert(0, _Wrapper())
