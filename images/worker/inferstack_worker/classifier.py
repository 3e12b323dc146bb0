"""The batch call: one compiled model call (Keras or OpenVINO) behind the same Classifier."""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
from PIL import Image

from inferstack.contract.messages import ModelRecord

from .live_int8 import Reservoir


def fit_pixels(pixels: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """One queued uint8 image at the model's (h, w), still uint8."""
    h, w, _ = input_shape
    if pixels.shape[:2] != (h, w):
        pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR))
    return pixels


def prepare_pixels(pixels: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """One queued uint8 image -> float32 (h, w, c) at the model's size."""
    c = input_shape[2]
    x = fit_pixels(pixels, input_shape).astype(np.float32)
    if c == 1 and x.shape[2] == 3:
        x = x @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
    return x


class Classifier:
    """An image classifier behind one compiled batch call (Keras or OpenVINO), with its labels."""

    def __init__(
        self,
        name: str,
        labels: list[str],
        input_shape: tuple[int, int, int],
        call: Callable[[np.ndarray], Any],
        *,
        buckets: list[int] | None = None,
        runtime: str = "keras",
        precision: str = "fp32",
        choice: dict[str, Any] | None = None,
        threads: int = 0,
    ) -> None:
        self.name = name
        self.labels = labels
        self.input_shape = input_shape
        self.runtime = runtime
        self.precision = precision
        # Threads the model runs on (INFERSTACK_INFERENCE_THREADS as the runtime applied it); 0: its default.
        self.threads = threads
        self._call = call
        # Shape-specialising compilers (XLA, JAX) see only these batch sizes: no compile while serving.
        self._buckets = sorted(buckets) if buckets else None
        # precision auto / auto int8: what was measured and chosen; updated while serving.
        self.choice: dict[str, Any] = choice if choice is not None else {}
        self.reservoir: Reservoir | None = None  # auto int8 samples the served inputs into it

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        fitted = fit_pixels(pixels, self.input_shape)
        if self.reservoir is not None:
            self.reservoir.offer(fitted)
        return prepare_pixels(fitted, self.input_shape)

    def switch(self, call: Callable[[np.ndarray], Any], precision: str) -> None:
        """Serve with another compiled call from the next batch on (one attribute store: no lock needed)."""
        self._call = call
        self.precision = precision
        self.reservoir = None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, h, w, c) -> probabilities (n, classes)."""
        n = batch.shape[0]
        if self._buckets:
            size = next((b for b in self._buckets if b >= n), n)
            if size != n:
                batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        out = self._call(batch)
        return np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1)[:n]

    def warm_up(self, batch_size: int) -> None:
        sizes = set(self._buckets) if self._buckets else {1, batch_size}
        for n in sorted(sizes):
            self.predict(np.zeros((n, *self.input_shape), np.float32))

    def top_k(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        k = min(k, probs.shape[0])
        idx = np.argpartition(-probs, k - 1)[:k]
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        return [{"label": self.labels[i], "probability": float(probs[i])} for i in idx]

    def record(self) -> ModelRecord:
        """What the workers advertise to the web tier (labels answer the v2 classification extension)."""
        return ModelRecord(name=self.name, input_shape=self.input_shape, classes=len(self.labels),
                           labels=tuple(self.labels), runtime=self.runtime, precision=self.precision,
                           precision_choice=json.loads(json.dumps(self.choice)))

    def info(self) -> dict[str, Any]:
        """The record as its JSON object (the wire shape is ModelRecord's)."""
        info: dict[str, Any] = json.loads(self.record().to_wire())
        return info
