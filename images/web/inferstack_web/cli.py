"""`inferstack-web`: run the API under gunicorn with settings from the environment."""

from __future__ import annotations

import os
import sys
import tempfile

from inferstack.config import ConfigError, Settings

# gevent: gunicorn reads each request's headers within its keep-alive time (the async worker's
# timeout_ctx), so this is also the header deadline; the body has its own (body_timeout_s).
HEADER_TIMEOUT_S = 5


def gunicorn_argv(settings: Settings, host: str) -> list[str]:
    if settings.web_worker_class == "gevent":
        # One greenlet per connection: slow or idle clients cost memory, not a thread each.
        concurrency = ["--worker-class", "gevent", "--worker-connections", str(settings.web_connections)]
    else:
        concurrency = ["--worker-class", "gthread", "--threads", str(settings.web_threads)]
    return [
        "gunicorn",
        "--config", "python:inferstack_web.gunicorn_conf",
        "--bind", f"{host}:{settings.port}",
        *concurrency,
        "--workers", str(settings.web_processes),
        # Threads sit in BLPOP for up to the request timeout; don't let gunicorn kill them first.
        "--timeout", str(int(settings.request_timeout_s) + 30),
        "--graceful-timeout", str(int(settings.request_timeout_s) + 5),
        "--keep-alive", str(HEADER_TIMEOUT_S),
        "--backlog", "2048",
        # The control socket would need a writable $HOME; pods run with a read-only root.
        "--no-control-socket",
        "inferstack_web.app:create_app()",
    ]


def main() -> None:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        sys.exit(f"inferstack-web: {exc}")
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each gunicorn process writes its counters here; /metrics merges them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="inferstack-metrics-")
    argv = gunicorn_argv(settings, settings.host)
    if settings.access_log:
        argv[1:1] = ["--access-logfile", settings.access_log]
    if settings.metrics_port:
        # /metrics on a listener of its own, off the public port (see metrics.check_port).
        host = argv[argv.index("--bind") + 1].rpartition(":")[0]
        argv[1:1] = ["--bind", f"{host}:{settings.metrics_port}"]
    argv[-1:-1] = sys.argv[1:]
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", *argv[1:]])


if __name__ == "__main__":
    main()
