"""What the tests share besides fixtures: encoding images, the digits data, posting, waiting.

Test modules import from here (never from each other, nor from conftest.py); the fixtures that
build on these live in tests/conftest.py.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import numpy as np
import requests
from PIL import Image

from inferstack.contract.http import PREDICT_PATH
from inferstack.contract.settings import env_name

if TYPE_CHECKING:
    from tools.devstack import LocalStack

T = TypeVar("T")

DIGIT_LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_SIZE = 32


def encode(image: Image.Image | np.ndarray, fmt: str, **options: Any) -> bytes:
    """An image (PIL or uint8 array) as the bytes of a file in format ``fmt`` (Pillow's name)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    return encode(arr, "PNG")


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    return encode(arr, "JPEG", quality=quality)


def halves(w: int = 64, h: int = 32) -> Image.Image:
    """Left half red, right half blue: orientation is visible."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as 32x32 RGB uint8 images, and their classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images / 16.0 * 255).round().astype(np.uint8)  # (n, 8, 8)
    big = gray.repeat(DIGIT_SIZE // 8, axis=1).repeat(DIGIT_SIZE // 8, axis=2)
    return np.stack([big] * 3, axis=-1), digits.target


def digits_env(model: dict[str, object], **extra: str) -> dict[str, str]:
    """The environment of a stack serving the digits model (the ``digits_model`` fixture)."""
    env = {
        env_name("model"): str(model["path"]),
        env_name("labels"): str(model["labels"]),
        env_name("web_processes"): "2",
        env_name("web_threads"): "16",
        # auto would pick bf16 on CPUs with AMX; the exactness checks need fp32 everywhere.
        env_name("precision"): "fp32",
    }
    env.update(extra)
    return env


def stack_log(stack: LocalStack) -> str:
    """The tail of every process log of a stack, for assertion messages."""
    out = []
    for f in sorted(Path(stack.log_dir).glob("*.log")):
        out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


def post(stack: LocalStack, data: bytes, *, name: str = "x.png", timeout: float = 60, **params: Any
         ) -> requests.Response:
    """POST one image to the stack's /predict as multipart field ``image``; ``params`` go in the query."""
    return requests.post(stack.url + PREDICT_PATH, files={"image": (name, data)}, params=params, timeout=timeout)


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition", interval: float = 0.05,
             explain: Callable[[], str] | None = None) -> T:
    """Until ``predicate()`` returns something true (which is returned), at most ``timeout`` seconds.

    On timeout, AssertionError names ``what``, followed by ``explain()`` (e.g. the stack's logs).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"\n{explain()}" if explain else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its children (a gunicorn arbiter and its workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRss:
    """In the background, the highest ``tree_rss(pid)`` seen while the block runs (``.peak``)."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.pid))
            if self._done.wait(self.interval_s):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


class Dripper:
    """In the background, send one byte on each socket every interval_s until stopped."""

    def __init__(self, socks: list[socket.socket], interval_s: float, byte: bytes) -> None:
        self.socks, self.interval_s, self.byte = socks, interval_s, byte
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for s in self.socks:
                try:
                    s.send(self.byte)
                except OSError:
                    pass

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def v2_image_request(shape: str, data: str = '"aGk="', outputs: str = "") -> bytes:
    """A v2 infer body (JSON text) with this shape, data and outputs, spelled as given."""
    return (f'{{"inputs": [{{"name": "image", "shape": {shape}, "datatype": "BYTES", "data": [{data}]}}]'
            f'{outputs}}}').encode()


# Parser bombs, each under 190 KB: answered 400 JSON before any arithmetic on what they announce.
V2_BOMBS = [
    # A 4,400-digit integer: json.loads itself refuses it (ValueError).
    (v2_image_request("[" + "9" * 4400 + "]"), "integer of 4400 digits"),
    # 4,299-digit dimensions: their product would take long to compute, and longer to print.
    (v2_image_request("[" + ", ".join(["9" * 4299] * 40) + "]"), "integer of 4299 digits"),
    (v2_image_request("[" + ", ".join(["256"] * 300) + "]"), "1 to 8 integers"),
    (v2_image_request("[256, 256, 256, 256, 256, 256, 256, 256]"), "at most 256 per request"),
    (v2_image_request("[100000]"), "each between 0 and 256"),
    (v2_image_request("[2, -1]"), "each between 0 and 256"),
    (v2_image_request("[1.5]"), "a shape"),
    (v2_image_request("[]"), "a shape"),
    (v2_image_request("[0]", data=""), "no image"),
    (v2_image_request("[3]", data='"aGk=", [["aGk="]], "aGk=", "aGk="'), "carries 4"),
    # 100,001 structural characters: refused before parsing (its parsed form would be ~100x the text).
    (v2_image_request("[1]", data=",".join(["[]"] * 50_001)), "more than 100000 JSON values"),
    (v2_image_request("[1]", outputs=', "outputs": [{"name": "probabilities"}, {"name": "probabilities"}]'),
     "more than once"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}], "id": '
     + b"1" * 30 + b"}", "integer of 30 digits"),
    (b'{"inputs": "\\ud800"}', "exactly one input"),
    (b'\xff\xfe{"inputs": []}', "not a JSON inference request"),
]
