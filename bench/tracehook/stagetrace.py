"""Stage timestamps for bench/serving_tax.py's one-client timeline: the one module that owns the
trace's environment variable, the traced methods and the file format (the writer and the reader).

Loaded into the stack's processes through PYTHONPATH (this folder's `sitecustomize`, which Python
imports at start). With TRACE_DIR_ENV set, the methods below are wrapped when their module is
imported: each call writes its begin and end times (CLOCK_MONOTONIC, the same clock in every
process) to <trace dir>/<pid>, one "<ns> <Class.method> <B|E>" line each. A renamed method fails
the import, so the bench fails loudly instead of timing nothing."""

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
TRACE_DIR_ENV = "INFERSTACK_TRACE_DIR"
_fd: int | None = None


def _mark(name: str, edge: str) -> None:
    global _fd
    if _fd is None:
        path = os.path.join(os.environ[TRACE_DIR_ENV], str(os.getpid()))
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
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


def install() -> None:
    """Wrap the traced methods of every module imported from now on, when TRACE_DIR_ENV is set."""
    if os.environ.get(TRACE_DIR_ENV):
        sys.meta_path.insert(0, _Wrapper())


def read_marks(trace_dir: str) -> list[tuple[int, str]]:
    """Every process's marks, (ns, "Class.method.B|E"), in time order."""
    marks = []
    for name in os.listdir(trace_dir):
        with open(os.path.join(trace_dir, name)) as f:
            for line in f:
                t, method, edge = line.split()
                marks.append((int(t), f"{method}.{edge}"))
    return sorted(marks)
