"""The batching loop: take what is queued, run it through the model once, reply, acknowledge."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from inferstack.config import Settings
from inferstack.protocol import MAX_DELIVERIES, Request, WorkerQueue, encode_probabilities

from .model import Classifier

log = logging.getLogger("inferstack.worker")

HEARTBEAT_INTERVAL_S = 1.0
RECLAIM_INTERVAL_S = 1.0


class Worker:
    def __init__(self, settings: Settings, classifier: Classifier, queue: WorkerQueue) -> None:
        self.settings = settings
        self.classifier = classifier
        self.queue = queue
        self.stopping = threading.Event()
        self.ready_file = Path(settings.ready_file) if settings.ready_file else None
        self.served = 0

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.info("signal %d: finishing the current batch, then exiting", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def _heartbeat_loop(self) -> None:
        # A thread, so a long batch (TensorFlow releases the GIL) does not look like a dead worker.
        info = self.classifier.info()
        while not self.stopping.is_set():
            try:
                self.queue.heartbeat(info)
            except redis.RedisError as exc:
                log.debug("heartbeat failed: %s", exc)
            if self.ready_file is not None:
                self.ready_file.touch()
            self.stopping.wait(HEARTBEAT_INTERVAL_S)

    def run(self) -> None:
        if self.ready_file is not None:
            self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        log.info(
            "worker %s serving %s (batch %d, delay %g ms)",
            self.queue.name, self.classifier.name, self.settings.batch_size, self.settings.max_batch_delay_ms,
        )
        backoff = 0.2
        group_ready = False
        last_reclaim = 0.0
        try:
            while not self.stopping.is_set():
                try:
                    if not group_ready:
                        self.queue.ensure_group()
                        group_ready = True
                    batch: list[Request] = []
                    if time.monotonic() - last_reclaim >= RECLAIM_INTERVAL_S:
                        last_reclaim = time.monotonic()
                        batch = self.queue.reclaim_from_dead(self.settings.batch_size)
                        if batch:
                            log.warning("reclaimed %d request(s) from dead worker(s)", len(batch))
                    if not batch:
                        t_take = time.perf_counter()
                        batch = self.queue.take_batch(self.settings.batch_size, self.settings.max_batch_delay_ms)
                        if batch and log.isEnabledFor(logging.DEBUG):
                            log.debug("took %d after %.1f ms", len(batch), (time.perf_counter() - t_take) * 1000)
                    if batch:
                        self.process(batch)
                    backoff = 0.2
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("redis unavailable (%s); retrying in %.1f s", exc, backoff)
                    group_ready = False
                    self.queue.reset_after_disconnect()
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            self.stopping.set()
            try:
                self.queue.leave()
            except redis.RedisError:
                pass
            if self.ready_file is not None:
                self.ready_file.unlink(missing_ok=True)
            log.info("worker %s stopped after %d request(s)", self.queue.name, self.served)

    def process(self, batch: list[Request]) -> None:
        t0 = time.perf_counter()
        now_ms = self.queue.now_ms()
        results: list[tuple[Request, dict[str, Any] | None]] = []
        live: list[Request] = []
        for req in batch:
            if req.deadline_ms <= now_ms:
                results.append((req, None))  # the client already got its 504; skip the work
            elif req.deliveries > MAX_DELIVERIES:
                log.error("request %s failed %d deliveries; answering with an error", req.request_id, req.deliveries)
                results.append((req, {"ok": False, "error": "The request failed repeatedly on the workers."}))
            else:
                live.append(req)
        if live:
            results += self._infer(live)
        t1 = time.perf_counter()
        self.queue.complete(results, now_ms)
        self.served += len(live)
        log.debug("batch of %d: inference %.1f ms, total %.1f ms", len(live), (t1 - t0) * 1000,
                  (time.perf_counter() - t0) * 1000)

    def _infer(self, reqs: list[Request]) -> list[tuple[Request, dict[str, Any] | None]]:
        clf = self.classifier
        try:
            probs = clf.predict(np.stack([clf.prepare(r.pixels) for r in reqs]))
        except Exception:
            if len(reqs) == 1:
                log.exception("inference failed for request %s", reqs[0].request_id)
                return [(reqs[0], {"ok": False, "error": "The model failed on this image."})]
            # Find the one input that breaks the batch instead of failing all of them.
            log.exception("batch of %d failed; retrying one by one", len(reqs))
            out: list[tuple[Request, dict[str, Any] | None]] = []
            for r in reqs:
                out += self._infer([r])
            return out
        return [(r, self._reply(r, p)) for r, p in zip(reqs, probs)]

    def _reply(self, req: Request, probs: np.ndarray) -> dict[str, Any]:
        reply = {"ok": True, "predictions": self.classifier.top_k(probs, req.top_k), "model": self.classifier.name}
        if req.probabilities:
            reply["probabilities"] = encode_probabilities(probs)
        return reply


def default_worker_name() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"
