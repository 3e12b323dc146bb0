"""`inferstack-worker`: load the model, warm it up, announce readiness, serve batches until SIGTERM."""

from __future__ import annotations

import logging
import os
import sys
import time


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from inferstack.config import ConfigError, Settings

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        sys.exit(f"inferstack-worker: {exc}")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("inferstack.worker")

    from inferstack.protocol import WorkerQueue

    from .model import load_classifier
    from .worker import Worker, default_worker_name

    try:
        t0 = time.perf_counter()
        classifier = load_classifier(settings)
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)
    log.info("model %s loaded in %.1f s; warming up", classifier.name, time.perf_counter() - t0)
    t0 = time.perf_counter()
    classifier.warm_up(settings.batch_size)
    log.info("warm-up done in %.1f s", time.perf_counter() - t0)

    queue = WorkerQueue(settings.redis_url, settings.queue_prefix, settings.worker_name or default_worker_name())
    worker = Worker(settings, classifier, queue)
    if settings.metrics_port:
        worker.metrics.serve(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    worker.install_signal_handlers()
    worker.run()


if __name__ == "__main__":
    main()
