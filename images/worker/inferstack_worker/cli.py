"""`inferstack-worker`: load the model, warm it up, announce readiness, serve batches until SIGTERM."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any


def _time_batch(classifier: Any, batch_size: int) -> float:
    """Seconds one full batch takes, warm: the yardstick for the stall bound."""
    import numpy as np

    x = np.zeros((batch_size, *classifier.input_shape), np.float32)
    t0 = time.perf_counter()
    classifier.predict(x)
    return time.perf_counter() - t0


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
    from .precision_metrics import PrecisionCollector
    from .worker import Worker, default_worker_name, stall_bound

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
    stall_timeout_s = settings.stall_timeout_s or stall_bound(_time_batch(classifier, settings.batch_size))

    queue = WorkerQueue(settings.redis_url, settings.queue_prefix, settings.worker_name or default_worker_name())
    worker = Worker(settings, classifier, queue, stall_timeout_s)
    worker.metrics.registry.register(PrecisionCollector(classifier, settings.model_name))
    if settings.metrics_port:
        worker.metrics.serve(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    worker.install_signal_handlers()
    worker.run()


if __name__ == "__main__":
    main()
