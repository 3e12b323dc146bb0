"""The batching loop: take what is queued, run it through the model once, reply, acknowledge."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from inferstack.config import Settings
from inferstack.contract.messages import Reply
from inferstack.contract.queue import MAX_DELIVERIES
from inferstack.protocol import Poison, Request, WorkerQueue, encode_probabilities, is_transient

from .metrics import WorkerMetrics
from .classifier import Classifier

log = logging.getLogger("inferstack.worker")

HEARTBEAT_INTERVAL_S = 1.0
RECLAIM_INTERVAL_S = 1.0
# Exit status of a worker whose main loop stopped making progress (Kubernetes restarts it).
EXIT_STALLED = 70
STALL_FLOOR_S = 15.0
STALL_BATCHES = 5


def stall_bound(batch_s: float) -> float:
    """Default stall bound: a few full batches, never so short that a slow moment trips it."""
    return max(STALL_FLOOR_S, STALL_BATCHES * batch_s)


class Worker:
    def __init__(self, settings: Settings, classifier: Classifier, queue: WorkerQueue,
                 stall_timeout_s: float | None = None) -> None:
        self.settings = settings
        self.classifier = classifier
        self.queue = queue
        self.stopping = threading.Event()
        self.ready_file = Path(settings.ready_file) if settings.ready_file else None
        self.served = 0
        self.stall_timeout_s = stall_timeout_s or settings.stall_timeout_s or 60.0
        self._progress = time.monotonic()
        self._group_ready = False
        self._last_reclaim = 0.0
        self.metrics = WorkerMetrics(settings.model_name)

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.info("signal %d: finishing the current batch, then exiting", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def _mark_progress(self) -> None:
        self._progress = time.monotonic()

    def _heartbeat_loop(self) -> None:
        # A thread, so a long batch (TensorFlow releases the GIL) does not look like a dead worker;
        # but it only vouches for a main loop that moves: a hung model call must not look alive.
        while not self.stopping.is_set():
            stalled = time.monotonic() - self._progress
            if stalled > self.stall_timeout_s:
                self._die_stalled(stalled)
                return
            try:
                # Read each beat: auto int8 may switch the precision while serving.
                self.queue.heartbeat(self.classifier.record())
            except redis.RedisError as exc:
                log.debug("heartbeat failed: %s", exc)
            if self.ready_file is not None:
                self.ready_file.touch()
            self.stopping.wait(HEARTBEAT_INTERVAL_S)

    def _die_stalled(self, stalled: float) -> None:
        log.error(
            "main loop stalled for %.0f s (bound %.0f s): leaving so another worker reclaims the batch, "
            "and exiting so the process is restarted", stalled, self.stall_timeout_s,
        )
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        try:
            self.queue.leave()  # others reclaim at once instead of waiting for the heartbeat to lapse
        except redis.RedisError:
            pass
        logging.shutdown()
        # The stuck thread cannot be interrupted; only ending the process frees it.
        os._exit(EXIT_STALLED)

    def run(self) -> None:
        if self.ready_file is not None:
            self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        self._mark_progress()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        log.info(
            "worker %s serving %s (batch %d, delay %g ms, stall bound %.0f s)", self.queue.name,
            self.classifier.name, self.settings.batch_size, self.settings.max_batch_delay_ms, self.stall_timeout_s,
        )
        backoff = Backoff()
        try:
            while not self.stopping.is_set():
                self._mark_progress()
                try:
                    self._turn()
                    backoff.reset()
                except redis.RedisError as exc:
                    self._wait_after(exc, backoff)
        finally:
            self._leave()

    def _turn(self) -> None:
        """One pass of the main loop: the group, a dead worker's requests, our own backlog, then a batch."""
        if not self._group_ready:
            self.queue.ensure_group()
            self._group_ready = True
        if time.monotonic() - self._last_reclaim >= RECLAIM_INTERVAL_S:
            self._last_reclaim = time.monotonic()
            self._reclaim()
        own = self.queue.own_backlog()
        if own:
            self.process(own)  # one at a time, see own_backlog
            return
        t_take = time.perf_counter()
        batch = self.queue.take_batch(self.settings.batch_size, self.settings.max_batch_delay_ms)
        if batch and log.isEnabledFor(logging.DEBUG):
            log.debug("took %d after %.1f ms", len(batch), (time.perf_counter() - t_take) * 1000)
        if batch:
            self.process(batch)

    def _wait_after(self, exc: redis.RedisError, backoff: Backoff) -> None:
        # Every Redis error class (connection, OOM, READONLY during a failover, ...):
        # unacknowledged requests stay pending, so waiting and retrying loses nothing.
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            self._group_ready = False
            self.queue.reset_after_disconnect()
        delay = backoff.next()
        log.warning("redis error (%s: %.300s); retrying in %.1f s", type(exc).__name__, exc, delay)
        self.stopping.wait(delay)

    def _leave(self) -> None:
        self.stopping.set()
        try:
            self.queue.leave()
        except redis.RedisError:
            pass
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        log.info("worker %s stopped after %d request(s)", self.queue.name, self.served)

    def _reclaim(self) -> None:
        # Each reclaimed request runs alone; a bounded number per pass keeps the loop turning.
        for _ in range(self.settings.batch_size):
            item = self.queue.reclaim_from_dead()
            if item is None:
                return
            log.warning("reclaimed request %s from a dead worker (delivery %d)", item.entry_id.decode(),
                        item.deliveries)
            self.metrics.reclaimed.inc()
            self.process([item])
            self._mark_progress()

    def process(self, batch: list[Request | Poison]) -> None:
        t0 = time.perf_counter()
        now_ms = self.queue.now_ms()
        self.metrics.taken([r.entry_id for r in batch if r.deliveries == 1], now_ms)
        results: list[tuple[Request, Reply | None]] = []
        dead: list[Poison] = []
        live: list[Request] = []
        for req in batch:
            if isinstance(req, Poison):
                dead.append(req)
            elif req.deadline_ms <= now_ms:
                results.append((req, None))  # the client already got its 504; skip the work
            elif req.deliveries > MAX_DELIVERIES:
                dead.append(Poison(req.entry_id, f"handed out {req.deliveries} times without an answer",
                                   req.request_id, {b"id": req.request_id.encode()}, req.deliveries))
            else:
                live.append(req)
        for poison in dead:
            log.error("dead-lettering entry %s (request %s): %s", poison.entry_id.decode(), poison.request_id,
                      poison.reason)
        if live:
            t_infer = time.perf_counter()
            results += self._infer(live)
            self.metrics.batch(len(live), time.perf_counter() - t_infer)
        t1 = time.perf_counter()
        self._complete(results, now_ms, dead)
        self.metrics.answered(reply for _, reply in results)
        self.metrics.failed.inc(sum(1 for poison in dead if poison.request_id is not None))
        self.served += len(live)
        log.debug("batch of %d: inference %.1f ms, total %.1f ms", len(live), (t1 - t0) * 1000,
                  (time.perf_counter() - t0) * 1000)

    def _complete(self, results: list[tuple[Request, Reply | None]], now_ms: int,
                  dead: list[Poison]) -> None:
        """Deliver the answers, retrying through Redis errors: computed work is not thrown away."""
        backoff = Backoff()
        while True:
            try:
                self.queue.complete(results, now_ms, dead)
                return
            except redis.RedisError as exc:
                if self.stopping.is_set():
                    # Still pending in Redis: another worker (or our successor) answers them.
                    log.warning("could not deliver %d answer(s) before exiting: %s", len(results) + len(dead), exc)
                    return
                if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                    self.queue.reset_after_disconnect()
                delay = backoff.next()
                log.warning("delivering answers failed (%s: %.300s); retrying in %.1f s", type(exc).__name__, exc, delay)
                if is_transient(exc):
                    # Waiting for Redis to come back is not a hung worker; any other refusal would
                    # repeat forever, so the stall watchdog gets to end it (another worker reclaims).
                    self._mark_progress()
                self.stopping.wait(delay)

    def _infer(self, reqs: list[Request]) -> list[tuple[Request, Reply | None]]:
        clf = self.classifier
        try:
            probs = clf.predict(np.stack([clf.prepare(r.pixels) for r in reqs]))
        except Exception:
            if len(reqs) == 1:
                log.exception("inference failed for request %s", reqs[0].request_id)
                return [(reqs[0], Reply.failure("The model failed on this image."))]
            # Find the one input that breaks the batch instead of failing all of them.
            log.exception("batch of %d failed; retrying one by one", len(reqs))
            out: list[tuple[Request, Reply | None]] = []
            for r in reqs:
                out += self._infer([r])
            return out
        return [(r, self._reply(r, p)) for r, p in zip(reqs, probs)]

    def _reply(self, req: Request, probs: np.ndarray) -> Reply:
        return Reply(ok=True, predictions=self.classifier.top_k(probs, req.top_k), model=self.classifier.name,
                     probabilities=encode_probabilities(probs) if req.probabilities else None)


def default_worker_name() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"


class Backoff:
    """Exponential backoff with jitter, 0.2 s doubling up to 5 s."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first, self.cap, self._next = first, cap, first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.first
