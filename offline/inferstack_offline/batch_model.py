"""The served model applied to many encoded images at once, without Spark.

The model is the worker's (inferstack_worker.model.load_classifier, same INFERSTACK_* settings,
runtime and precision); each image is bounded and decoded by the web tier's code
(inferstack.imaging.decode_image with the same limits), so a row's answer equals what `/predict`
answers for the same file. Decoding runs on a thread pool (Pillow releases the GIL), one bad image
is an error for its row only, and nothing one image does can exhaust the process's memory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from inferstack.config import Settings
from inferstack.imaging import BadImage, decode_image

log = logging.getLogger("inferstack.batch")

# One row of input: an encoded file, the path of one (read by the executor), or nothing.
Item = bytes | bytearray | memoryview | str | None
MODEL_FAILED = "The model failed on this image."


@dataclass(frozen=True)
class Row:
    """One image's answer: predictions (or an embedding), or an error a user can act on."""

    predictions: list[dict[str, Any]] | None = None
    embedding: np.ndarray | None = None
    error: str | None = None


def read_bounded(path: str, limit: int) -> bytes:
    """At most limit bytes of the file; a larger file is refused without reading it whole."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise BadImage(f"The file cannot be read ({exc.strerror or type(exc).__name__}).") from None
    if len(data) > limit:
        raise BadImage(f"The file is larger than the limit of {limit} bytes (INFERSTACK_MAX_IMAGE_BYTES).")
    return data


class BatchModel:
    """A classifier (or its embedding model) plus bounded, threaded decoding of its inputs."""

    def __init__(self, settings: Settings, features: bool = False, decode_threads: int | None = None) -> None:
        from inferstack_worker.model import load_classifier

        self.settings = settings
        self.features = features
        self.classifier = load_classifier(settings, features=features)
        self.size = self.classifier.input_shape[:2]
        # As many decoders as the model has threads (inferstack batch: spark.task.cpus): a task stays
        # on the cores Spark gave it. Unset: up to 4.
        self.decode_threads = decode_threads or settings.inference_threads or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")

    def decode(self, item: Item) -> np.ndarray:
        """The web tier's checks and decoding for one row: uint8 pixels at the model's size."""
        limit = self.settings.max_image_bytes
        if item is None:
            raise BadImage("The row holds no image (null).")
        data = read_bounded(item, limit) if isinstance(item, str) else bytes(item)
        if len(data) > limit:
            raise BadImage(f"The image is larger than the limit of {limit} bytes (INFERSTACK_MAX_IMAGE_BYTES).")
        return decode_image(data, self.size, self.settings.max_image_pixels, self.settings.max_decode_bytes)

    def _decode_or_error(self, item: Item) -> np.ndarray | str:
        try:
            return self.decode(item)
        except BadImage as exc:
            return str(exc)
        except Exception as exc:  # never let one row end the task
            log.exception("unexpected error decoding a row")
            return f"The image could not be processed ({type(exc).__name__})."

    def decode_all(self, items: Sequence[Item]) -> list[np.ndarray | str]:
        """Each row's pixels or error message, decoded in parallel, in order."""
        return list(self._pool.map(self._decode_or_error, items))

    def run(self, items: Sequence[Item], top_k: int = 5) -> list[Row]:
        """Every row's answer, in order: decode (threads), one model call for the good ones."""
        return self._answer(self.decode_all(items), top_k)

    def run_many(self, chunks: Iterable[Sequence[Item]], top_k: int = 5) -> Iterator[list[Row]]:
        """run() per chunk, pipelined: the next chunk decodes on the threads while this one is inferred."""
        pending: list[Future[np.ndarray | str]] | None = None
        for chunk in chunks:
            submitted = [self._pool.submit(self._decode_or_error, item) for item in chunk]
            if pending is not None:
                yield self._answer([f.result() for f in pending], top_k)
            pending = submitted
        if pending is not None:
            yield self._answer([f.result() for f in pending], top_k)

    def _answer(self, decoded: list[np.ndarray | str], top_k: int) -> list[Row]:
        rows = [Row(error=d) if isinstance(d, str) else None for d in decoded]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        if good:
            for i, row in zip(good, self._infer([decoded[i] for i in good], top_k)):
                rows[i] = row
        return rows  # type: ignore[return-value]

    def _infer(self, pixels: list[np.ndarray], top_k: int) -> list[Row]:
        clf = self.classifier
        try:
            out = clf.predict(np.stack([clf.prepare(p) for p in pixels]))
        except Exception:
            if len(pixels) == 1:
                log.exception("inference failed for one image")
                return [Row(error=MODEL_FAILED)]
            # As the worker does: find the one input that breaks the batch instead of failing all.
            log.exception("batch of %d failed; retrying one by one", len(pixels))
            return [row for p in pixels for row in self._infer([p], top_k)]
        if self.features:
            return [Row(embedding=vector) for vector in out]
        return [Row(predictions=clf.top_k(probs, top_k)) for probs in out]


_MODELS: dict[tuple[Settings, bool, int | None], BatchModel] = {}


def shared_model(settings: Settings, features: bool = False, decode_threads: int | None = None) -> BatchModel:
    """One BatchModel per process and configuration: a reused Spark Python worker loads it once."""
    key = (settings, features, decode_threads)
    if key not in _MODELS:
        t0 = time.monotonic()
        model = BatchModel(settings, features=features, decode_threads=decode_threads)
        clf = model.classifier
        decoders = _plural(model.decode_threads, "decode thread")
        print(f"inferstack batch: Python worker {os.getpid()} loaded {clf.name}{' features' if features else ''} "
              f"({clf.runtime}, {clf.precision}, {_threads(clf.threads)}, {decoders}) in {time.monotonic() - t0:.1f} s",
              file=sys.stderr, flush=True)
        _MODELS[key] = model
    return _MODELS[key]


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _threads(threads: int) -> str:
    return _plural(threads, "inference thread") if threads else "the runtime's default threads"
