"""What the tests share besides fixtures: encoding images, the digits data, posting, waiting.

Test modules import from here (never from each other, nor from conftest.py); the fixtures that
build on these live in tests/conftest.py.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
