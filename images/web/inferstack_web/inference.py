"""Encoded images in, worker replies out, in order: the part /predict and the v2 API share.

A request with N images becomes N queue entries, so workers batch them with everyone else's
traffic; the request then waits for the N replies within one request timeout.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import redis

from inferstack.config import Settings
from inferstack.contract.settings import MAX_IMAGES_PER_REQUEST, max_body_bytes
from inferstack.imaging import BadImage, decode_image
from inferstack.contract.messages import ModelRecord
from inferstack.protocol import QueueFull, RedisFull, ReplyTimeout, WebQueue, decode_probabilities

from . import metrics
from .errors import BadRequest, InferenceFailed, PayloadTooLarge, ResultTimeout, Unavailable
from .uploads import ReceivedBody, SpoolBudget, receive_body

log = logging.getLogger("inferstack.web")

DEFAULT_INPUT_SIZE = (224, 224)
# How long a request waits for a decode slot before it is told the server is busy.
DECODE_WAIT_S = 10.0


class ModelInfo:
    """The ModelRecord the workers advertise in Redis (input size, classes, labels), cached briefly."""

    def __init__(self, queue: WebQueue, ttl_s: float = 5.0) -> None:
        self.queue = queue
        self.ttl_s = ttl_s
        self._record: ModelRecord | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def record(self) -> ModelRecord | None:
        """The last record read (None before any worker ran); refreshed after ttl_s, or 0.5 s without one."""
        now = time.monotonic()
        if now < self._expires:
            return self._record
        with self._lock:
            if now >= self._expires:
                try:
                    record = self.queue.model_record()
                except (redis.RedisError, ValueError, KeyError, TypeError):
                    record = None
                if record:
                    self._record = record
                self._expires = now + (self.ttl_s if record else 0.5)
        return self._record

    def input_size(self) -> tuple[int, int]:
        record = self.record()
        return record.input_shape[:2] if record else DEFAULT_INPUT_SIZE

    @property
    def name(self) -> str | None:
        record = self.record()
        return record.name if record else None


@dataclass(frozen=True)
class Result:
    predictions: list[dict[str, Any]]
    model: str | None
    probabilities: np.ndarray | None  # float32 (classes,), only when asked for


class Inference:
    def __init__(self, settings: Settings, queue: WebQueue, model: ModelInfo) -> None:
        self.settings = settings
        self.queue = queue
        self.model = model
        self.decode_slots = threading.BoundedSemaphore(settings.decode_concurrency)
        self.spool = SpoolBudget(settings.web_spool_bodies * max_body_bytes(settings.max_image_bytes))

    @contextlib.contextmanager
    def decode_slot(self) -> Iterator[None]:
        """One of the process's decode slots: peak memory is (decode_concurrency x budget) + baseline."""
        if not self.decode_slots.acquire(timeout=DECODE_WAIT_S):
            raise Unavailable("The server is busy decoding other images; retry shortly.", 1)
        try:
            yield
        finally:
            self.decode_slots.release()

    def receive(self) -> ReceivedBody:
        """The request body, read in full before any decode slot (408 too slow, 413 too large)."""
        return receive_body(max_body_bytes(self.settings.max_image_bytes), self.settings.body_timeout_s,
                            self.spool)

    def enqueue(self, body: ReceivedBody, parse: Callable[[ReceivedBody], Sequence[bytes]], top_k: int,
                probabilities: bool = False) -> list[str]:
        """Parse the body into encoded images, decode and queue them, all inside one decode slot;
        returns the queue ids. The body, its parsed form, the images and the pixels are released
        by then: a request waits for its replies holding only these ids."""
        with body, self.decode_slot():
            pixels = self.decode(parse(body))
            return self._submit(pixels, top_k, probabilities)

    def replies(self, ids: Sequence[str], started: float) -> list[Result]:
        """The replies to the queued ids, in order, within the request timeout counted from ``started``."""
        return [self._wait(request_id, started) for request_id in ids]

    def decode(self, images: Sequence[bytes]) -> list[np.ndarray]:
        """Every image decoded (call inside decode_slot); a bad one fails the request before any is queued."""
        limit = self.settings.max_image_bytes
        if not images:
            raise BadRequest("The request holds no image.")
        check_image_count(len(images))
        if sum(len(data) for data in images) > limit:
            raise PayloadTooLarge(f"The upload is larger than the limit of {limit} bytes.")
        return [self._decode(data, i, len(images)) for i, data in enumerate(images)]

    def _decode(self, data: bytes, index: int, count: int) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            pixels = decode_image(data, self.model.input_size(), self.settings.max_image_pixels,
                                  self.settings.max_decode_bytes)
        except BadImage as exc:
            prefix = f"Image {index + 1} of {count}: " if count > 1 else ""
            raise BadRequest(prefix + str(exc)) from None
        metrics.DECODE.observe(time.perf_counter() - t0)
        return pixels

    def _submit(self, pixels: list[np.ndarray], top_k: int, probabilities: bool) -> list[str]:
        try:
            # All of the request's images in one call, or none (a refused request leaves nothing queued).
            return self.queue.submit_many(pixels, top_k, probabilities)
        except QueueFull:
            raise Unavailable("The server is at capacity (request queue full); retry shortly.", 1) from None
        except RedisFull:
            raise Unavailable("The server is at capacity (queue memory nearly full); retry shortly.", 2) from None
        except redis.RedisError as exc:
            log.warning("redis unavailable on submit: %s", exc)
            raise Unavailable("The request queue is unreachable; retry shortly.", 2) from None

    def _wait(self, request_id: str, started: float) -> Result:
        timeout = self.settings.request_timeout_s
        remaining = timeout - (time.perf_counter() - started)
        try:
            reply = self.queue.wait_reply(request_id, max(remaining, 0.01))
        except ReplyTimeout:
            raise ResultTimeout(
                f"No result within {timeout:g} s; the workers are busy or down. Retry later."
            ) from None
        except redis.RedisError as exc:
            log.warning("redis unavailable while waiting: %s", exc)
            raise Unavailable("The request queue became unreachable while waiting; retry shortly.", 2) from None
        if not reply.ok:
            raise InferenceFailed(reply.error or "The model failed on this image.")
        return Result(
            predictions=reply.predictions,
            model=reply.model,
            probabilities=decode_probabilities(reply.probabilities) if reply.probabilities is not None else None,
        )


def decode_base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64; send the image file's bytes base64-encoded.") from None


def check_image_count(count: int) -> None:
    if count > MAX_IMAGES_PER_REQUEST:
        raise BadRequest(f"The request holds {count} images; send at most {MAX_IMAGES_PER_REQUEST} per request.")
