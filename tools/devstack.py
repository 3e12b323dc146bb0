"""The whole stack on one machine, without Kubernetes: redis-server, N workers, gunicorn.

`make run` uses it in the foreground; the tests and benchmarks use the same class so what they
exercise is what a user runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from inferstack.contract import http
from inferstack.contract.settings import default as setting_default
from inferstack.contract.settings import env_name

REDIS_URL = env_name("redis_url")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(name: str) -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    module = {"inferstack-web": "inferstack_web.cli", "inferstack-worker": "inferstack_worker.cli"}[name]
    return [sys.executable, "-m", module]


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


class LocalStack:
    def __init__(
        self,
        port: int | None = None,
        redis_port: int | None = None,
        env: dict[str, str] | None = None,
        log_dir: str | None = None,
        quiet: bool = True,
        redis_args: list[str] | None = None,
        web_env: dict[str, str] | None = None,
    ) -> None:
        """``redis_args``: redis-server's arguments after ``--port`` (default: local, no persistence,
        no auth); ``web_env`` over ``env`` for gunicorn only (workers take theirs in start_worker)."""
        self.port = port or free_port()
        self.redis_port = redis_port or free_port()
        self.env = {k: v for k, v in os.environ.items()}
        self.env.update(env or {})
        self.env[REDIS_URL] = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env[env_name("port")] = str(self.port)
        self.env.setdefault(env_name("host"), "127.0.0.1")
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="inferstack-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self.redis_args = redis_args
        self.web_env = web_env or {}
        self.redis: subprocess.Popen | None = None
        self.web: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._worker_seq = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, argv: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        # Own process group: Ctrl-C in `make run` reaches us, and we stop the children in order.
        if not self.quiet:
            return subprocess.Popen(argv, env=env or self.env, start_new_session=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:  # the child keeps its own descriptor
            return subprocess.Popen(argv, env=env or self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        try:
            socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2).close()
            raise RuntimeError(f"port {self.redis_port} is already in use; pick another with REDIS_PORT=...")
        except OSError:
            pass
        self.redis = self._spawn(
            [server, "--port", str(self.redis_port), *(self.redis_args if self.redis_args is not None else [
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"])],
            "redis",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2).close()
                self._load_functions()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.redis_port}")

    def _load_functions(self) -> None:
        """The queue's Redis functions, as the Redis pod's start hook loads them: the web tier can
        queue before any worker ran. Skipped on a server with ACL users (its worker loads them)."""
        import redis

        from inferstack.contract.redis_functions import LIBRARY

        try:
            redis.Redis(port=self.redis_port, socket_timeout=5).function_load(LIBRARY, replace=True)
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError):
            pass
        except redis.ResponseError as exc:
            if "NOAUTH" not in str(exc):
                raise

    def stop_redis(self) -> None:
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)
            self.redis = None

    def start_worker(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        self._worker_seq += 1
        wenv = dict(self.env)
        wenv.update(env or {})
        wenv.setdefault(env_name("worker_name"), f"local-worker-{self._worker_seq}-{os.getpid()}")
        gpus = _gpu_count()
        if gpus and "CUDA_VISIBLE_DEVICES" not in wenv:
            # One worker process per GPU: each sees only its own device.
            wenv["CUDA_VISIBLE_DEVICES"] = str((self._worker_seq - 1) % gpus)
        proc = self._spawn(_script("inferstack-worker"), f"worker-{self._worker_seq}", wenv)
        self.workers.append(proc)
        return proc

    def start_web(self) -> None:
        self.web = self._spawn(_script("inferstack-web"), "web", {**self.env, **self.web_env})

    def wait_ready(self, timeout_s: float = 180.0, workers: int = 1) -> None:
        """Until /readyz says ready with at least `workers` live workers."""
        import json

        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            for proc in [self.redis, self.web, *self.workers]:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"a process exited early ({proc.args}); logs in {self.log_dir}")
            try:
                with urllib.request.urlopen(self.url + http.READYZ_PATH, timeout=2) as resp:
                    body = json.loads(resp.read())
                    if body.get("workers", 0) >= workers:
                        return
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"stack not ready after {timeout_s} s: {last}; logs in {self.log_dir}")

    def start(self, workers: int = 1, wait: bool = True) -> LocalStack:
        self.start_redis()
        for _ in range(workers):
            self.start_worker()
        self.start_web()
        if wait and workers:
            self.wait_ready(workers=workers)
        return self

    def stop(self) -> None:
        # Web first (no new work), then workers (finish their batch), then the queue.
        procs = [self.web, *self.workers]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.web = None
        self.workers = []
        self.stop_redis()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _imagenet_weights_available() -> bool:
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    if any(cache.glob("resnet50_weights_tf_dim_ordering_tf_kernels*.h5")):
        return True
    try:
        urllib.request.urlopen("https://storage.googleapis.com/tensorflow/keras-applications/", timeout=5)
        return True
    except urllib.error.HTTPError:
        return True  # reachable; the download itself will work
    except OSError:
        return False


def weights_fallback_env(prog: str = "inferstack") -> dict[str, str]:
    """ResNet50 with ImageNet weights that cannot be had here: say so loudly and use random ones.

    Only for the local tooling (`make run`, `make loadtest`); the worker itself never falls back.
    """
    weights, model = env_name("weights"), env_name("model")
    if weights in os.environ or os.environ.get(model, setting_default("model")) != "ResNet50":
        return {}
    if _imagenet_weights_available():
        return {}
    print(
        f"{prog}: ImageNet weights are not cached and cannot be downloaded here; serving ResNet50 with "
        f"RANDOM weights ({weights}=none): same speed, meaningless labels. Put the weights file in "
        f"~/.keras/models or set {weights}=/path/to/weights.h5.",
        file=sys.stderr,
    )
    return {weights: "none"}


class _Stop(Exception):
    """Ctrl-C or SIGTERM reached `make run`."""


def _announce_ready(stack: LocalStack, workers: int) -> None:
    try:
        stack.wait_ready(timeout_s=3600, workers=workers)
    except RuntimeError:
        return  # a process died; main() reports it
    print(f"inferstack: ready. Try: curl -X POST -F image=@cat.jpg {stack.url}{http.PREDICT_PATH}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run redis-server, workers and the web API locally.")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))
    args = parser.parse_args()
    stack = LocalStack(port=int(os.environ.get(env_name("port"), http.LOCAL_WEB_PORT)), redis_port=int(
        os.environ.get("REDIS_PORT", http.REDIS_PORT)), env=weights_fallback_env(), quiet=False)

    def stop(_signum: int, _frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        stack.start(workers=args.workers, wait=False)
        print(f"inferstack: starting {args.workers} worker(s); API on {stack.url}{http.PREDICT_PATH} (Ctrl-C stops)",
              file=sys.stderr)
        threading.Thread(target=_announce_ready, args=(stack, args.workers), daemon=True).start()
        # Block until any of our processes exits (or a signal arrives): then stop the rest.
        pid, status = os.wait()
        print(f"inferstack: process {pid} exited with status {os.waitstatus_to_exitcode(status)}; stopping",
              file=sys.stderr)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("inferstack: stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
