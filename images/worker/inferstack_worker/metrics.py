"""Worker metrics, on a port of their own (``INFERSTACK_METRICS_PORT``): what batching does.

Times come from the Redis clock on both ends: a stream entry id is ``<ms>-<seq>`` stamped by
Redis when the web tier queued the request, and the worker reads Redis ``TIME`` when it takes a
batch, so the queue wait needs no clock agreement between pods.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from inferstack.contract.messages import Reply

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def enqueued_ms(entry_id: bytes | str) -> int:
    """When Redis added the stream entry (its id is ``<unix ms>-<sequence>``)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


class WorkerMetrics:
    """One worker process's metrics, labelled with the model it serves."""

    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg, labels = self.registry, ["model"]
        self.batch_size = Histogram("inferstack_batch_size", "Requests in each batch the model ran",
                                    labels, buckets=BATCH_BUCKETS, registry=reg).labels(model)
        self.queue_wait = Histogram("inferstack_queue_wait_seconds",
                                    "Time from enqueue (web) to a worker taking the request",
                                    labels, buckets=WAIT_BUCKETS, registry=reg).labels(model)
        self.inference = Histogram("inferstack_inference_seconds", "Model time per batch",
                                   labels, buckets=INFERENCE_BUCKETS, registry=reg).labels(model)
        self.processed = Counter("inferstack_worker_requests_processed",
                                 "Requests answered with predictions", labels, registry=reg).labels(model)
        self.failed = Counter("inferstack_worker_requests_failed",
                              "Requests answered with an error (bad input, repeated failures)",
                              labels, registry=reg).labels(model)
        self.reclaimed = Counter("inferstack_worker_requests_reclaimed",
                                 "Requests taken over from a worker whose heartbeat lapsed",
                                 labels, registry=reg).labels(model)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` on ``port`` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def taken(self, entry_ids: Iterable[bytes | str], now_ms: int) -> None:
        for entry_id in entry_ids:
            self.queue_wait.observe(max(now_ms - enqueued_ms(entry_id), 0) / 1000)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def answered(self, replies: Iterable[Reply | None]) -> None:
        for reply in replies:
            if reply is None:
                continue  # past its deadline: the client already has its 504
            (self.processed if reply.ok else self.failed).inc()
